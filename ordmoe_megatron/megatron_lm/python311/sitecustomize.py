"""Run at start-up by every Python 3.11 process that has ``megatron_lm/python311`` first on its
path: Megatron-LM from core_v0.18 on imports ``typing.override`` (Python 3.12), which on 3.11 is
``typing_extensions.override``. Megatron-LM's spawned processes (its asynchronous checkpoint
writers) re-import ``pretrain_gpt.py`` before any code of ours runs, so the stand-in must be there
from the start. Imports nothing of the package: it runs in every such process, ``make``'s too."""

import typing


def typing_override_for_python_311() -> None:
    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override


typing_override_for_python_311()
