"""The ``--preset tiny-vl`` vision-language model, what a step of it costs, and its held-out
answer accuracy: what the trainer (``train.vision_language``) and the tier report share.

The model is megatron-core's ``LLaVAModel`` (``OrdMoELLaVAModel`` with OrdMoE on, the plain one
without): a ``CLIPViTModel`` (local spec, its norms Megatron's ``WrappedTorchNorm`` through
``runtime.bridges``), megatron-core's MLP projector, and the language model the model flags
describe (the preset's tiny MoE). A patch is one grid cell of ``data.vision``'s images, so an
image is ``(IMAGE_SIZE / CELL)^2`` embeddings (the class token dropped).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.enums import ModelType
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_mlp_module_spec
from megatron.core.models.multimodal.llava_model import LLaVAModel
from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from ordmoe_megatron.data import vision
from ordmoe_megatron.mcore.flops import gpt_step_flops, ordmoe_run_step_flops
from ordmoe_megatron.mcore.metrics import tier_load_paused
from ordmoe_megatron.mcore.multimodal import OrdMoELLaVAModel, language_model_of
from ordmoe_megatron.method import OrdMoEConfig
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
    """Training FLOPs of the ViT and the projector on ``sequences`` images, one pass, with the
    terms ``mcore.flops`` counts a GPT layer with (its causal score term, so the ViT's
    bidirectional scores count half; the patch embedding is left out: small at this size)."""
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


def vl_model(model_flags: dict, tconfig, ordmoe: Optional[OrdMoEConfig]) -> LLaVAModel:
    """The preset's LLaVA model on this rank: OrdMoE's (``ordmoe``) or the plain one (None)."""
    f = normalize_flags(model_flags)
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
    model = LLaVAModel(**args) if ordmoe is None else OrdMoELLaVAModel(**args, ordmoe=ordmoe)
    model.model_type = ModelType.encoder_or_decoder  # as Megatron-LM's get_model sets it
    return model


def vl_forward(model, batch: dict):
    """One micro-batch of the preset through ``model``: the per-token loss of every path and the
    loss mask over the combined (image and text) positions, as ``LLaVAModel`` returns them. It
    gives its language model no padding mask: the routers count every position in the load."""
    return model(
        batch["images"],
        batch["tokens"],
        batch["position_ids"],
        None,
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
    )


@torch.no_grad()
def answer_accuracy(model, data: vision.TinyVLData, batch: int = 64, path: int = 0) -> dict:
    """Per question kind (count, colour, shape), the share of held-out questions whose answer
    the 0-based ``path`` (path 1 by default) ranks first among that kind's closed answer set
    (``QUESTIONS``' answers), read from the logits at the position after ``Assistant:`` (each
    answer is one word, one token)."""
    tokenizer = data.tokenizer
    was_training = model.training
    model.eval()
    inner = language_model_of(model)
    saved = inner.path_tiers if inner is not None else None
    if inner is not None:
        inner.set_path_tiers([path])
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
