"""Shared fixtures: a single-process Megatron (gloo on CPU, or NCCL when a GPU is present)."""
import pytest
import torch


@pytest.fixture(scope="session")
def megatron_single_process():
    """torch.distributed with world size 1 and Megatron's parallel state (all sizes 1)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from ordmoe_megatron import cpu_emulation

    cpu_emulation.enable()
    if not torch.distributed.is_initialized():
        # No MASTER_PORT in os.environ: subprocesses started by tests would inherit it.
        from ordmoe_megatron.testing import find_free_port

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1
        )
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)
    yield parallel_state


@pytest.fixture(autouse=True)
def fresh_aux_loss_tracker():
    """Megatron keeps a process-wide aux-loss tracker sized by the first model's layer count;
    tests build models of different depths, so each starts with an empty one."""
    yield
    import sys

    moe_utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    if moe_utils is not None:
        moe_utils.get_moe_layer_wise_logging_tracker().clear()
