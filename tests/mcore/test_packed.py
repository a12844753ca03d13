"""Packed sequences (THD): the paths stacked along the tokens, Eq. 7 per packed document. A packed
micro-batch gives the loss, reports and gradients of its documents unpacked (one per row), fused
and sequential; one tier is plain Megatron on the same packed batch."""

import dataclasses
import functools

import pytest
import torch

from ordmoe_megatron import OrdMoEConfig
from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.mcore.loss import lm_loss
from ordmoe_megatron.runtime.packed_attention import block_causal_mask
from tests.support import (
    SEQ,
    moe_aux_loss_values,
    ordmoe_schedule_step,
    packed_batch,
    reset_moe_aux_losses,
    tiny_batches,
    tiny_model,
)


def _documents(count=2, seed=3):
    batches = tiny_batches(count, seed=seed)
    batches[0]["loss_mask"][1] = 0.0  # a document without answer tokens: no response
    return batches


def _summed(reports):
    return {k: sum(r[k] for r in reports) for k in reports[0]}


def _assert_same(a_reports, a_grads, b_reports, b_grads):
    for key, value in _summed(a_reports).items():
        torch.testing.assert_close(_summed(b_reports)[key], value, rtol=1e-5, atol=1e-6)
    assert a_grads.keys() == b_grads.keys()
    for name, grad in a_grads.items():
        torch.testing.assert_close(b_grads[name], grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item())


@pytest.mark.parametrize(
    "schedule,objective,extra",
    [
        ("fused", "advantage", {}),
        ("sequential", "advantage", {}),
        ("fused", "plackett-luce", {"moe_layer_freq": [0, 1, 1]}),  # lazy fan-out before layer 2
        ("sequential", "pairwise-logistic", {}),
    ],
)
def test_packed_batch_gives_the_unpacked_loss_and_gradients(megatron_single_process, schedule, objective, extra):
    model = tiny_model(OrdMoEConfig(num_tiers=3), packed=True, **extra)
    floor = "vocab" if objective == "advantage" else None  # a floor is the advantage objective's
    cfg = OrdMoEConfig(num_tiers=3, objective=objective, path_schedule=schedule, logprob_floor=floor)
    assert (model.fanout_layer == 2) == ("moe_layer_freq" in extra)
    documents = _documents()
    rows_reports, rows_grads = ordmoe_schedule_step(model, cfg, documents)
    packed_reports, packed_grads = ordmoe_schedule_step(model, cfg, [packed_batch(b) for b in documents])
    _assert_same(rows_reports, rows_grads, packed_reports, packed_grads)
    # The rank loss counts responses: the document without answer tokens is left out.
    assert _summed(packed_reports)["rank loss"][1].item() == 4 * 2 - 1
    assert any(grad.abs().max() > 0 for name, grad in packed_grads.items() if "router" in name)


@pytest.mark.one_version  # also implied: packed = rows for each schedule, rows fused = sequential
def test_fused_and_sequential_agree_on_packed_batches(megatron_single_process):
    model = tiny_model(OrdMoEConfig(num_tiers=3), packed=True)
    documents = [packed_batch(b) for b in _documents(seed=8)]
    fused = ordmoe_schedule_step(model, OrdMoEConfig(num_tiers=3), documents)
    sequential = ordmoe_schedule_step(model, OrdMoEConfig(num_tiers=3, path_schedule="sequential"), documents)
    _assert_same(*fused, *sequential)


def test_one_tier_is_plain_megatron_on_a_packed_batch(megatron_single_process):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    documents = [packed_batch(b) for b in _documents(seed=5)]
    single = tiny_model(OrdMoEConfig(num_tiers=1), packed=True)
    reports, grads = ordmoe_schedule_step(single, OrdMoEConfig(num_tiers=1), documents)
    plain = tiny_model(packed=True)
    plain.zero_grad(set_to_none=True)
    plain.config.grad_scale_func = lambda loss: loss * 1.0

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(b["tokens"], b["position_ids"], None, labels=b["labels"], packed_seq_params=b["packed_seq_params"])
        return out, functools.partial(lm_loss, b["loss_mask"])

    plain_reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(documents),
        model=[plain],
        num_microbatches=len(documents),
        seq_length=documents[0]["tokens"].shape[1],
        micro_batch_size=1,
        forward_only=False,
    )
    plain_grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    _assert_same(plain_reports, plain_grads, reports, grads)


def megatron_lm_sft_batch(batch: dict) -> dict:
    """``batch``'s rows as Megatron-LM core_v0.19's ``--sft`` micro-batch: each row a sample of two
    conversations (the first 5 tokens, the next 4), the last one extended over the row's padding
    (``SFTDataset``: padding masked, its positions counting on), the prompt's first tokens masked;
    the samples flattened into one THD row (``flatten_batch_for_packed_sequences``) with
    ``tokens_per_sample`` where megatron-core has it (0.19: ``TransformerLayer`` then un-flattens
    the row to ``[tokens_per_sample, samples, h]`` before each MoE layer)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    rows, seq = batch["tokens"].shape
    first, second = 5, 4
    loss_mask = batch["loss_mask"].clone()
    loss_mask[:, first + second :] = 0.0  # padding
    loss_mask[:, [0, first]] = 0.0  # a prompt token of each conversation
    positions = torch.cat([torch.arange(first), torch.arange(seq - first)]).to(batch["tokens"].device)
    per_sample = torch.tensor([first, seq], dtype=torch.int32, device=batch["tokens"].device)
    cu = torch.cat([per_sample.new_zeros(1)] + [per_sample + r * seq for r in range(rows)])
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=seq, max_seqlen_kv=seq)
    if "tokens_per_sample" in {f.name for f in dataclasses.fields(PackedSeqParams)}:
        params.tokens_per_sample = seq
    sample = dict(batch, loss_mask=loss_mask, position_ids=positions.expand(rows, -1))
    return dict({k: v.reshape(1, -1) for k, v in sample.items()}, packed_seq_params=params)


@pytest.mark.parametrize("extra", [{}, {"moe_layer_freq": [0, 1, 1]}])  # lazy fan-out before layer 2
def test_megatron_lm_sft_batches_fused_equal_sequential_and_one_tier(megatron_single_process, extra):
    """Megatron-LM's --sft micro-batch (several samples in one row, ``tokens_per_sample``): the
    fused stack gives the sequential schedule's reports and gradients, and its path 1 the one-tier
    run's LM loss and load-balancing loss (measured before the fix: the routers split the paths
    by token ranges of the un-flattened ``[tokens_per_sample, C * samples, h]``, mixing them)."""
    documents = [megatron_lm_sft_batch(b) for b in _documents(seed=11)]
    assert documents[0]["tokens"].shape == (1, 4 * SEQ)
    runs = {}
    for name, cfg in {
        "fused": OrdMoEConfig(num_tiers=3),
        "sequential": OrdMoEConfig(num_tiers=3, path_schedule="sequential"),
        "one tier": OrdMoEConfig(num_tiers=1),
    }.items():
        reset_moe_aux_losses()
        model = tiny_model(OrdMoEConfig(num_tiers=cfg.num_tiers), packed=True, **extra)
        reports, grads = ordmoe_schedule_step(model, cfg, documents)
        runs[name] = reports, grads, moe_aux_loss_values()["load_balancing_loss"].clone()
    _assert_same(*runs["fused"][:2], *runs["sequential"][:2])
    fused, one = _summed(runs["fused"][0]), _summed(runs["one tier"][0])
    torch.testing.assert_close(fused["lm loss"], one["lm loss"], rtol=1e-6, atol=1e-7)
    for name in ("fused", "sequential"):
        torch.testing.assert_close(runs[name][2], runs["one tier"][2], rtol=1e-6, atol=1e-7)
    assert runs["one tier"][2].sum() > 0


def test_sub_sampled_lower_paths_are_refused_with_packing(megatron_single_process):
    model = tiny_model(OrdMoEConfig(num_tiers=3), packed=True)
    cfg = OrdMoEConfig(num_tiers=3, lower_path_fraction=0.5)
    # One row per packed micro-batch: a fraction below 1 of it keeps nothing to sub-sample, so the
    # schedule's rows are drawn from the unpacked layout only; refused on the packed forward.
    documents = [packed_batch(b) for b in tiny_batches(1)]
    documents[0]["tokens"] = documents[0]["tokens"].repeat(2, 1)  # two rows, to have rows to draw
    with pytest.raises(OrdMoEError, match="lower-path-fraction"):
        ordmoe_schedule_step(model, cfg, documents)


def test_block_causal_mask():
    cu = torch.tensor([0, 2, 5])
    mask = block_causal_mask(cu, cu, 6, 6)[0, 0]
    visible = [[0], [0, 1], [2], [2, 3], [2, 3, 4], [5]]  # position 5: past the last document
    for q, keys in enumerate(visible):
        assert (~mask[q]).nonzero().flatten().tolist() == keys
