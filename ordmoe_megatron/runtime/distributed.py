"""The one process bootstrap: ``torch.distributed`` and Megatron's parallel state.

Every front end (``ordmoe-pretrain``, the tier report, conversion, benchmarks) and every test
helper starts its processes here. ``init_process_group`` reads the launcher's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, as ``torchrun`` sets
them; one process when unset), installs the bridges for what the machine lacks (CUDA, Transformer
Engine) and picks NCCL on GPUs and gloo otherwise. ``init_model_parallel`` builds Megatron's
parallel groups for a ``ParallelLayout`` and seeds every generator.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.runtime import bridges, compat

LOOPBACK = "127.0.0.1"


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    """Megatron's model-parallel sizes; the data-parallel size is what the world size leaves."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None  # model chunks per pipeline rank (None: no interleaving)
    expert: int = 1
    expert_tensor: Optional[int] = None  # None: Megatron's default (the tensor size)
    sequence_parallel: bool = False

    def data_parallel_size(self, world_size: int) -> int:
        return max(world_size // (self.tensor * self.pipeline), 1)

    def describe(self, world_size: int) -> str:
        return (
            f"world {world_size} = TP {self.tensor} x PP {self.pipeline} x DP {self.data_parallel_size(world_size)}; "
            f"EP {self.expert}"
            + (f" (expert TP {self.expert_tensor})" if self.expert_tensor else "")
            + (", sequence parallel" if self.sequence_parallel else "")
            + (f", {self.virtual_pipeline} virtual stages per pipeline rank" if self.virtual_pipeline else "")
        )


def find_free_port() -> int:
    """A currently free TCP port on the loopback address (there is an unavoidable small race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def init_process_group(backend: Optional[str] = None, timeout_s: float = 1800.0) -> None:
    """``torch.distributed`` from the launcher's environment (one process on a free loopback port
    when nothing is set). ``backend``: NCCL with CUDA, gloo otherwise, unless given (conversion
    moves CPU tensors only and asks for gloo). Does nothing when a group exists."""
    compat.check_supported()
    bridges.enable()
    if torch.distributed.is_initialized():
        return
    # The address goes in init_method, not os.environ: subprocesses would inherit a port.
    address = os.environ.get("MASTER_ADDR", LOOPBACK)
    port = os.environ.get("MASTER_PORT") or str(find_free_port())
    rank, world = int(os.environ.get("RANK", 0)), world_size_from_env()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group(
        backend,
        init_method=f"tcp://{address}:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def init_model_parallel(layout: ParallelLayout = ParallelLayout(), seed: int = 1234) -> None:
    """Megatron's parallel groups for ``layout`` (replacing earlier ones) and all seeds."""
    if not torch.distributed.is_initialized():
        raise RuntimeError("init_model_parallel: call init_process_group first")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
        expert_model_parallel_size=layout.expert,
        expert_tensor_parallel_size=layout.expert_tensor,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def init_distributed(
    layout: ParallelLayout = ParallelLayout(), seed: int = 1234, backend: Optional[str] = None
) -> None:
    init_process_group(backend)
    init_model_parallel(layout, seed)


def init_single_process(seed: int = 1234, backend: Optional[str] = None) -> None:
    """One process, all parallel sizes 1 (the tier report, conversion); refuses a larger world."""
    if world_size_from_env() != 1 or (torch.distributed.is_initialized() and torch.distributed.get_world_size() != 1):
        raise OrdMoEError("this tool runs in one process (world size 1); do not start it under torchrun")
    init_distributed(ParallelLayout(), seed, backend)


def shutdown() -> None:
    """An orderly end: a process group left to interpreter exit can abort the process
    ("terminate called without an active exception") after a successful run."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_last_rank() -> bool:
    """Megatron-LM logs from the last rank, which holds the last pipeline stage."""
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def data_parallel_rank_and_size() -> tuple[int, int]:
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def broadcast_from_last_stage(values):
    """Loss reports exist on the last pipeline stage only; give every rank the same object."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return values
    box = [values]
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast_object_list(box, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return box[0]


def device() -> torch.device:
    """Where this process computes: its GPU, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
