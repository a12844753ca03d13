"""Console entry points (``ordmoe-pretrain``, ``ordmoe-tier-report``, ``ordmoe-sweep``, ``ordmoe-convert``,
``ordmoe-megatron-lm-cpu``).

Megatron warns at import time about every GPU library it does not find (Transformer Engine,
Apex): not news on a CPU machine, and noise before every run. Each entry point installs the
filters first and imports its application after them; that is why the imports below sit inside
the functions.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence


def _quiet_megatron_import_warnings() -> None:
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning)


def pretrain(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_megatron_import_warnings()
    from ordmoe_megatron.train.cli import main

    return main(argv)


def tier_report(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_megatron_import_warnings()
    from ordmoe_megatron.report.cli import main

    return main(argv)


def sweep(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_megatron_import_warnings()
    from ordmoe_megatron.sweep.cli import main

    return main(argv)


def convert(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_megatron_import_warnings()
    from ordmoe_megatron.convert.cli import main

    return main(argv)


def megatron_lm_cpu(argv: Optional[Sequence[str]] = None) -> int:
    from ordmoe_megatron.megatron_lm.cpu_launch import main

    return main(argv)
