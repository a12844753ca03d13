"""Megatron-LM core_v0.19: an OrdMoE ``GPTModelConfig``.

From core_v0.19 ``pretrain_gpt.py`` builds the model from a ``GPTModelConfig`` (its ``builder``
class variable names the ``ModelBuilder`` that ``setup_model_and_optimizer`` instantiates), not
from a model provider. ``OrdMoEGPTModelConfig`` is the same configuration plus ``ordmoe``; its
builder is Megatron-LM's ``GPTModelBuilder`` (the layer spec, vocabulary padding, pipeline stages
stay Megatron-LM's) with the module's ``GPTModel`` bound to ``OrdMoEGPTModel`` while it builds.

Imported only on core_v0.19 and later (``hooks.ordmoe_model_config``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import megatron.training.models.gpt as megatron_lm_gpt
from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig

from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.megatron_lm.hooks import gpt_model_bound_to_ordmoe
from ordmoe_megatron.method import OrdMoEConfig


@dataclasses.dataclass(kw_only=True)
class OrdMoEGPTModelConfig(GPTModelConfig):
    builder: ClassVar[str] = "ordmoe_megatron.megatron_lm.model_config.OrdMoEGPTModelBuilder"
    ordmoe: Optional[OrdMoEConfig] = None
    # --sft: micro-batches arrive packed (THD), so a local spec's attention must run them.
    ordmoe_packed: bool = False


class OrdMoEGPTModelBuilder(GPTModelBuilder):
    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None):
        config = self._model_config
        with gpt_model_bound_to_ordmoe(megatron_lm_gpt, config.ordmoe, packed=config.ordmoe_packed):
            return super().build_model(pg_collection, pre_process, post_process, vp_stage)


def ordmoe_gpt_model_config(
    model_config: GPTModelConfig, ordmoe: OrdMoEConfig, packed: bool = False
) -> OrdMoEGPTModelConfig:
    if type(model_config) is not GPTModelConfig:
        raise OrdMoEError(
            f"--ordmoe builds from Megatron-LM's GPTModelConfig, not {type(model_config).__name__} "
            "(ModelOpt's model configuration is not supported with --ordmoe)"
        )
    fields = {f.name: getattr(model_config, f.name) for f in dataclasses.fields(model_config) if f.init}
    return OrdMoEGPTModelConfig(**fields, ordmoe=ordmoe, ordmoe_packed=packed)
