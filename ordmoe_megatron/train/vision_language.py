"""``--preset tiny-vl``: its data stream and its refusals (its model: ``mcore.tiny_vl``).

Training (``vl_stream``) runs the paper's two stages in one run: the first
``--vl-caption-fraction`` of the steps on captions (continued pretraining, every caption token in
the loss), the rest on the questions (fine-tuning, answer-only loss). The held-out stream is the
held-out images' captions, so ``trainer.evaluate_paths`` gives each path's caption perplexity.
"""

from __future__ import annotations

from ordmoe_megatron.data import vision
from ordmoe_megatron.errors import OrdMoEError


def caption_micro_batches(config) -> int:
    """Training micro-batches (all data-parallel ranks) on captions before the questions start."""
    steps = round(config.vl_caption_fraction * config.train_iters)
    return steps * (config.global_batch_size // config.micro_batch_size)


def vl_stream(config, data: vision.TinyVLData, split: str, start: int):
    """The preset's micro-batches: training as ``vl_micro_batches`` switches at
    ``caption_micro_batches``; held-out: ``vision.held_out_captions``."""
    if split != "train":
        return vision.held_out_captions(data, config.seq_length, config.micro_batch_size, config.seed, start)
    return vision.vl_micro_batches(
        data.images[split],
        data.captions[split],
        data.questions[split],
        config.seq_length,
        config.micro_batch_size,
        config.seed,
        caption_micro_batches(config),
        start,
        pad_id=data.tokenizer.pad,
    )


# What tiny-vl runs, tested: one process, the local layer spec, FP32. Each refusal names the flag.
def check_tiny_vl(config, world: int) -> None:
    """Refuse, before any work, what the preset's vision-language model cannot honour here."""
    f, layout = config.model_flags, config.layout
    refusals = [
        (world > 1, f"{world} processes", "it runs in one process (run it without torchrun)"),
        (layout.tensor > 1, "--tensor-model-parallel-size > 1", "use 1"),
        (
            layout.sequence_parallel,
            "--sequence-parallel",
            "drop it (docs/multimodal.md: untested without Transformer Engine)",
        ),
        (
            layout.pipeline > 1,
            "--pipeline-model-parallel-size > 1",
            "the vision encoder's stage runs no tier paths; use 1",
        ),
        (layout.expert > 1, "--expert-model-parallel-size > 1", "use 1"),
        (config.sft_pack, "--sft-pack", "its rows hold one image each; use --no-sft-pack"),
        (
            bool(config.sft_data or config.data_path or config.mock_data),
            "--sft-data / --data-path / --mock-data",
            "it makes its own images and text; drop them",
        ),
        (config.bf16, "--bf16", "it trains in FP32 (untested in BF16); drop it"),
        (bool(f.get("mtp_num_layers")), "--mtp-num-layers", "LLaVAModel builds no MTP block; drop it"),
        (
            bool(f.get("multi_latent_attention")),
            "--multi-latent-attention",
            "its language model uses the local spec's attention; drop it",
        ),
        (
            f.get("moe_layer_freq") not in (None, 1)
            and not (isinstance(f.get("moe_layer_freq"), list) and all(f["moe_layer_freq"])),
            "--moe-layer-freq with dense layers",
            "every language layer is MoE here; drop it",
        ),
        (not f.get("num_experts"), "--num-experts", "the language model is MoE; give --num-experts"),
        (
            config.ordmoe is not None and config.ordmoe.lower_path_fraction < 1,
            "--ordmoe-lower-path-fraction below 1",
            "untested with the vision-language model; use 1",
        ),
        # vl_model builds its own language spec and LLaVA's RoPE: these model flags would be ignored
        (
            f.get("qk_layernorm_scope", "head") != "head",
            "--qk-layernorm-scope projection",
            "its language spec has per-head q/k norms; drop it",
        ),
        (
            f.get("rotary_percent", 1.0) not in (None, 1.0),
            "--rotary-percent",
            "its RoPE covers every head dim; drop it",
        ),
    ]
    for refused, what, fix in refusals:
        if refused:
            raise OrdMoEError(f"--preset tiny-vl with {what}: not supported; {fix}")
    if not 0.0 <= config.vl_caption_fraction <= 1.0:
        raise OrdMoEError(f"--vl-caption-fraction={config.vl_caption_fraction} must be between 0 and 1")
