"""``--preset tiny-vl``: the vision-language model, its data stream and its refusals.

The model is megatron-core's ``LLaVAModel`` (``OrdMoELLaVAModel`` with OrdMoE on, the plain one
with ``--no-ordmoe``): a ``CLIPViTModel`` (local spec, its norms Megatron's ``WrappedTorchNorm``
through ``runtime.bridges``), megatron-core's MLP projector, and the language model the model
flags describe (the preset's tiny MoE). A patch is one grid cell of ``data.vision``'s images, so
an image is ``(IMAGE_SIZE / CELL)^2`` embeddings (the class token dropped).

Training (``vl_stream``) runs the paper's two stages in one run: the first
``--vl-caption-fraction`` of the steps on captions (continued pretraining, every caption token in
the loss), the rest on the questions (fine-tuning, answer-only loss). The held-out stream is the
held-out images' captions, so ``trainer.evaluate_paths`` gives each path's caption perplexity.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.enums import ModelType
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_mlp_module_spec
from megatron.core.models.multimodal.llava_model import LLaVAModel
from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from ordmoe_megatron.data import vision
from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.mcore.flops import gpt_step_flops, ordmoe_run_step_flops
from ordmoe_megatron.mcore.metrics import tier_load_paused
from ordmoe_megatron.mcore.multimodal import OrdMoELLaVAModel, language_model_of
from ordmoe_megatron.runtime import compat
from ordmoe_megatron.runtime.model_flags import normalize_flags, padded_vocab_size


@dataclasses.dataclass(frozen=True)
class VisionEncoderConfig:
    """The preset's ViT (megatron-core ``CLIPViTModel``)."""

    num_layers: int = 1
    """Transformer layers of the ViT."""
    hidden_size: int = 64
    """The ViT's width."""
    num_attention_heads: int = 4
    """The ViT's attention heads."""
    patch_dim: int = vision.CELL
    """Pixels per patch side: one grid cell of the scene."""


VISION = VisionEncoderConfig()


def image_embeddings() -> int:
    """Image positions per sample in the language model (the class token dropped)."""
    return (vision.IMAGE_SIZE // VISION.patch_dim) ** 2


def combined_length(seq_length: int) -> int:
    """Language-model positions of one sample: the image token becomes the image embeddings."""
    return seq_length - 1 + image_embeddings()


def _vit_config(tconfig) -> TransformerConfig:
    vit = TransformerConfig(
        num_layers=VISION.num_layers,
        hidden_size=VISION.hidden_size,
        num_attention_heads=VISION.num_attention_heads,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=True,
        use_cpu_initialization=True,
        tensor_model_parallel_size=tconfig.tensor_model_parallel_size,
        sequence_parallel=False,
    )
    vit.vision_model_type = "clip"  # as Megatron-LM sets it from --vision-model-type
    return vit


def _projection_config(vit: TransformerConfig, tconfig) -> TransformerConfig:
    return dataclasses.replace(vit, hidden_size=tconfig.hidden_size, ffn_hidden_size=2 * tconfig.hidden_size)


def encoder_step_flops(tconfig, sequences: int) -> float:
    """Training FLOPs of the ViT and the projector on ``sequences`` images, with the terms
    ``mcore.flops`` counts a GPT layer with; they run once for all tier paths."""
    vit = _vit_config(tconfig)
    patches = image_embeddings()
    encoder = gpt_step_flops(vit, 0, sequences, patches + 1, output_layer=False)  # + the class token
    projection = _projection_config(vit, tconfig)
    per_token = 2 * projection.ffn_hidden_size * (vit.hidden_size + projection.hidden_size)
    return encoder + 3.0 * per_token * sequences * patches


def vl_step_flops(
    tconfig, vocab_size: int, sequences: int, seq_length: int, ordmoe, shared_prefix_layers: int, micro_batch_size: int
) -> float:
    """A training step of the preset: the language model's paths on the text and image positions,
    and the encoder once (the fused paths share its output) or once per path (sequential)."""
    language = ordmoe_run_step_flops(
        tconfig, vocab_size, sequences, combined_length(seq_length), ordmoe, shared_prefix_layers, micro_batch_size
    )
    sequential = ordmoe is not None and ordmoe.enabled and ordmoe.path_schedule == "sequential"
    return language + (ordmoe.num_tiers if sequential else 1) * encoder_step_flops(tconfig, sequences)


def vl_model(config, tconfig) -> LLaVAModel:
    """The preset's LLaVA model on this rank: OrdMoE's (``config.ordmoe``) or the plain one."""
    f = normalize_flags(config.model_flags)
    vit = _vit_config(tconfig)
    projection = _projection_config(vit, tconfig)
    args = dict(
        language_transformer_config=tconfig,
        language_transformer_layer_spec=get_gpt_layer_local_spec(
            num_experts=f["num_experts"],
            moe_grouped_gemm=False,
            qk_layernorm=f["qk_layernorm"],
            normalization=f["normalization"],
        ),
        language_vocab_size=padded_vocab_size(f, tconfig.tensor_model_parallel_size),
        language_max_sequence_length=combined_length(f["seq_length"]),
        vision_transformer_config=vit,
        vision_transformer_layer_spec=get_vit_layer_with_local_spec(),
        drop_vision_class_token=True,
        vision_projection_config=projection,
        vision_projection_layer_spec=compat.spec_submodules(get_mlp_module_spec(use_te=False)),
        img_h=vision.IMAGE_SIZE,
        img_w=vision.IMAGE_SIZE,
        patch_dim=VISION.patch_dim,
        language_position_embedding_type=f["position_embedding_type"],
        language_rotary_base=f["rotary_base"],
        share_embeddings_and_output_weights=not f["untie_embeddings_and_output_weights"],
        image_token_index=vision.IMAGE_TOKEN,
    )
    model = LLaVAModel(**args) if config.ordmoe is None else OrdMoELLaVAModel(**args, ordmoe=config.ordmoe)
    model.model_type = ModelType.encoder_or_decoder  # as Megatron-LM's get_model sets it
    return model


def caption_micro_batches(config) -> int:
    """Training micro-batches (all data-parallel ranks) on captions before the questions start."""
    steps = round(config.vl_caption_fraction * config.train_iters)
    return steps * (config.global_batch_size // config.micro_batch_size)


def vl_stream(config, data: vision.TinyVLData, split: str, start: int):
    """The preset's micro-batches: training as ``vl_micro_batches`` switches at
    ``caption_micro_batches``; held-out: the held-out captions."""
    train = split == "train"
    return vision.vl_micro_batches(
        data.images[split],
        data.captions[split],
        data.questions[split],
        config.seq_length,
        config.micro_batch_size,
        config.seed + (0 if train else 1),
        caption_micro_batches(config) if train else None,
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


@torch.no_grad()
def answer_accuracy(model, data: vision.TinyVLData, batch: int = 64) -> dict:
    """Per question kind (count, colour, shape), the share of held-out questions whose answer
    path 1 ranks first among that kind's closed answer set (``QUESTIONS``' answers), read from the
    logits at the position after ``Assistant:`` (each answer is one word, one token)."""
    tokenizer = data.tokenizer
    was_training = model.training
    model.eval()
    inner = language_model_of(model)
    saved = inner.path_tiers if inner is not None else None
    if inner is not None:
        inner.set_path_tiers([0])
    device = next(model.parameters()).device
    images = data.images["valid"]
    correct, total = {}, {}
    try:
        for kind, (_, answer_of) in vision.QUESTIONS.items():
            tasks = [t for t in data.tasks if t["task"] == kind]
            choices = sorted({answer_of(s) for s in _all_scenes()})
            choice_ids = torch.tensor([tokenizer.tokenize(c)[0] for c in choices], device=device)
            prompt = [vision.IMAGE_TOKEN] + tokenizer.tokenize(tasks[0]["prompt"])
            for start in range(0, len(tasks), batch):
                chunk = tasks[start : start + batch]
                tokens = torch.tensor([prompt] * len(chunk), device=device)
                positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
                with tier_load_paused([model]):  # evaluation forwards stay out of the training's tier load
                    logits, _ = model(images[[t["image"] for t in chunk]].to(device), tokens, positions, None)
                picked = logits[:, -1, choice_ids].argmax(-1).tolist()
                hits = sum(choices[p] == t["answer"] for p, t in zip(picked, chunk))
                correct[kind] = correct.get(kind, 0) + hits
                total[kind] = total.get(kind, 0) + len(chunk)
    finally:
        if inner is not None:
            inner.set_path_tiers(saved)
        model.train(was_training)
    return {kind: correct[kind] / total[kind] for kind in sorted(total)}


def _all_scenes():
    return [vision.Scene(s, c, tuple(range(n))) for s, c, n in vision._slots()]
