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

Packed sequences (THD: ``packed_seq_params.qkv_format == "thd"``, one row ``[t, 1, h]`` of
documents at ``cu_seqlens``): the paths are stacked along the token dimension instead,
``[C*t, 1, h]``, with ``cu_seqlens`` shifted by ``t`` per path (each path's documents are
documents of their own; labels and the padding mask are repeated along the tokens), and the
routers split the paths by token ranges. The model records the micro-batch's document
boundaries (``packed_cu_seqlens``) for the loss, which takes Eq. 7 per document. Refused with
packing: sub-sampled lower paths, and for the fused stack pipeline or sequence parallelism
(the stack is not what their exchanges and splits assume); the sequential schedule runs them.
"""

from __future__ import annotations

import dataclasses
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
from ordmoe_megatron.runtime.packed_attention import packed_boundaries


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
        # Packed sequences: the last forward's document boundaries (None: not packed), and the
        # packed-sequence parameters of the paths stacked along the tokens (the fan-out hook).
        self.packed_cu_seqlens: Optional[torch.Tensor] = None
        self._stacked_packed = None
        for layer in self.decoder.layers:
            if self.fanout_layer is not None and layer.layer_number > self.fanout_layer:
                layer.register_forward_pre_hook(self._packed_after_fanout, with_kwargs=True)
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
        if self._stacked_packed is not None:
            kwargs["hidden_states"] = self.stack_paths(kwargs["hidden_states"], dim=0)
            kwargs["padding_mask"] = self.stack_paths(kwargs.get("padding_mask"), dim=1)
            kwargs["packed_seq_params"] = self._stacked_packed
            return args, kwargs
        kwargs["hidden_states"] = self.stack_paths(kwargs["hidden_states"], dim=1)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape[0] > 1:
            kwargs["attention_mask"] = self.stack_paths(mask, dim=0)
        kwargs["padding_mask"] = self.stack_paths(kwargs.get("padding_mask"), dim=0)
        return args, kwargs

    def _packed_after_fanout(self, module, args, kwargs):
        # Layers after the fan-out layer get the block's packed-sequence parameters of one path.
        if self._stacked_packed is not None:
            kwargs["packed_seq_params"] = self._stacked_packed
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
        packed_seq_params=None,
        **kwargs,
    ):
        packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        self.packed_cu_seqlens = packed_boundaries(packed_seq_params) if packed else None
        self._stacked_packed = None
        for router in self.tier_routers():
            router.token_stacked = packed
        if packed:
            return self._packed_forward(
                input_ids,
                position_ids,
                attention_mask,
                decoder_input,
                labels,
                *args,
                padding_mask=padding_mask,
                packed_seq_params=packed_seq_params,
                **kwargs,
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
            input_ids,
            position_ids,
            attention_mask,
            decoder_input,
            labels,
            *args,
            padding_mask=padding_mask,
            packed_seq_params=packed_seq_params,
            **kwargs,
        )

    def _packed_forward(
        self,
        input_ids,
        position_ids,
        attention_mask,
        decoder_input,
        labels,
        *args,
        padding_mask,
        packed_seq_params,
        **kwargs,
    ):
        """The THD forward: one path as Megatron runs it, or the paths stacked along the tokens."""
        if self.path_rows is not None:
            raise OrdMoEError(
                "--ordmoe-lower-path-fraction below 1 with packed sequences: the lower paths sub-sample rows, "
                "and a packed micro-batch is one row; use a fraction of 1"
            )
        if self.num_paths > 1:
            c = self.config
            if c.pipeline_model_parallel_size > 1 or c.sequence_parallel or c.context_parallel_size > 1:
                raise OrdMoEError(
                    "packed sequences with the fused path schedule and pipeline, sequence or context "
                    "parallelism: the paths' stack along the tokens is not what their exchanges and splits "
                    "assume; use --ordmoe-path-schedule sequential"
                )
            if attention_mask is not None:
                raise OrdMoEError("packed sequences take no attention mask (the documents' boundaries are the mask)")
            length = labels.shape[-1] if labels is not None else input_ids.shape[-1]
            self._stacked_packed = _stack_packed(packed_seq_params, self.num_paths, length)
            labels = self.stack_paths(labels, dim=1)
            if self.fanout_layer is None:
                if self.pre_process:
                    if decoder_input is None:
                        decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)
                    decoder_input = self.stack_paths(decoder_input, dim=0)
                padding_mask = self.stack_paths(padding_mask, dim=1)
                packed_seq_params = self._stacked_packed
        return super().forward(
            input_ids,
            position_ids,
            attention_mask,
            decoder_input,
            labels,
            *args,
            padding_mask=padding_mask,
            packed_seq_params=packed_seq_params,
            **kwargs,
        )

    def _scatter_padding_mask(self, padding_mask):
        # GPTModel scatters the padding mask for sequence parallelism only when it embeds the
        # input itself; we embed here (to fan out), so we do the same.
        if padding_mask is None or not self.config.sequence_parallel:
            return padding_mask
        scattered = tensor_parallel.scatter_to_sequence_parallel_region(padding_mask.transpose(0, 1).contiguous())
        return scattered.transpose(0, 1).contiguous()


def _stack_packed(params, paths: int, length: int):
    """``params`` for ``paths`` copies of a packed row of ``length`` tokens, stacked along the
    tokens: every ``cu_seqlens`` repeated, shifted by ``length`` per path; maximum lengths kept."""

    def stacked(cu):
        if cu is None:
            return None
        # A row padded past its last document: the padding becomes a document of its own.
        head = cu[1:] if int(cu[-1]) == length else cu
        return torch.cat(
            [cu if int(cu[-1]) == length else torch.cat([cu, cu.new_tensor([length])])]
            + [head + j * length for j in range(1, paths)]
        )

    fields = ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded")
    return dataclasses.replace(params, **{name: stacked(getattr(params, name)) for name in fields})
