"""``OrdMoEGPTModel``: Megatron's ``GPTModel`` that runs all ``C`` tier paths in one forward.

The embedded input ``[s, b, h]`` is repeated path-major into ``[s, C*b, h]`` (path ``j`` owns
batch rows ``j*b .. (j+1)*b-1``); labels and per-sample masks are repeated the same way. Every
layer then processes all paths at once, each MoE layer doing one dispatch and one combine, and
the output is the per-token loss ``[C*b, s]`` (with labels) or logits for every path.
Attention, dense MLPs, embeddings and the output layer are shared weights; rows never mix.

Rows (``set_path_rows``): with several paths, the rows the lower paths run on (sub-sampled
lower paths: ``m`` of the ``b`` rows, so the stack is ``[s, b + (C-1)*m, h]``); with one path
alone (``set_path_tiers([j])``, the sequential schedule), the rows that path runs on.

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

from ordmoe_megatron.errors import OrdMoEError
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
            layer = next(candidate for candidate in self.decoder.layers if candidate.layer_number == self.fanout_layer)
            layer.register_forward_pre_hook(self._fan_out_before_layer, with_kwargs=True)
        self.path_rows: Optional[torch.Tensor] = None
        self.set_path_tiers(list(range(ordmoe.num_tiers)))

    def _lazy_fanout_layer(self) -> Optional[int]:
        """The layer to fan out before, or None to fan out at the embedding."""
        c = self.config
        shared = self.ordmoe.shared_prefix_layers(
            c.num_layers, c.moe_layer_freq, c.pipeline_model_parallel_size > 1, c.recompute_granularity == "full"
        )
        return shared + 1 if shared else None

    def _fan_out_before_layer(self, module, args, kwargs):
        if self.num_paths == 1:
            return None
        kwargs["hidden_states"] = self.stack_paths(kwargs["hidden_states"], dim=1)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape[0] > 1:
            kwargs["attention_mask"] = self.stack_paths(mask, dim=0)
        kwargs["padding_mask"] = self.stack_paths(kwargs.get("padding_mask"), dim=0)
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
            router.path_tiers = [0] if self._before_fanout(router) else self.path_tiers
        self.set_path_rows(self.path_rows)  # the routers' row counts follow the number of paths

    def set_path_rows(self, rows: Optional[torch.Tensor]) -> None:
        """The rows of the micro-batch to run (None: all of them): with several paths, the rows
        of the lower paths (path 1 runs every row); with one path, that path's. Set for each
        micro-batch (``mcore.schedules`` does); the routers learn how many rows each lower path
        has, on every pipeline stage."""
        self.path_rows = rows
        for router in self.tier_routers():
            router.lower_path_rows = None if rows is None or self.num_paths == 1 else len(rows)

    def stack_paths(self, tensor: Optional[torch.Tensor], dim: int) -> Optional[torch.Tensor]:
        """``tensor``'s rows (along ``dim``) for every path, path-major (see ``set_path_rows``)."""
        if tensor is None:
            return None
        rows = self.path_rows
        chosen = tensor if rows is None else tensor.index_select(dim, rows.to(tensor.device))
        if self.num_paths == 1:
            return chosen
        return torch.cat([tensor] + [chosen] * (self.num_paths - 1), dim=dim)

    def _before_fanout(self, router: TierRouter) -> bool:
        return self.fanout_layer is not None and router.layer_number < self.fanout_layer

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
        packed = kwargs.get("packed_seq_params", args[1] if len(args) > 1 else None)  # GPTModel's order
        if packed is not None:
            raise OrdMoEError(
                "packed sequences (packed_seq_params, THD: --sft, --dataloader-inter-document-masking) are "
                "not supported with OrdMoE yet: the rank loss would treat a row of many documents as one "
                "sequence; pass one document per row"
            )
        labels = self.stack_paths(labels, dim=0)
        # Whether this forward's rows differ from the micro-batch's (several paths, or one lower
        # path on sub-sampled rows); the fan-out hook stacks them instead when there is one.
        restacked = self.num_paths > 1 or self.path_rows is not None
        if restacked and (self.fanout_layer is None or self.num_paths == 1):
            if self.pre_process:
                if decoder_input is None:
                    decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)
                    padding_mask = self._scatter_padding_mask(padding_mask)
                decoder_input = self.stack_paths(decoder_input, dim=1)
            padding_mask = self.stack_paths(padding_mask, dim=0)
            if attention_mask is not None and attention_mask.shape[0] > 1:
                attention_mask = self.stack_paths(attention_mask, dim=0)
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
