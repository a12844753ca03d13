"""The OrdMoE loss in Megatron's loss-function convention ``(loss, num_tokens, report)``.

``output_tensor`` is the per-token loss ``[C*b, s]`` that ``OrdMoEGPTModel`` returns with
labels. The returned loss is ``L_NTP`` summed over path-1 tokens plus the rank-loss term scaled
so that Megatron's schedules turn it into ``λ·L_ERL``:

- default: the schedule divides by this micro-batch's token count, so the rank term is
  ``λ · mean_i ERL_i · num_tokens``: the rank loss is the mean over sequences, averaged over
  micro-batches and data-parallel ranks exactly like the LM loss.
- ``calculate_per_token_loss``: Megatron divides by the global token count, so the rank term is
  ``λ · sum_i |m_i| · ERL_i``: each sequence's rank loss weighs by its number of loss tokens,
  as each token does in the LM loss.

Every report entry is a ``[numerator, denominator]`` pair, which Megatron sums over
micro-batches and all-reduces over data-parallel ranks before dividing, so logged values do not
depend on the parallel layout.
"""
from __future__ import annotations

from typing import Optional

import torch

from ordmoe_megatron.method import OrdMoEConfig, expert_rank_loss, sequence_logprobs, tier_order_correct


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


def ordmoe_loss(
    loss_mask: torch.Tensor,
    output_tensor: torch.Tensor,
    *,
    ordmoe: OrdMoEConfig,
    num_paths: int,
    vocab_size: int,
    per_token_loss: bool = False,
):
    """Loss function for Megatron schedules: bind everything but ``output_tensor`` with partial."""
    batch, seq = loss_mask.shape[0], loss_mask.shape[-1]
    token_nll = output_tensor.float().view(num_paths, batch, seq)
    mask = loss_mask.view(batch, seq).float()
    lm, num_tokens, report = lm_loss(mask, token_nll[0])
    if num_paths == 1:
        return lm, num_tokens, report

    tokens_per_seq = mask.sum(-1)
    valid = (tokens_per_seq > 0).float()
    n_valid = valid.sum()
    path_logprobs = sequence_logprobs(token_nll, mask)  # [C, b]
    per_seq_rank = expert_rank_loss(
        path_logprobs, ordmoe.rewards, ordmoe.advantage, ordmoe.floor_value(vocab_size), reduction="none"
    )
    if per_token_loss:
        rank_term = (per_seq_rank * tokens_per_seq).sum()
        report["rank loss"] = _pair(rank_term, num_tokens)
    else:
        rank_mean = (per_seq_rank * valid).sum() / n_valid.clamp(min=1)
        rank_term = rank_mean * num_tokens
        report["rank loss"] = _pair((per_seq_rank * valid).sum(), n_valid)
    loss = lm + ordmoe.rank_loss_coeff * rank_term

    for j in range(num_paths):
        report[f"path{j + 1} logprob"] = _pair((path_logprobs[j] * valid).sum(), n_valid)
    report["tier order acc"] = _pair((tier_order_correct(path_logprobs) * valid).sum(), n_valid)
    return loss, num_tokens, report


def reduce_reports(reports: list[dict], group: Optional[torch.distributed.ProcessGroup] = None) -> dict:
    """Megatron's reduction of loss reports: sum pairs over micro-batches, all-reduce, divide."""
    if not reports:
        return {}
    keys = list(reports[0].keys())
    totals = torch.stack([torch.stack([r[k] for r in reports]).sum(0) for k in keys])
    if group is not None and torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(totals, group=group)
    return {k: (totals[i, 0] / totals[i, 1].clamp(min=1)).item() for i, k in enumerate(keys)}
