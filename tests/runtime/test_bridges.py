"""The CPU emulation layer runs real megatron-core MoE code paths on gloo.

Every multi-rank layout (EP=2, PP=2 with 1F1B, TP=2 + sequence parallel, EP=2 x TP=2 + SP on
4 ranks) loads the weights of one single-process reference model, sharded by hand, runs one
Megatron forward/backward step through ``get_forward_backward_func`` with Megatron's DDP wrapper
and ``finalize_model_grads``, and must reproduce the reference per-microbatch losses and
(sharded) gradients; the EP=2 run also takes a Megatron optimizer step whose global grad norm
must be the reference's. A wrong device mapping, split size, RNG fork, p2p transfer, all-to-all,
uneven gather or SP grad reduction changes those numbers.

All Megatron work happens in spawned processes (``run_on_ranks``), never in the pytest process.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.support import cpu_env, run_on_ranks

SEED = 1234
VOCAB, SEQ, MBS = 64, 16, 2
NUM_MICROBATCHES = 4  # per data-parallel rank when DP=2, all of them when DP=1
NUM_EXPERTS = 4


# ------------------------------------------------------------------------------------------
# helpers that run inside the spawned ranks
# ------------------------------------------------------------------------------------------
def _data(total_microbatches: int) -> torch.Tensor:
    """Deterministic token batches [num_microbatches, MBS, SEQ], independent of Megatron's RNG."""
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (total_microbatches, MBS, SEQ), generator=gen)


def _build(tp=1, pp=1, ep=1, sp=False, ddp_config=None):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from ordmoe_megatron.runtime.bridges import sequence_parallel_layer_spec
    from ordmoe_megatron.runtime.distributed import ParallelLayout, init_model_parallel

    init_model_parallel(ParallelLayout(tensor=tp, pipeline=pp, expert=ep), seed=SEED)
    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        num_moe_experts=NUM_EXPERTS,
        moe_router_topk=2,
        moe_token_dispatcher_type="alltoall",
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        sequence_parallel=sp,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Megatron (any device) cannot add an expert bias in place when expert-TP is 1.
        add_bias_linear=False,
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )
    config.finalize_model_grads_func = finalize_model_grads
    spec = get_gpt_layer_local_spec(num_experts=NUM_EXPERTS, moe_grouped_gemm=False)
    if sp:
        spec = sequence_parallel_layer_spec(spec)
    model = GPTModel(
        config,
        spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        share_embeddings_and_output_weights=True,  # PP: embedding-group all-reduce
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )
    ddp = DistributedDataParallel(config, ddp_config or DistributedDataParallelConfig(), model)
    return config, model, ddp


def _global_view(model, name: str, local_shape):
    """Map a local parameter to (global name, slicer that cuts its shard out of the full tensor)."""
    from megatron.core import parallel_state as ps

    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if m:  # PP: local layer index -> global (layer_number is 1-based and global)
        layer = model.decoder.layers[int(m.group(1))]
        name = f"decoder.layers.{layer.layer_number - 1}.{m.group(2)}"
    m = re.match(r"(.*\.local_experts\.)(\d+)(\..*)", name)
    if m:  # EP: local expert index -> global
        local = int(m.group(2))
        per_rank = NUM_EXPERTS // ps.get_expert_model_parallel_world_size()
        offset = ps.get_expert_model_parallel_rank() * per_rank
        name = f"{m.group(1)}{offset + local}{m.group(3)}"
    if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
        name = "embedding.word_embeddings.weight"  # tied copy on the last pipeline stage
    is_expert = ".experts." in name
    tp_rank = ps.get_expert_tensor_parallel_rank() if is_expert else ps.get_tensor_model_parallel_rank()

    def shard(full: torch.Tensor) -> torch.Tensor:
        if tuple(full.shape) == tuple(local_shape):
            return full
        (dim,) = [d for d, (a, b) in enumerate(zip(full.shape, local_shape)) if a != b]
        return full.narrow(dim, tp_rank * local_shape[dim], local_shape[dim])

    return name, shard


def _fwd_bwd(config, ddp, batches):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    positions = torch.arange(SEQ).unsqueeze(0).expand(MBS, -1)

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        return loss, {"loss": loss.detach().clone()}  # Megatron divides `loss` in place

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        return model(tokens, positions, None, labels=tokens), loss_func

    ddp.zero_grad_buffer()
    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(list(batches)),
        model=[ddp],
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=MBS,
        forward_only=False,
    )
    return [float(o["loss"]) for o in out]  # empty except on the last pipeline stage


def _reference(rank, world_size):
    """1 process: full model, all 2*NUM_MICROBATCHES microbatches. Also checks RNG determinism."""
    # Same seed -> same weights: model init goes through the emulated CUDA RNG tracker.
    _, first, _ = _build()
    config, model, ddp = _build()  # re-initializes the parallel state; train this one
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    same_init = state.keys() == {k for k, v in first.state_dict().items() if isinstance(v, torch.Tensor)} and all(
        torch.equal(state[k], v) for k, v in first.state_dict().items() if k in state
    )
    losses = _fwd_bwd(config, ddp, _data(2 * NUM_MICROBATCHES))
    grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
    return {"state": state, "losses": losses, "grads": grads, "same_init": same_init}


def _layout(rank, world_size, layout, ref, optimizer_step=False):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    config, model, ddp = _build(**layout)
    views = {n: _global_view(model, n, p.shape) for n, p in model.named_parameters()}
    local = model.state_dict()
    for n, v in local.items():
        if isinstance(v, torch.Tensor):
            g, shard = _global_view(model, n, v.shape)
            local[n] = shard(ref["state"][g])
    model.load_state_dict(local, strict=True)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    batches = _data(2 * NUM_MICROBATCHES)  # what the reference ran
    assert dp_size in (1, 2)
    mine = batches[dp_rank * NUM_MICROBATCHES : (dp_rank + 1) * NUM_MICROBATCHES] if dp_size == 2 else batches
    losses = _fwd_bwd(config, ddp, mine)

    max_err, finite = 0.0, True
    for n, p in model.named_parameters():
        g, shard = views[n]
        finite &= bool(torch.isfinite(p.main_grad).all())
        max_err = max(max_err, float((p.main_grad - shard(ref["grads"][g])).abs().max()))

    grad_norm = None
    if optimizer_step:  # Megatron's optimizer: type checks, grad-norm all-reduce over gloo
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1e9), [ddp])
        ok, grad_norm, _ = opt.step()
        assert ok

    # RNG forking: the model-parallel stream differs per TP rank, the default one does not.
    with get_cuda_rng_tracker().fork():
        tp_draw = torch.rand(4)
    return {
        "losses": losses,
        "grad_norm": grad_norm,
        "dp_rank": dp_rank,
        "dp_size": dp_size,
        "last_stage": ps.is_pipeline_last_stage(),
        "grad_max_err": max_err,
        "grads_finite": finite,
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "tp_draw": tp_draw,
        "default_draw": torch.rand(4),
    }


# ------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------
def _python(code: str) -> subprocess.CompletedProcess:
    """The emulation is for machines without CUDA: on the CPU by design, on a GPU machine too."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, env=cpu_env()
    )


def test_enable_is_a_noop_when_cuda_is_available():
    proc = _python("""
        import torch
        torch.cuda.is_available = lambda: True
        before = (torch.cuda.Stream, torch.cuda.current_device, torch.cuda.get_rng_state)
        from ordmoe_megatron.runtime import bridges
        bridges.enable()
        assert (torch.cuda.Stream, torch.cuda.current_device, torch.cuda.get_rng_state) == before
        assert not torch.overrides._get_current_function_mode_stack()
        assert not bridges.is_enabled()
        print("OK")
    """)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr


def test_enable_is_idempotent_and_maps_cuda_to_cpu():
    proc = _python("""
        import torch
        from ordmoe_megatron.runtime import bridges
        import megatron.core.tensor_parallel.random as mrandom
        bridges.enable()
        patched = (torch.cuda.Stream, torch.cuda.current_device, mrandom._get_cuda_rng_state)
        depth = len(torch.overrides._get_current_function_mode_stack())
        bridges.enable()
        again = (torch.cuda.Stream, torch.cuda.current_device, mrandom._get_cuda_rng_state)
        assert again == patched
        assert len(torch.overrides._get_current_function_mode_stack()) == depth == 1
        assert bridges.is_enabled()
        x = torch.zeros(3, device="cuda")
        assert x.device.type == "cpu"
        assert torch.ones(2, device=torch.cuda.current_device()).device.type == "cpu"
        assert x.cuda() is x and x.to("cuda:0").device.type == "cpu"
        assert x.type() == "torch.cuda.FloatTensor"
        s = torch.cuda.Stream(); e = s.record_event(); e.synchronize()
        assert torch.cuda.current_stream() == s
        torch.cuda.manual_seed(5); a = torch.rand(3)
        torch.cuda.manual_seed(5); assert torch.equal(a, torch.rand(3))

        import threading
        seen = []
        def other_thread():  # the device mode is per thread: another thread enables it itself
            seen.append(bridges.is_enabled())
            bridges.enable()
            seen.append(torch.empty(1, device="cuda").device.type)
        t = threading.Thread(target=other_thread); t.start(); t.join()
        assert seen == [False, "cpu"], seen
        print("OK")
    """)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def reference():
    (ref,) = run_on_ranks(_reference, 1)
    return ref


def test_single_process_forward_backward(reference):
    assert reference["same_init"]
    losses = torch.tensor(reference["losses"])
    assert len(losses) == 2 * NUM_MICROBATCHES and torch.isfinite(losses).all()
    assert abs(losses.mean().item() - torch.log(torch.tensor(float(VOCAB))).item()) < 0.5
    grads = reference["grads"]
    assert all(torch.isfinite(g).all() for g in grads.values())
    expert_grads = [g for n, g in grads.items() if ".local_experts." in n]
    assert len(expert_grads) == 2 * NUM_EXPERTS * 2 and all(g.abs().sum() > 0 for g in expert_grads)


def _check_layout(results, reference, tol=1e-5):
    ref_losses = reference["losses"]
    for r in results:
        assert r["grads_finite"]
        assert r["grad_max_err"] < tol, r["grad_max_err"]
        if r["last_stage"]:
            start = r["dp_rank"] * NUM_MICROBATCHES if r["dp_size"] > 1 else 0
            expected = ref_losses[start : start + len(r["losses"])]
            assert len(r["losses"]) == len(expected) > 0
            assert max(abs(a - b) for a, b in zip(r["losses"], expected)) < tol
        else:
            assert r["losses"] == []


def test_expert_parallel_2_matches_single_process(reference):
    results = run_on_ranks(_layout, 2, dict(ep=2), reference, optimizer_step=True)
    _check_layout(results, reference)
    assert [r["dp_rank"] for r in results] == [0, 1]  # dense part is data-parallel
    # The optimizer's global grad norm (all-reduced over the EP ranks' expert shards) is the
    # reference model's.
    ref_norm = torch.stack([g.norm() for g in reference["grads"].values()]).norm().item()
    for r in results:
        assert abs(r["grad_norm"] - ref_norm) < 1e-5 * max(1.0, ref_norm)


def test_expert_and_tensor_parallel_2x2_uneven_splits(reference):
    """EP=2 x TP=2 + SP on 4 ranks: the dispatcher all-gathers uneven token counts over the
    expert-TP group, which gloo can only do through the padding bridge."""
    results = run_on_ranks(_layout, 4, dict(tp=2, ep=2, sp=True), reference)
    _check_layout(results, reference)
    assert sorted(r["dp_rank"] for r in results) == [0, 0, 1, 1]


def test_pipeline_parallel_2_1f1b_matches_single_process(reference):
    results = run_on_ranks(_layout, 2, dict(pp=2), reference)
    _check_layout(results, reference)
    assert [r["last_stage"] for r in results] == [False, True]


def test_tensor_parallel_2_sequence_parallel_matches_single_process(reference):
    results = run_on_ranks(_layout, 2, dict(tp=2, sp=True), reference)
    _check_layout(results, reference)
    r0, r1 = results
    assert (r0["tp_rank"], r1["tp_rank"]) == (0, 1)
    assert not torch.equal(r0["tp_draw"], r1["tp_draw"])  # per-TP-rank RNG stream
    assert torch.equal(r0["default_draw"], r1["default_draw"])  # shared default stream


def test_rank_failure_is_reported_with_traceback():
    with pytest.raises(RuntimeError, match=r"rank 1 failed:(.|\n)*ZeroDivisionError"):
        run_on_ranks(_fail_on_rank_1, 2, timeout=120)


def _fail_on_rank_1(rank, world_size):
    if rank == 1:
        raise ZeroDivisionError("rank 1 fails on purpose")
    torch.distributed.barrier()  # rank 0 hangs here until the parent kills it
    return rank
