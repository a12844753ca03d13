"""OrdMoE language models inside Megatron-Core's vision-language models.

The image embeddings enter the language model once, as its ``decoder_input``; only the language
model runs the ``C`` tier paths (``OrdMoEGPTModel`` stacks the combined embeddings path-major),
so the vision encoder and projector run once per micro-batch in the fused schedule. The
sequential schedule runs the whole model once per path: the encoder runs ``C`` times there
(docs/multimodal.md says what that costs).

- ``MimoModel`` builds its language model from a ``ModuleSpec``: ``ordmoe_language_model_spec``
  is that spec for an ``OrdMoEGPTModel``.
- ``LLaVAModel`` builds a plain ``GPTModel`` inline: ``OrdMoELLaVAModel`` builds it, then puts an
  ``OrdMoEGPTModel`` with the same weights in its place (OrdMoE adds no parameters, so a seed
  gives the plain model's weights).

``mcore.schedules`` finds the ``OrdMoEGPTModel`` inside either (``language_model``).
"""

from __future__ import annotations

import inspect

import torch
from megatron.core.models.multimodal.llava_model import LLaVAModel
from megatron.core.transformer.spec_utils import ModuleSpec

from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.mcore.model import OrdMoEGPTModel
from ordmoe_megatron.method import OrdMoEConfig
from ordmoe_megatron.runtime import compat


def ordmoe_language_model_spec(ordmoe: OrdMoEConfig, **gpt_model_params) -> ModuleSpec:
    """``MimoModelConfig.language_model_spec`` for an ``OrdMoEGPTModel`` (``gpt_model_params``
    are ``GPTModel``'s: ``config``, ``transformer_layer_spec``, ``vocab_size``, ...). With
    sequence parallelism MIMO scatters the combined embeddings itself (megatron-core 0.19 on), so
    the language model's embedding must not scatter its text embeddings again."""
    config = gpt_model_params["config"]
    _check_language_config(config, sequence_parallel=compat.mimo_shards_sequence_parallel())
    params = {**gpt_model_params, "ordmoe": ordmoe}
    if config.sequence_parallel:
        params["scatter_embedding_sequence_parallel"] = False
    return ModuleSpec(module=OrdMoEGPTModel, params=params)


class OrdMoELLaVAModel(LLaVAModel):
    """``LLaVAModel`` whose language model is an ``OrdMoEGPTModel``; takes ``LLaVAModel``'s
    arguments plus ``ordmoe``. Its state dict is the plain ``LLaVAModel``'s."""

    def __init__(
        self, language_transformer_config, language_transformer_layer_spec, *args, ordmoe: OrdMoEConfig, **kwargs
    ):
        _check_language_config(language_transformer_config)
        super().__init__(language_transformer_config, language_transformer_layer_spec, *args, **kwargs)
        self.ordmoe = ordmoe
        plain = self.language_model
        if plain is None:  # a pipeline stage without the decoder: nothing to replace
            return
        if type(plain).__name__ != "GPTModel":
            raise OrdMoEError(
                f"OrdMoE: LLaVAModel built a {type(plain).__name__} language model; OrdMoE needs the GPT "
                "language model (drop the hybrid/HF language model options)"
            )
        # The arguments LLaVAModel gave its GPTModel (llava_model.py), read from the same call.
        arg = inspect.signature(LLaVAModel.__init__).bind(
            self, language_transformer_config, language_transformer_layer_spec, *args, **kwargs
        )
        arg.apply_defaults()
        arg = arg.arguments
        ordmoe_model = OrdMoEGPTModel(
            config=language_transformer_config,
            transformer_layer_spec=language_transformer_layer_spec,
            vocab_size=arg["language_vocab_size"],
            max_sequence_length=arg["language_max_sequence_length"],
            parallel_output=arg["parallel_output"],
            position_embedding_type=arg["language_position_embedding_type"],
            rotary_percent=arg["language_rotary_percent"],
            pre_process=self.pre_process,
            post_process=self.post_process,
            rotary_base=arg["language_rotary_base"],
            rope_scaling=arg["language_rope_scaling"],
            rope_scaling_factor=arg["language_rope_scaling_factor"],
            scatter_embedding_sequence_parallel=False,
            share_embeddings_and_output_weights=arg["share_embeddings_and_output_weights"],
            pg_collection=self.pg_collection,
            vp_stage=self.vp_stage,
            ordmoe=ordmoe,
        )
        missing, unexpected = ordmoe_model.load_state_dict(plain.state_dict(), strict=False)
        # The only keys a plain model lacks are the running score means (ranking='average').
        if unexpected or any(not key.endswith(("score_sum", "score_count")) for key in missing):
            raise OrdMoEError(
                f"OrdMoE: the LLaVA language model's weights did not carry over ({missing}, {unexpected})"
            )
        for hook in plain._load_state_dict_post_hooks.values():
            ordmoe_model.register_load_state_dict_post_hook(hook)
        self.language_model = ordmoe_model.to(next(plain.parameters()).device)
        del plain


def _check_language_config(config, sequence_parallel: bool = False) -> None:
    """What the multimodal wrappers cannot run with tier paths, refused before the build
    (``sequence_parallel``: whether this wrapper runs it, tested)."""
    if config.pipeline_model_parallel_size > 1:
        raise OrdMoEError(
            "OrdMoE: a vision-language model with --pipeline-model-parallel-size > 1 is not supported "
            "(the vision encoder's stage runs no tier paths); use tensor, expert or data parallelism"
        )
    if config.sequence_parallel and not sequence_parallel:
        # megatron-core's LLaVAModel runs sequence parallelism only with Transformer Engine's
        # attention, which no machine this project is tested on has: untested, so refused. MIMO
        # before 0.19 does not scatter its combined embeddings.
        raise OrdMoEError(
            "OrdMoE: a vision-language model with --sequence-parallel (and so --tensor-model-parallel-size > 1 "
            "for MoE) is not supported (LLaVAModel needs Transformer Engine's attention for it, MimoModel "
            "megatron-core 0.19 or later); use expert or data parallelism"
        )
    if config.context_parallel_size > 1:
        raise OrdMoEError(
            "OrdMoE: a vision-language model with --context-parallel-size > 1 is not supported; "
            "use --context-parallel-size 1"
        )


def language_model_of(model: torch.nn.Module):
    """The ``OrdMoEGPTModel`` a multimodal model holds, or None."""
    inner = getattr(model, "language_model", None)
    return inner if isinstance(inner, OrdMoEGPTModel) else None
