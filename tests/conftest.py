"""Shared fixtures: a single-process Megatron (gloo on CPU, or NCCL when a GPU is present)."""

import pytest
from megatron.core import parallel_state

from ordmoe_megatron.runtime.distributed import init_distributed
from tests.support import reset_moe_aux_losses


@pytest.fixture(scope="session")
def megatron_single_process():
    """torch.distributed with world size 1 and Megatron's parallel state (all sizes 1)."""
    init_distributed(seed=1234)
    yield parallel_state


@pytest.fixture(autouse=True)
def fresh_aux_loss_tracker():
    """Megatron keeps a process-wide aux-loss tracker sized by the first model's layer count;
    tests build models of different depths, so each starts with an empty one."""
    yield
    reset_moe_aux_losses()
