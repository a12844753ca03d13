"""OrdMoE language models inside Megatron-Core's LLaVAModel and MimoModel."""

import functools

import pytest
import torch

from ordmoe_megatron import OrdMoEConfig
from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.runtime import compat
from tests.support import BATCH, IMAGE_SEQ, SEQ, llava_forward, run_on_ranks, tiny_image_batch, tiny_llava

COMBINED = SEQ - 1 + IMAGE_SEQ  # the image token becomes IMAGE_SEQ embeddings


def test_llava_with_one_tier_equals_plain_llava(megatron_single_process):
    plain = tiny_llava()
    single = tiny_llava(OrdMoEConfig(num_tiers=1))
    assert plain.state_dict().keys() == single.state_dict().keys()
    b = tiny_image_batch()
    out_plain, mask_plain = llava_forward(plain, b)
    out_single, mask_single = llava_forward(single, b)
    assert out_plain.shape == (BATCH, COMBINED)
    assert torch.equal(out_plain, out_single) and torch.equal(mask_plain, mask_single)
    out_plain.sum().backward()
    out_single.sum().backward()
    for (name, p), q in zip(plain.named_parameters(), single.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_llava_runs_the_vision_encoder_once_for_all_fused_paths(megatron_single_process):
    model = tiny_llava(OrdMoEConfig(num_tiers=3))
    calls = []
    model.vision_model.register_forward_hook(lambda *a: calls.append(1))
    b = tiny_image_batch(1)
    fused, mask = llava_forward(model, b)
    assert len(calls) == 1
    assert fused.shape == (3 * BATCH, COMBINED) and mask.shape == (BATCH, COMBINED)
    # The image positions are out of the loss (LLaVA zeroes them), the text positions keep theirs.
    assert mask[:, :IMAGE_SEQ].sum() == 0 and mask.sum() > 0
    for j in range(3):
        model.language_model.set_path_tiers([j])
        alone, _ = llava_forward(model, b)
        torch.testing.assert_close(fused[j * BATCH : (j + 1) * BATCH], alone, atol=1e-6, rtol=1e-5)
    model.language_model.set_path_tiers([0, 1, 2])
    assert not torch.allclose(fused[:BATCH], fused[2 * BATCH :])


def _llava_step(model, cfg, batches):
    """One OrdMoE schedule step of a LLaVA model: the reports and the gradients."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from ordmoe_megatron.mcore.loss import lm_loss
    from ordmoe_megatron.mcore.schedules import get_ordmoe_forward_backward_func

    def forward_step(data_iterator, model):
        output, loss_mask = llava_forward(model, next(data_iterator))
        return output, functools.partial(lm_loss, loss_mask)

    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    model.zero_grad(set_to_none=True)
    model.config.grad_scale_func = lambda loss: loss * 1.0
    reports = get_ordmoe_forward_backward_func(cfg, model.language_model.vocab_size, seed=5, step_fn=lambda: 0)(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=COMBINED,
        micro_batch_size=BATCH,
        forward_only=False,
    )
    return reports, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_llava_sequential_schedule_equals_fused(megatron_single_process):
    batches = [tiny_image_batch(10 + i) for i in range(2)]
    results = {}
    for schedule in ("fused", "sequential"):
        cfg = OrdMoEConfig(num_tiers=3, path_schedule=schedule)
        results[schedule] = _llava_step(tiny_llava(cfg), cfg, batches)
    (fused_reports, fused_grads), (seq_reports, seq_grads) = results["fused"], results["sequential"]
    assert len(seq_reports) == 3 * len(fused_reports)  # one report per (micro-batch, path)
    for key in fused_reports[0]:
        seq_sum, fused_sum = sum(r[key] for r in seq_reports), sum(r[key] for r in fused_reports)
        torch.testing.assert_close(seq_sum, fused_sum, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == seq_grads.keys()
    assert any(name.startswith("vision_model.") for name in fused_grads)  # the encoder trains
    for name in fused_grads:
        torch.testing.assert_close(seq_grads[name], fused_grads[name], rtol=1e-4, atol=1e-6)


def _tiny_mimo(cfg: OrdMoEConfig, **extra):
    """``MimoModel`` whose language model is built from ``ordmoe_language_model_spec`` over
    ``tiny_config(**extra)``."""
    from megatron.core.enums import ModelType
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.mimo import MimoModel, MimoModelConfig

    from ordmoe_megatron.mcore.multimodal import ordmoe_language_model_spec
    from tests.support import VOCAB, tiny_config

    spec = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False, normalization="RMSNorm")
    if extra.get("sequence_parallel"):
        from ordmoe_megatron.runtime.bridges.cpu_emulation import sequence_parallel_layer_spec

        spec = sequence_parallel_layer_spec(spec)
    torch.manual_seed(7)
    mimo = MimoModel(
        MimoModelConfig(
            language_model_spec=ordmoe_language_model_spec(
                cfg, config=tiny_config(**extra), transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ
            )
        )
    )
    mimo.model_type = ModelType.encoder_or_decoder  # as Megatron-LM's get_model sets it
    return mimo


def _mimo_step(model, cfg, batches):
    """One OrdMoE schedule step of a MIMO model, with MIMO's keyword loss mask: the reports."""
    from ordmoe_megatron.mcore.loss import lm_loss
    from ordmoe_megatron.mcore.schedules import get_ordmoe_forward_backward_func
    from tests.support import VOCAB

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output, loss_mask = model(
            batch["tokens"], batch["position_ids"], None, loss_mask=batch["loss_mask"], labels=batch["labels"]
        )
        return output, functools.partial(lm_loss, loss_mask=loss_mask)

    model.zero_grad(set_to_none=True)
    model.config.grad_scale_func = lambda loss: loss * 1.0
    return get_ordmoe_forward_backward_func(cfg, VOCAB, seed=5, step_fn=lambda: 0)(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=False,
    )


def test_mimo_with_an_ordmoe_language_model_spec(megatron_single_process):
    """MimoModel builds the language model from its spec; the schedule finds it there and takes
    MIMO's keyword loss mask."""
    from ordmoe_megatron.mcore.loss import lm_loss
    from ordmoe_megatron.mcore.schedules import get_ordmoe_forward_backward_func
    from tests.support import VOCAB, tiny_batch, tiny_model

    cfg = OrdMoEConfig(num_tiers=3)
    mimo = _tiny_mimo(cfg)
    alone = tiny_model(cfg)
    mimo.language_model.load_state_dict(alone.state_dict())
    b = tiny_batch(4)

    def gpt_forward_step(data_iterator, model):
        batch = next(data_iterator)
        return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]), functools.partial(
            lm_loss, batch["loss_mask"]
        )

    mimo_reports = _mimo_step(mimo, cfg, [b])
    alone.zero_grad(set_to_none=True)
    alone.config.grad_scale_func = lambda loss: loss * 1.0
    gpt_reports = get_ordmoe_forward_backward_func(cfg, VOCAB, seed=5, step_fn=lambda: 0)(
        forward_step_func=gpt_forward_step,
        data_iterator=iter([b]),
        model=[alone],
        num_microbatches=1,
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=False,
    )
    for key in gpt_reports[0]:
        torch.testing.assert_close(mimo_reports[0][key], gpt_reports[0][key], rtol=1e-5, atol=1e-6)
    grads = dict(alone.named_parameters())
    for name, p in mimo.language_model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "field,flag",
    [
        ("pipeline_model_parallel_size", "--pipeline-model-parallel-size"),
        ("context_parallel_size", "--context-parallel-size"),
        ("sequence_parallel", "--sequence-parallel"),
    ],
)
def test_untested_vision_language_layouts_are_refused(megatron_single_process, field, flag):
    from ordmoe_megatron.mcore.multimodal import OrdMoELLaVAModel, ordmoe_language_model_spec
    from tests.support import tiny_config

    config = tiny_config()
    setattr(config, field, True if field == "sequence_parallel" else 2)
    if field == "sequence_parallel" and compat.mimo_shards_sequence_parallel():  # run and tested (below)
        spec = ordmoe_language_model_spec(OrdMoEConfig(num_tiers=3), config=config)
        assert spec.params["scatter_embedding_sequence_parallel"] is False  # MIMO scatters the combined ones
    else:
        with pytest.raises(OrdMoEError, match=flag):
            ordmoe_language_model_spec(OrdMoEConfig(num_tiers=3), config=config)
    with pytest.raises(OrdMoEError, match=flag):  # before LLaVAModel builds anything
        OrdMoELLaVAModel(config, None, ordmoe=OrdMoEConfig(num_tiers=3))


def llava_layout_losses(rank, world_size, layout: dict, checkpoint: str):
    """An OrdMoE LLaVA step in ``layout`` from the weights in ``checkpoint`` (one process writes
    them first), every rank seeing the same micro-batches: the reports."""
    from megatron.core import dist_checkpointing

    from ordmoe_megatron.runtime.distributed import ParallelLayout, init_model_parallel

    init_model_parallel(ParallelLayout(**layout), seed=1234)
    cfg = OrdMoEConfig(num_tiers=3)
    model = tiny_llava(cfg, expert_model_parallel_size=layout.get("expert", 1))
    if world_size == 1:
        dist_checkpointing.save(model.sharded_state_dict(), checkpoint)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), checkpoint))
    reports, _ = _llava_step(model, cfg, [tiny_image_batch(20 + i) for i in range(2)])
    return [{k: v.detach().cpu() for k, v in r.items()} for r in reports]


@pytest.mark.parametrize("layout", [dict(expert=2)], ids=["EP2"])
def test_llava_layouts_reproduce_one_process(layout, tmp_path):
    checkpoint = tmp_path / "start"
    checkpoint.mkdir()
    checkpoint = str(checkpoint)
    (reference,) = run_on_ranks(llava_layout_losses, 1, {}, checkpoint)
    for got in run_on_ranks(llava_layout_losses, 2, layout, checkpoint):
        assert len(got) == len(reference)
        for ref_report, report in zip(reference, got):
            for key, value in ref_report.items():
                torch.testing.assert_close(report[key], value, rtol=1e-5, atol=1e-5)


def test_llava_checkpoint_saves_and_resumes_the_running_means(megatron_single_process, tmp_path):
    """The multimodal checkpoint (megatron-core's dist_checkpointing, as Megatron-LM saves it)
    gives back the weights and, with ranking='average', the language model's running means."""
    from megatron.core import dist_checkpointing

    cfg = OrdMoEConfig(num_tiers=3, ranking="average")
    model = tiny_llava(cfg)
    b = tiny_image_batch(3)
    llava_forward(model, b)  # the running means take this micro-batch
    means = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("score_sum", "score_count"))}
    assert means and all(v.abs().sum() > 0 for v in means.values())
    (tmp_path / "ckpt").mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path / "ckpt"))
    resumed = tiny_llava(cfg, seed=99)  # other weights, empty means
    resumed.load_state_dict(dist_checkpointing.load(resumed.sharded_state_dict(), str(tmp_path / "ckpt")))
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(resumed.state_dict()[key], value), key
    model.eval()
    resumed.eval()
    with torch.no_grad():
        assert torch.equal(llava_forward(model, b)[0], llava_forward(resumed, b)[0])


def mimo_layout_losses(rank, world_size, layout: dict, checkpoint: str):
    """An OrdMoE MIMO step in ``layout`` from the weights in ``checkpoint`` (one process writes
    them first), every rank seeing the same micro-batches: the reports."""
    from megatron.core import dist_checkpointing

    from ordmoe_megatron.runtime.distributed import ParallelLayout, init_model_parallel
    from tests.support import tiny_batch

    init_model_parallel(ParallelLayout(**layout), seed=1234)
    cfg = OrdMoEConfig(num_tiers=3)
    model = _tiny_mimo(
        cfg,
        expert_model_parallel_size=layout.get("expert", 1),
        tensor_model_parallel_size=layout.get("tensor", 1),
        sequence_parallel=layout.get("sequence_parallel", False),
    )
    if world_size == 1:
        dist_checkpointing.save(model.sharded_state_dict(), checkpoint)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), checkpoint))
    reports = _mimo_step(model, cfg, [tiny_batch(30 + i) for i in range(2)])
    return [{k: v.detach().cpu() for k, v in r.items()} for r in reports]


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(dict(expert=2), id="EP2"),
        pytest.param(
            dict(tensor=2, sequence_parallel=True),
            id="TP2-SP",
            marks=pytest.mark.skipif(
                not compat.mimo_shards_sequence_parallel(),
                reason="MimoModel scatters for sequence parallelism from megatron-core 0.19 (refused before)",
            ),
        ),
    ],
)
def test_mimo_layouts_reproduce_one_process(layout, tmp_path):
    checkpoint = tmp_path / "start"
    checkpoint.mkdir()
    checkpoint = str(checkpoint)
    (reference,) = run_on_ranks(mimo_layout_losses, 1, {}, checkpoint)
    got_all = run_on_ranks(mimo_layout_losses, 2, layout, checkpoint)
    for got in got_all:
        assert len(got) == len(reference) == 2
        for ref_report, report in zip(reference, got):
            for key, value in ref_report.items():
                torch.testing.assert_close(report[key], value, rtol=1e-5, atol=1e-5)
