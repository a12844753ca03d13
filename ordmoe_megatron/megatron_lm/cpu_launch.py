"""Megatron-LM's training loop (``pretrain_gpt.py``) on a machine without CUDA.

The launcher (installed; ``ordmoe-megatron-lm-cpu`` or ``python -m ordmoe_megatron.megatron_lm.cpu_launch``)::

    ordmoe-megatron-lm-cpu [--nproc-per-node N] [--megatron-lm DIR] SCRIPT <Megatron-LM flags>

runs ``torchrun --standalone --nproc-per-node N`` (the rendezvous address is set) on SCRIPT
(``pretrain_gpt.py`` of a Megatron-LM checkout, or ``examples/pretrain_gpt_ordmoe.py``) with:

- ``PYTHONPATH`` = the Megatron-LM checkout (``--megatron-lm``, else ``MEGATRON_LM_PATH``, else the
  checkout SCRIPT lies in) ahead of what was there;
- ``PYENV_VERSION`` = this interpreter's version and this interpreter's directory first on
  ``PATH``: every Megatron-LM tag ships a ``.python-version`` of 3.12, and under pyenv the ``make``
  that builds its dataset helpers would otherwise run another Python (whose only symptom is
  ``MockGPTDataset failed to build``);
- no CUDA device (``CUDA_VISIBLE_DEVICES=""``): the CPU by design, on a GPU machine too;
- ``CPU_FLAGS`` appended, each only when the command line does not set it already;
- in every rank, ``megatron_lm_on_cpu()`` before the script runs: the bridges
  (``runtime.bridges.enable()``: the CPU emulation) and the CUDA-only spots of Megatron-LM's
  ``megatron.training`` rebound at run time (no file of Megatron-LM is changed).

``typing_override_for_python_311`` (``python311/sitecustomize.py``) is the one stand-in Megatron-LM's
imports need on Python 3.11: on 3.11 the launcher puts ``python311/`` first on ``PYTHONPATH``, so it
runs in every process, the ones Megatron-LM spawns included.
``megatron.training`` is Megatron-LM's, not megatron-core's: it is imported where it is used.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import runpy
import subprocess
import sys
from typing import List, Optional, Sequence

import torch

from ordmoe_megatron.megatron_lm import python311
from ordmoe_megatron.megatron_lm.python311.sitecustomize import typing_override_for_python_311
from ordmoe_megatron.runtime import bridges
from ordmoe_megatron.runtime.bridges.guards import replace_existing


def megatron_lm_on_cpu() -> None:
    """Run Megatron-LM's ``pretrain()`` here (a machine without CUDA, Python 3.11), after
    ``bridges.enable()``:

    0. Megatron-LM core_v0.18 on imports ``typing.override`` (Python 3.12): on 3.11 it is
       ``typing_extensions.override``.
    1. ``pretrain()`` calls ``initialize_megatron()`` without ``allow_no_cuda``, which asserts
       ``torch.cuda.is_available()``: ``megatron.training.training.initialize_megatron`` gets
       ``allow_no_cuda=True``.
    2. ``_initialize_distributed`` creates Megatron's model-parallel groups, and
       ``_set_random_seed`` the CUDA RNG tracker, only when ``torch.cuda.device_count() > 0``:
       ``device_count`` returns 1 (the device mode maps ``cuda:0`` to the CPU).
    3. core_v0.16's ``_compile_dependencies`` calls ``megatron.legacy.fused_kernels.load``, which
       runs ``nvcc``: a no-op (core_v0.17 on have no fused kernels to build).
    """
    typing_override_for_python_311()
    bridges.enable()
    if torch.cuda.is_available():
        return
    # Megatron-LM's modules (not megatron-core's): only there when a Megatron-LM checkout is.
    import megatron.training.training as training

    replace_existing(
        training,
        "initialize_megatron",
        functools.partial(training.initialize_megatron, allow_no_cuda=True),
        "megatron.training.training",
    )
    torch.cuda.device_count = lambda: 1
    try:
        import megatron.legacy.fused_kernels as fused_kernels
    except ModuleNotFoundError:
        return
    replace_existing(fused_kernels, "load", lambda args: None, "megatron.legacy.fused_kernels")


# What Megatron-LM needs on a CPU: gloo, the local (non Transformer Engine) layers, and no fused
# CUDA kernels. (option, its value or None)
CPU_FLAGS = (
    ("--distributed-backend", "gloo"),
    ("--transformer-impl", "local"),
    ("--use-cpu-initialization", None),
    ("--no-gradient-accumulation-fusion", None),
    ("--no-masked-softmax-fusion", None),
    ("--no-bias-gelu-fusion", None),
    ("--no-bias-swiglu-fusion", None),
    ("--no-bias-dropout-fusion", None),
    ("--no-rope-fusion", None),
    ("--no-persist-layer-norm", None),
)


# Set by the launcher for the ranks it starts: this module, run by torchrun, is then a rank.
# (Not an option: torchrun's parser would take an abbreviation of its own options as one.)
RANK_MODE = "ORDMOE_MEGATRON_LM_CPU_RANK"


def with_cpu_flags(argv: Sequence[str]) -> List[str]:
    """``argv`` plus every ``CPU_FLAGS`` option it does not give (a given one keeps its value)."""
    given = {a.split("=", 1)[0] for a in argv}
    out = list(argv)
    for option, value in CPU_FLAGS:
        if option not in given:
            out += [option] if value is None else [option, value]
    return out


def megatron_lm_checkout(script: str, given: Optional[str]) -> str:
    """The Megatron-LM checkout: ``given``, else ``MEGATRON_LM_PATH``, else the one SCRIPT lies in."""
    path = os.path.abspath(given or os.environ.get("MEGATRON_LM_PATH") or os.path.dirname(os.path.abspath(script)))
    if not os.path.isfile(os.path.join(path, "megatron", "training", "__init__.py")):
        raise SystemExit(
            f"ordmoe-megatron-lm-cpu: error: {path} is not a Megatron-LM checkout (no megatron/training): "
            "pass --megatron-lm DIR or set MEGATRON_LM_PATH"
        )
    return path


def launch_env(megatron_lm: str, base: Optional[dict] = None) -> dict:
    """The environment every rank runs in (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    first = python311.DIRECTORY if sys.version_info < (3, 12) else None
    env["PYTHONPATH"] = os.pathsep.join(p for p in (first, megatron_lm, env.get("PYTHONPATH")) if p)
    env["PYENV_VERSION"] = platform.python_version()
    env["PATH"] = os.pathsep.join(p for p in (os.path.dirname(sys.executable), env.get("PATH")) if p)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    env[RANK_MODE] = "1"
    return env


def launch_command(script: str, argv: Sequence[str], nproc_per_node: int = 1) -> List[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc_per_node),
        "-m",
        "ordmoe_megatron.megatron_lm.cpu_launch",
        os.path.abspath(script),
        *with_cpu_flags(argv),
    ]


def run_script(script: str, argv: Sequence[str]) -> None:
    """One rank: the CPU spots bridged, then SCRIPT as ``__main__`` with its own directory first
    on ``sys.path`` (as ``python SCRIPT`` would have it)."""
    megatron_lm_on_cpu()
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.pop(RANK_MODE, None):  # a rank, started by the launcher under torchrun
        run_script(argv[0], argv[1:])
        return 0
    parser = argparse.ArgumentParser(
        prog="ordmoe-megatron-lm-cpu",
        description="Run a Megatron-LM training script on the CPU under torchrun --standalone.",
    )
    parser.add_argument("--nproc-per-node", type=int, default=1, help="ranks (processes) to start (default 1)")
    parser.add_argument(
        "--megatron-lm", default=None, help="Megatron-LM checkout (default: MEGATRON_LM_PATH, else SCRIPT's checkout)"
    )
    parser.add_argument("script", help="pretrain_gpt.py of a Megatron-LM checkout, or examples/pretrain_gpt_ordmoe.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's flags")
    args = parser.parse_args(argv)
    if args.nproc_per_node < 1:
        parser.error(f"--nproc-per-node {args.nproc_per_node} must be >= 1")
    if not os.path.isfile(args.script):
        parser.error(f"{args.script}: no such file")
    env = launch_env(megatron_lm_checkout(args.script, args.megatron_lm))
    return subprocess.run(launch_command(args.script, args.args, args.nproc_per_node), env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
