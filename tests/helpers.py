"""Helpers for tests: the device a single-process test runs on, and ``ordmoe-pretrain`` as a
user runs it (a subprocess on the CPU).

Tests that are CPU by design (gloo processes, bit-for-bit reproducibility on the CPU's kernels)
hide CUDA from their processes with ``cpu_env``, so they test the same thing on a GPU machine.
"""

import json
import os
import subprocess
import sys

import torch

from ordmoe_megatron.runtime.distributed import device


def cpu_env(**extra):
    """The environment of a CPU-by-design subprocess: no CUDA device, and this interpreter's
    console scripts (``ordmoe-pretrain`` under ``torchrun --no-python``) first on PATH."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PATH": path, **extra}


def on_device(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor made on the CPU (for reproducible draws), on the device this process computes on."""
    return tensor.to(device())


def run_pretrain(*args, check=True, env=None):
    """``ordmoe-pretrain`` on the CPU by design: its tests compare runs bit for bit."""
    proc = subprocess.run(
        [sys.executable, "-m", "ordmoe_megatron.train", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=env or cpu_env(),
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ordmoe-pretrain {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(path):
    return [json.loads(line) for line in open(path)]
