"""The OrdMoE loss in Megatron's loss-function convention ``(loss, num_tokens, report)``.

``ordmoe_loss`` takes the per-token loss of all paths of a micro-batch (the fused schedule);
``ordmoe_path_loss`` takes one path's (the sequential schedule) and gives it its share of the
same loss, so that the gradients are the fused ones. The returned loss is ``L_NTP`` summed over
path-1 tokens plus the rank-loss term scaled so that Megatron's schedules turn it into
``λ·L_ERL``:

- default: the schedule divides by this micro-batch's token count, so the rank term is
  ``λ · mean_i ERL_i · num_tokens``: the rank loss is the mean over sequences, averaged over
  micro-batches and data-parallel ranks exactly like the LM loss.
- ``calculate_per_token_loss``: Megatron divides by the global token count, so the rank term is
  ``λ · sum_i |m_i| · ERL_i``: each sequence's rank loss weighs by its number of loss tokens,
  as each token does in the LM loss.

Sub-sampled lower paths (``lower_rows``, ``m`` of the ``b`` sequences): the rank loss runs over
those sequences only, scaled by ``b / m``, an unbiased estimate of the full term; the LM loss
keeps every sequence. Every report entry is a ``[numerator, denominator]`` pair, which Megatron
sums over micro-batches and all-reduces over data-parallel ranks before dividing, so logged values
do not depend on the parallel layout; the rank entries count the sub-sampled sequences.

Packed sequences (``cu_seqlens``: documents packed into the one row of a THD micro-batch): a
"sequence" above is one response, a document with answer tokens (``method.response_logprobs``);
a document without any is no sequence. A packed micro-batch then gives the loss of the same
documents unpacked, one per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ordmoe_megatron.method import (
    OrdMoEConfig,
    rank_loss,
    rank_loss_weights,
    response_logprobs,
    sequence_logprobs,
    tier_order_correct,
)


def _pair(numerator: torch.Tensor, denominator) -> torch.Tensor:
    numerator = numerator.detach().float().view(1)
    return torch.cat([numerator, torch.as_tensor(denominator, dtype=torch.float32, device=numerator.device).view(1)])


def lm_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron's plain LM loss (as ``pretrain_gpt.loss_func``): the per-token loss summed over
    the loss mask, the token count, and the ``lm loss`` report. A ``forward_step`` returns
    ``functools.partial(lm_loss, loss_mask)``; the OrdMoE schedules put ``ordmoe_loss`` in its
    place for models with more than one path."""
    mask = loss_mask.reshape(-1).float()
    loss = (output_tensor.float().reshape(-1) * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": _pair(loss, num_tokens)}


def report_keys(num_paths: int) -> list[str]:
    """The loss report's entries for ``num_paths`` paths, in order (Megatron-LM reduces the keys of
    the first micro-batch's report, so every micro-batch reports all of them)."""
    if num_paths == 1:
        return ["lm loss"]
    return ["lm loss", "rank loss"] + [f"path{j + 1} logprob" for j in range(num_paths)] + ["tier order acc"]


def ordmoe_loss(
    loss_mask: torch.Tensor,
    output_tensor: torch.Tensor,
    *,
    ordmoe: OrdMoEConfig,
    num_paths: int,
    vocab_size: int,
    per_token_loss: bool = False,
    lower_rows: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """Loss function of the fused schedule: ``output_tensor`` is the per-token loss
    ``[b + (C-1)*m, s]``, path-major (packed: ``[1, C*s]``); ``lower_rows`` the ``m`` sequences
    of the lower paths (None: all); ``cu_seqlens`` the documents of a packed row (None: not
    packed). Bind everything but ``output_tensor`` with partial."""
    batch, seq = loss_mask.shape[0], loss_mask.shape[-1]
    mask = loss_mask.reshape(batch, seq).float()
    nll = output_tensor.float().reshape(-1, seq)
    lm, num_tokens, report = lm_loss(mask, nll[:batch])
    if num_paths == 1:
        return lm, num_tokens, report

    top, sub_mask = (nll[:batch], mask) if lower_rows is None else (nll[:batch][lower_rows], mask[lower_rows])
    rows = sub_mask.shape[0]
    paths_nll = torch.cat([top, nll[batch:]]).view(num_paths, rows, seq)
    path_logprobs, seq_tokens, n_valid = _sequences(paths_nll, mask, sub_mask, cu_seqlens)
    per_seq_rank = rank_loss(path_logprobs, ordmoe.objective, reduction="none", **ordmoe.objective_kwargs(vocab_size))
    coeffs = _rank_coefficients(seq_tokens, n_valid, batch / rows, num_tokens, ordmoe.rank_loss_coeff, per_token_loss)
    report.update(_rank_report(path_logprobs, per_seq_rank, seq_tokens, per_token_loss))
    return lm + (coeffs * per_seq_rank).sum(), num_tokens, report


def _sequences(paths_nll, mask, sub_mask, cu_seqlens):
    """The rank loss's sequences: ``(logprobs [C, N], loss tokens [N], sequences with loss
    tokens in the whole micro-batch)``; rows, or a packed row's responses (``cu_seqlens``)."""
    if cu_seqlens is None:
        return sequence_logprobs(paths_nll, sub_mask), sub_mask.sum(-1), (mask.sum(-1) > 0).sum().clamp(min=1)
    if mask.shape[0] != 1:
        raise ValueError(f"packed sequences (cu_seqlens) come in one row per micro-batch, got {mask.shape[0]}")
    logprobs, tokens = response_logprobs(-paths_nll, sub_mask, cu_seqlens)
    return logprobs, tokens, torch.tensor(max(tokens.numel(), 1), device=tokens.device)


@dataclass
class MicroBatchPaths:
    """What ``ordmoe_path_loss`` keeps between the paths of one micro-batch, on the last pipeline
    stage: each path's per-sequence log-likelihoods (over the rank loss's sequences) and path 1's
    LM report; for an objective that is not linear in each path, all paths' log-likelihoods from
    a forward-only pre-pass."""

    logprobs: dict = field(default_factory=dict)  # path -> [m], detached
    lm_report: Optional[torch.Tensor] = None
    weight_logprobs: Optional[torch.Tensor] = None  # [C, m]


def ordmoe_path_loss(
    loss_mask: torch.Tensor,
    output_tensor: torch.Tensor,
    *,
    path: int,
    paths_of_micro_batch: MicroBatchPaths,
    ordmoe: OrdMoEConfig,
    num_paths: int,
    vocab_size: int,
    per_token_loss: bool = False,
    lower_rows: Optional[torch.Tensor] = None,
    weights_needed: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """Loss function of the sequential schedule for path ``path`` of a micro-batch:
    ``output_tensor`` is that path's per-token loss (``[b, s]`` for path 1, ``[m, s]`` on the
    ``lower_rows`` for a lower path). Its loss is its share of ``ordmoe_loss``: path 1's LM loss
    plus ``sum_i coeff_i * w_ji * L_ji`` over the rank loss's sequences, with
    ``w_ji = d ERL_i / d L_ji`` held constant, whose gradient in this path is the fused loss's.
    The schedule runs a micro-batch's paths in order and scales Megatron's per-micro-batch
    division (see ``mcore.schedules``); the last path returns the micro-batch's whole report, the
    others zero pairs. ``weights_needed`` False (forward-only) lets an objective that is not
    linear in each path run without its pre-pass. ``cu_seqlens``: as for ``ordmoe_loss``."""
    batch, seq = loss_mask.shape[0], loss_mask.shape[-1]
    mask = loss_mask.reshape(batch, seq).float()
    nll = output_tensor.float().reshape(-1, seq)
    num_tokens = mask.sum().to(torch.int)
    sub_mask = mask if lower_rows is None else mask[lower_rows]
    state = paths_of_micro_batch
    if path == 0:
        lm, _, lm_report = lm_loss(mask, nll)
        state.lm_report = lm_report["lm loss"]
        rows_nll = nll if lower_rows is None else nll[lower_rows]
    else:
        lm, rows_nll = 0.0, nll
    logprobs, seq_tokens, n_valid = _sequences(rows_nll.unsqueeze(0), mask, sub_mask, cu_seqlens)
    logprobs = logprobs[0]  # [m]
    state.logprobs[path] = logprobs.detach()

    kwargs = ordmoe.objective_kwargs(vocab_size)
    if ordmoe.linear_objective:  # the weight needs this path's own values only (the floor)
        own = torch.zeros(num_paths, logprobs.shape[0], dtype=logprobs.dtype, device=logprobs.device)
        own[path] = logprobs.detach()
        weights = rank_loss_weights(own, ordmoe.objective, **kwargs)[path]
    elif state.weight_logprobs is not None:
        weights = rank_loss_weights(state.weight_logprobs, ordmoe.objective, **kwargs)[path]
    elif weights_needed:
        raise RuntimeError(
            f"--ordmoe-objective {ordmoe.objective} with the sequential path schedule needs every "
            "path's log-likelihoods before the backward (the schedule's forward-only pre-pass)"
        )
    else:
        weights = torch.zeros_like(logprobs)
    coeffs = _rank_coefficients(
        seq_tokens, n_valid, batch / sub_mask.shape[0], num_tokens, ordmoe.rank_loss_coeff, per_token_loss
    )
    loss = lm + (coeffs * weights * logprobs).sum()
    # Per-token loss: the schedule sums num_tokens over micro-batches, so count them once.
    path_tokens = num_tokens if (path == 0 or not per_token_loss) else torch.zeros_like(num_tokens)

    if path < num_paths - 1:
        return loss, path_tokens, _zero_report(num_paths, loss.device)
    path_logprobs = torch.stack([state.logprobs[j] for j in range(num_paths)])
    per_seq_rank = rank_loss(path_logprobs, ordmoe.objective, reduction="none", **kwargs)
    report = {"lm loss": state.lm_report}
    report.update(_rank_report(path_logprobs, per_seq_rank, seq_tokens, per_token_loss))
    return loss, path_tokens, report


def _rank_coefficients(
    tokens_per_seq, n_valid, rows_scale: float, num_tokens, coeff: float, per_token_loss: bool
) -> torch.Tensor:
    """Per sub-sampled sequence, what its rank loss is multiplied by in the returned loss (see the
    module docstring); ``rows_scale = b / m`` makes the sub-sampled sum an unbiased estimate of the
    full one; ``n_valid`` the sequences with loss tokens among all ``b``."""
    scale = coeff * rows_scale
    if per_token_loss:
        return scale * tokens_per_seq
    return scale * (tokens_per_seq > 0).float() * num_tokens / n_valid


def _rank_report(
    path_logprobs: torch.Tensor, per_seq_rank: torch.Tensor, tokens_per_seq: torch.Tensor, per_token_loss: bool
) -> dict:
    valid = (tokens_per_seq > 0).float()
    n_valid = valid.sum()
    report = {}
    if per_token_loss:
        report["rank loss"] = _pair((per_seq_rank * tokens_per_seq).sum(), tokens_per_seq.sum())
    else:
        report["rank loss"] = _pair((per_seq_rank * valid).sum(), n_valid)
    for j in range(path_logprobs.shape[0]):
        report[f"path{j + 1} logprob"] = _pair((path_logprobs[j] * valid).sum(), n_valid)
    report["tier order acc"] = _pair((tier_order_correct(path_logprobs) * valid).sum(), n_valid)
    return report


def _zero_report(num_paths: int, device) -> dict:
    return {key: torch.zeros(2, device=device) for key in report_keys(num_paths)}


def reduce_reports(reports: list[dict], group: Optional[torch.distributed.ProcessGroup] = None) -> dict:
    """Megatron's reduction of loss reports: sum pairs over micro-batches, all-reduce, divide."""
    if not reports:
        return {}
    keys = list(reports[0].keys())
    totals = torch.stack([torch.stack([r[k] for r in reports]).sum(0) for k in keys])
    if group is not None and torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(totals, group=group)
    return {k: (totals[i, 0] / totals[i, 1].clamp(min=1)).item() for i, k in enumerate(keys)}
