"""Packed sequences (THD): the paths stacked along the tokens, Eq. 7 per packed document. A packed
micro-batch gives the loss, reports and gradients of its documents unpacked (one per row), fused
and sequential; one tier is plain Megatron on the same packed batch."""

import functools

import pytest
import torch

from ordmoe_megatron import OrdMoEConfig
from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.mcore.loss import lm_loss
from ordmoe_megatron.runtime.packed_attention import block_causal_mask
from tests.support import ordmoe_schedule_step, packed_batch, tiny_batches, tiny_model


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
