"""Outputs: never replace what is there without being asked, and never leave half a file.

``check_output`` is the one rule every front end applies before any work: an existing output is
replaced only with the front end's replace flag (``--overwrite``, ``--force``). ``staged_file``
and ``staged_dir`` write next to the output and move the finished result into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import sys
import tempfile
from typing import Iterator, Optional, Sequence

from ordmoe_megatron.errors import OrdMoEError


class OutputError(OrdMoEError):
    """An output that cannot or must not be written; the message names it and the way out."""


def check_output(path: str, replace: bool, replace_flag: str, is_dir: bool = False) -> None:
    """Refuse ``path`` if it exists (for a directory: is not empty) and ``replace`` is off, or if
    it cannot be what it should be (a file where a directory goes, a parent that is a file)."""
    kind = "directory" if is_dir else "file"
    if os.path.lexists(path):
        if os.path.isdir(path) != is_dir:
            raise OutputError(f"output {path} exists and is not a {kind}; remove it or choose another path")
        if not replace and (not is_dir or os.listdir(path)):
            raise OutputError(f"output {path} already exists; pass {replace_flag} to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"output {path}: {parent} is not a directory")


def check_writable(path: str, flag: str, is_dir: bool = False) -> None:
    """Refuse an output that cannot be written (checked by writing a probe file into the nearest
    existing directory), before any work rather than at the end of it."""
    where = os.path.abspath(path)
    if os.path.exists(where) and not os.path.isdir(where):
        if is_dir:
            raise OutputError(f"{flag} {path} is a file, not a directory")
        where = os.path.dirname(where)
    while not os.path.exists(where):
        where = os.path.dirname(where)
    if not os.path.isdir(where):
        raise OutputError(f"{flag} {path}: {where} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ordmoe-write-probe-", dir=where)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise OutputError(
            f"{flag} {path} cannot be written ({where}: {err.strerror}); choose a writable place"
        ) from None


class RunLock:
    """An exclusive lock on an output directory for the life of the process: a second run on the
    same outputs is refused with the first one's pid (``flock``: released when the process ends,
    however it ends)."""

    FILE = ".ordmoe-run.lock"

    def __init__(self, directory: str, flag: str):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, self.FILE)
        try:  # O_NOFOLLOW: a link planted under the lock's name is refused, never written through
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            why = "is a symbolic link" if os.path.islink(self.path) else f"cannot be opened ({err.strerror})"
            raise OutputError(f"{flag} {directory}: {self.path} {why}; remove it") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutputError(f"{flag} {directory}: {self.path} is not a plain file; remove it")
        self._file = os.fdopen(fd, "r+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise OutputError(
                f"{flag} {directory} is in use by another run (pid {holder}); wait for it to end, "
                "or give this run its own outputs"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def check_distinct(paths: Sequence[Optional[str]], names: str) -> None:
    given = [os.path.abspath(p) for p in paths if p]
    if len(set(given)) != len(given):
        raise OutputError(f"{names} name the same file; give each its own path")


@contextlib.contextmanager
def staged_file(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically, on
    failure it is removed and ``path`` is left as it was."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    os.close(fd)
    plain_mode(tmp)  # mkstemp makes it private; the output gets a plain file's mode
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def plain_mode(path: str) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would under the umask (0644/0755 under
    022), for files made private by their writer (``mkstemp``, ``mkdtemp``, safetensors)."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


@contextlib.contextmanager
def staged_dir(path: str, replace: bool, replace_flag: str) -> Iterator[str]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path`` (the old one
    is moved aside first and removed only after the swap); on failure it is deleted and ``path``
    is left as it was."""
    check_output(path, replace, replace_flag, is_dir=True)
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    plain_mode(tmp)  # mkdtemp makes it private; the output gets a plain directory's mode
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    check_output(path, replace, replace_flag, is_dir=True)  # nothing appeared meanwhile
    old = None
    if os.path.lexists(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
        os.rmdir(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_json_lines(path: str, flag: str) -> list:
    """The records of a JSON-lines file this project wrote (``--metrics-out``). A last line cut
    short (a killed run) is dropped with a warning on stderr; a damaged line before it is refused."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except ValueError as err:
            if number < len(lines):
                raise OutputError(
                    f"{flag} {path}: line {number} is not JSON ({err}); repair or remove the file"
                ) from None
            print(f"warning: {flag} {path}: its last line is cut short (a killed run?); dropped", file=sys.stderr)
    return records


def read_json_file(path: str, what: str) -> Optional[dict]:
    """A JSON file this project wrote; None, with a warning on stderr, when it is cut short or
    damaged (``what`` says what happens then)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as err:
        print(f"warning: {path} is damaged ({err}); {what}", file=sys.stderr)
        return None
