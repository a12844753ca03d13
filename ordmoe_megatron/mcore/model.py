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

Multi-token prediction (``mtp_num_layers``): the MTP block and its loss are path 1's alone (the
method's next-token loss is path 1's). On the last stage the stacked hidden states are split:
path 1's rows go through Megatron's own ``_postprocess`` (MTP block, MTP loss, output layer,
loss), the lower paths' rows through the output layer and loss only. The MTP block's layer keeps
Megatron's ``TopKRouter`` (it routes path 1 alone). Without labels (logits: generation, the tier
report) MTP is skipped, as Megatron skips it in inference.
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
        shared = self.ordmoe.shared_prefix_layers_of(self.config)
        return shared + 1 if shared else None

    def _fan_out_before_layer(self, module, args, kwargs):
        if self.num_paths == 1:
            return None
        if self._stacked_packed is not None:
            kwargs["hidden_states"] = self.stack_paths(kwargs["hidden_states"], dim=0)
            kwargs["padding_mask"] = self.stack_paths(kwargs.get("padding_mask"), dim=1)
            kwargs["packed_seq_params"] = self._stacked_packed
            return args, kwargs
        stacked = self.fan_out(kwargs["hidden_states"], kwargs.get("attention_mask"), kwargs.get("padding_mask"))
        kwargs["hidden_states"], kwargs["attention_mask"], kwargs["padding_mask"] = stacked
        return args, kwargs

    def fan_out(self, hidden_states, attention_mask, padding_mask) -> tuple:
        """The inputs of the first fanned-out layer, stacked for every path (the one place they
        are built: at the embedding, or before the lazy fan-out's layer). ``hidden_states`` is
        ``[s, b, h]``; a per-sequence attention mask and the padding mask stack on the batch."""
        if attention_mask is not None and attention_mask.shape[0] > 1:
            attention_mask = self.stack_paths(attention_mask, dim=0)
        return self.stack_paths(hidden_states, dim=1), attention_mask, self.stack_paths(padding_mask, dim=0)

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
            if self.pre_process and decoder_input is None:
                decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)
                padding_mask = self._scatter_padding_mask(padding_mask)
            decoder_input, attention_mask, padding_mask = self.fan_out(decoder_input, attention_mask, padding_mask)
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
            if c.mtp_num_layers:
                raise OrdMoEError(
                    "--mtp-num-layers with packed sequences and the fused path schedule: path 1's MTP rows "
                    "are split off the batch, not the tokens; use --ordmoe-path-schedule sequential"
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

    def _postprocess(self, **kwargs):
        if not self.config.mtp_num_layers or not self.post_process:
            return super()._postprocess(**kwargs)
        hidden, labels = kwargs["hidden_states"], kwargs["labels"]
        if labels is None:  # logits only (generation, the tier report): no MTP loss to attach
            return self._lower_paths_output(hidden, None, kwargs.get("runtime_gather_output"))
        if self.num_paths == 1 and self.path_tiers[0] == 0:
            return super()._postprocess(**kwargs)
        if self.path_tiers[0] != 0:  # one lower path alone (sequential schedule): no MTP
            return self._lower_paths_output(hidden, labels, kwargs.get("runtime_gather_output"))
        rows = hidden.shape[1]
        b = rows // self.num_paths if self.path_rows is None else rows - (self.num_paths - 1) * len(self.path_rows)
        path1 = dict(kwargs, hidden_states=hidden[:, :b], labels=None if labels is None else labels[:b])
        for name in ("attention_mask", "padding_mask", "decoder_input"):
            value = kwargs.get(name)
            dim = 1 if name == "decoder_input" else 0
            if value is not None and value.shape[dim] == rows:  # stacked with the paths: path 1's rows
                path1[name] = value.narrow(dim, 0, b)
        first = super()._postprocess(**path1)
        lower = self._lower_paths_output(
            hidden[:, b:], None if labels is None else labels[b:], kwargs.get("runtime_gather_output")
        )
        return torch.cat([first, lower], dim=0)

    def _lower_paths_output(self, hidden, labels, runtime_gather_output):
        """The output layer and loss of rows without MTP (``GPTModel._postprocess`` without MTP):
        the per-token loss ``[rows, s]``, or the logits ``[rows, s, V]`` without labels."""
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=weight, runtime_gather_output=runtime_gather_output)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)

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
