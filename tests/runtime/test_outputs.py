"""Staged outputs: written whole or not at all, with a plain file's permissions."""

import os
import stat

import pytest

from ordmoe_megatron.runtime.outputs import staged_file


def test_a_staged_file_replaces_the_output_whole_with_the_umask_mode(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    previous = os.umask(0o022)
    try:
        with staged_file(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("new")
            assert path.read_text() == "old"  # not replaced until the block succeeds
    finally:
        os.umask(previous)
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's private 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_failed_staged_file_leaves_the_output_as_it_was(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with staged_file(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("stopped")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
