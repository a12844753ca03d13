"""``OrdMoEGPTModel``: Megatron's ``GPTModel`` that runs all ``C`` tier paths in one forward.

The embedded input ``[s, b, h]`` is repeated path-major into ``[s, C*b, h]`` (path ``j`` owns
batch rows ``j*b .. (j+1)*b-1``); labels and per-sample masks are repeated the same way. Every
layer then processes all paths at once, each MoE layer doing one dispatch and one combine, and
the output is the per-token loss ``[C*b, s]`` (with labels) or logits for every path.
Attention, dense MLPs, embeddings and the output layer are shared weights; rows never mix.

Lazy fan-out: when the first tier-routed layer ``L`` is not layer 1 (dense first layers, or a
partial layer scope), the paths are identical up to ``L``, so the model runs the embedding and
layers ``1..L-1`` once and repeats the hidden states just before layer ``L``. With pipeline
parallelism the fan-out stays at the embedding: every stage must exchange the same activation
shape, and the schedules size their buffers once.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.moe_layer import MoELayer

from ordmoe_megatron.mcore.dispatcher import use_ordmoe_dispatcher
from ordmoe_megatron.mcore.router import TierRouter
from ordmoe_megatron.mcore.specs import ordmoe_layer_spec
from ordmoe_megatron.method import OrdMoEConfig
from ordmoe_megatron.runtime import compat


class OrdMoEGPTModel(GPTModel):
    """``GPTModel`` with OrdMoE tier paths; takes the same arguments plus ``ordmoe``.

    Pass the layer spec you would give ``GPTModel``; its MoE routers become ``TierRouter``s.
    OrdMoE adds no parameters: the state dict is a plain ``GPTModel``'s (plus the running score
    means with ``ranking='average'``).
    """

    def __init__(self, config, transformer_layer_spec, *args, ordmoe: OrdMoEConfig, **kwargs):
        compat.check_supported()
        ordmoe.validate_for_model(config)
        super().__init__(config, ordmoe_layer_spec(transformer_layer_spec, ordmoe), *args, **kwargs)
        self.ordmoe = ordmoe
        for module in self.modules():
            if isinstance(module, MoELayer):
                use_ordmoe_dispatcher(module)
        self.fanout_layer = self._lazy_fanout_layer()
        if self.fanout_layer is not None:
            layer = next(l for l in self.decoder.layers if l.layer_number == self.fanout_layer)
            layer.register_forward_pre_hook(self._fan_out_before_layer, with_kwargs=True)
        self.set_path_tiers(list(range(ordmoe.num_tiers)))

    def _lazy_fanout_layer(self) -> Optional[int]:
        """The layer to fan out before, or None to fan out at the embedding."""
        c = self.config
        shared = self.ordmoe.shared_prefix_layers(c.num_layers, c.moe_layer_freq, c.pipeline_model_parallel_size > 1,
                                                  c.recompute_granularity == "full")
        return shared + 1 if shared else None

    def _fan_out_before_layer(self, module, args, kwargs):
        if self.num_paths == 1:
            return None
        kwargs["hidden_states"] = _repeat_batch(kwargs["hidden_states"], self.num_paths, dim=1)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape[0] > 1:
            kwargs["attention_mask"] = _repeat_batch(mask, self.num_paths, dim=0)
        kwargs["padding_mask"] = _repeat_batch(kwargs.get("padding_mask"), self.num_paths, dim=0)
        return args, kwargs

    def tier_routers(self) -> list[TierRouter]:
        return [m for m in self.modules() if isinstance(m, TierRouter)]

    @property
    def num_paths(self) -> int:
        return len(self.path_tiers)

    def set_path_tiers(self, path_tiers: list[int]) -> None:
        """Which tier each stacked path runs: ``[0, 1, .., C-1]`` trains OrdMoE (the default),
        ``[0]`` is the plain top-K model (generation), ``[j]`` runs tier ``j`` alone."""
        if not path_tiers or any(not 0 <= t < self.ordmoe.num_tiers for t in path_tiers):
            raise ValueError(f"path tiers {path_tiers} must be tier indices 0..{self.ordmoe.num_tiers - 1}")
        self.path_tiers = list(path_tiers)
        for router in self.tier_routers():
            before_fanout = self.fanout_layer is not None and router.layer_number < self.fanout_layer
            router.path_tiers = [0] if before_fanout else self.path_tiers

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        decoder_input: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *args,
        padding_mask: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        paths = self.num_paths
        if paths > 1:
            labels = _repeat_batch(labels, paths, dim=0)
        if paths > 1 and self.fanout_layer is None:
            if self.pre_process:
                if decoder_input is None:
                    decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)
                    padding_mask = self._scatter_padding_mask(padding_mask)
                decoder_input = decoder_input.repeat(1, paths, 1)
            padding_mask = _repeat_batch(padding_mask, paths, dim=0)
            if attention_mask is not None and attention_mask.shape[0] > 1:
                attention_mask = _repeat_batch(attention_mask, paths, dim=0)
        return super().forward(
            input_ids, position_ids, attention_mask, decoder_input, labels, *args, padding_mask=padding_mask, **kwargs
        )

    def _scatter_padding_mask(self, padding_mask):
        # GPTModel scatters the padding mask for sequence parallelism only when it embeds the
        # input itself; we embed here (to fan out), so we do the same.
        if padding_mask is None or not self.config.sequence_parallel:
            return padding_mask
        scattered = tensor_parallel.scatter_to_sequence_parallel_region(padding_mask.transpose(0, 1).contiguous())
        return scattered.transpose(0, 1).contiguous()


def _repeat_batch(tensor: Optional[torch.Tensor], paths: int, dim: int) -> Optional[torch.Tensor]:
    if tensor is None:
        return None
    reps = [1] * tensor.dim()
    reps[dim] = paths
    return tensor.repeat(*reps)
