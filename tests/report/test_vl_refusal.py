"""A vision-language checkpoint is refused by the tier report in one line (until it reads them)."""

import pytest

from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.report import report as report_module
from tests.support import run_pretrain


def test_vl_checkpoint_refused(tmp_path):
    save = tmp_path / "ckpt"
    run_pretrain("--preset", "tiny-vl", "--train-iters", "2", "--save", str(save), "--work-dir", str(tmp_path / "run"))
    with pytest.raises(OrdMoEError, match="vision-language checkpoint"):
        report_module.inspect(str(save))
