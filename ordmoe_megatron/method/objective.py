"""The OrdMoE objective in plain PyTorch (method page §3), no Megatron import.

Shapes: ``C`` paths, ``N`` sequences, ``S`` positions. ``path_logprobs[j, i]`` is the mean
target log-likelihood of sequence ``i`` on path ``j`` (Eq. 7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ordmoe_megatron.errors import OrdMoEError


def _zscore(r: torch.Tensor) -> torch.Tensor:
    std = r.std(unbiased=False)
    return (r - r.mean()) / std if std > 0 else torch.zeros_like(r)


# The advantage modes (``--ordmoe-advantage``): name -> the advantages of float64 rewards. The
# one table that ``OrdMoEConfig`` validates against (its ``Literal``) and ``rank_advantages``
# dispatches by.
ADVANTAGE_MODES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "zscore": _zscore,  # Eq. 8: (r - mean) / std, population std (zero for a single tier)
    "center": lambda r: r - r.mean(),
    "raw": lambda r: r,
}


def default_rewards(num_tiers: int) -> list[float]:
    """Evenly spaced from 1 to 0 (``[1.0, 0.5, 0.0]`` for three tiers); ``[1.0]`` for one."""
    if num_tiers == 1:
        return [1.0]
    return [1.0 - j / (num_tiers - 1) for j in range(num_tiers)]


def rank_advantages(rewards: Sequence[float] | torch.Tensor, mode: str = "zscore") -> torch.Tensor:
    """Advantages of the fixed tier rewards (Eq. 8 and the two open alternatives).

    ``zscore``: ``(r - mean) / std`` with the population std (zero for a single tier);
    ``center``: ``r - mean``; ``raw``: ``r``.
    """
    if mode not in ADVANTAGE_MODES:
        raise OrdMoEError(f"--ordmoe-advantage='{mode}' is not one of {', '.join(ADVANTAGE_MODES)}")
    return ADVANTAGE_MODES[mode](torch.as_tensor(rewards, dtype=torch.float64)).float()


def expert_rank_loss(
    path_logprobs: torch.Tensor,
    rewards: Sequence[float] | torch.Tensor,
    mode: str = "zscore",
    floor: Optional[float] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """``L_ERL = -(1/N) sum_i sum_j A_j * path_logprobs[j, i]`` (Eq. 9).

    ``floor``: a path with a negative advantage whose log-likelihood is already below the floor
    keeps its value in the loss but gets no gradient, so it is not pushed further towards -inf.
    ``reduction``: ``mean`` over sequences, ``sum``, or ``none`` (one value per sequence).
    """
    if path_logprobs.dim() != 2:
        raise ValueError(f"path_logprobs must be [C, N], got shape {tuple(path_logprobs.shape)}")
    adv = rank_advantages(rewards, mode).to(path_logprobs.device, path_logprobs.dtype)
    if adv.numel() != path_logprobs.shape[0]:
        raise ValueError(f"{adv.numel()} rewards for {path_logprobs.shape[0]} paths")
    logprobs = path_logprobs
    if floor is not None:
        stop_push = (adv < 0).unsqueeze(1) & (path_logprobs.detach() < floor)
        logprobs = torch.where(stop_push, path_logprobs.detach(), path_logprobs)
    return _reduce(-(adv.unsqueeze(1) * logprobs).sum(dim=0), reduction)


def pairwise_logistic_loss(path_logprobs: torch.Tensor, beta: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Bradley-Terry over every ordered pair of tiers: ``mean_{j<k} -log sigmoid(beta (L_j - L_k))``
    per sequence (tier ``j`` is the better of ``j < k``). Bounded below by 0 and saturating: once a
    lower tier is well below a higher one it is no longer pushed down."""
    c = path_logprobs.shape[0]
    higher, lower = torch.triu_indices(c, c, offset=1, device=path_logprobs.device)
    margins = beta * (path_logprobs[higher] - path_logprobs[lower])  # [pairs, N]
    return _reduce(-torch.nn.functional.logsigmoid(margins).mean(dim=0), reduction)


def plackett_luce_loss(path_logprobs: torch.Tensor, beta: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """The negative log-likelihood of the order ``1 > 2 > ... > C`` under a Plackett-Luce model
    with scores ``beta * L_j``, per sequence, divided by the ``C - 1`` choices it makes."""
    scores = beta * path_logprobs
    c = scores.shape[0]
    # Choice k picks tier k among tiers k..C: log softmax over the remaining, at the first.
    tail_logsumexp = torch.stack([torch.logsumexp(scores[k:], dim=0) for k in range(c - 1)])
    return _reduce(-(scores[:-1] - tail_logsumexp).sum(dim=0) / max(c - 1, 1), reduction)


@dataclass(frozen=True)
class Objective:
    """A tier-ranking objective: its loss of ``path_logprobs`` ``[C, N]`` and what it takes."""

    loss: Callable[..., torch.Tensor]  # (path_logprobs, rewards, mode, floor, beta, reduction)
    rewards: bool  # it weighs the paths by the tier rewards' advantages (and takes the floor)
    linear: bool  # its gradient in a path's log-likelihood does not depend on the other paths'


# The tier-ranking objectives (``--ordmoe-objective``): the paper's advantage-weighted
# log-likelihoods (Eq. 9), and two standard preference objectives over the tier order (bounded,
# unlike the paper's push-down). The one table ``OrdMoEConfig`` validates against (its
# ``Literal``) and ``rank_loss`` dispatches by.
OBJECTIVES: dict[str, Objective] = {
    "advantage": Objective(
        lambda lp, rewards, mode, floor, beta, reduction: expert_rank_loss(lp, rewards, mode, floor, reduction),
        rewards=True,
        linear=True,
    ),
    "pairwise-logistic": Objective(
        lambda lp, rewards, mode, floor, beta, reduction: pairwise_logistic_loss(lp, beta, reduction),
        rewards=False,
        linear=False,
    ),
    "plackett-luce": Objective(
        lambda lp, rewards, mode, floor, beta, reduction: plackett_luce_loss(lp, beta, reduction),
        rewards=False,
        linear=False,
    ),
}


def rank_loss(
    path_logprobs: torch.Tensor,
    objective: str = "advantage",
    *,
    rewards=None,
    mode: str = "zscore",
    floor: Optional[float] = None,
    beta: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """The tier-ranking objective ``objective`` (``OBJECTIVES``) of ``path_logprobs`` ``[C, N]``."""
    if objective not in OBJECTIVES:
        raise OrdMoEError(f"--ordmoe-objective='{objective}' is not one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[objective].loss(path_logprobs, rewards, mode, floor, beta, reduction)


def rank_loss_weights(path_logprobs: torch.Tensor, objective: str = "advantage", **kwargs) -> torch.Tensor:
    """``d rank_loss_i / d L_{j,i}`` at ``path_logprobs`` ``[C, N]`` (per sequence, ``reduction``
    none): the weight of each path's log-likelihood in the loss's gradient. A path can then run
    forward and backward on its own (the sequential path schedule) with the gradient of the whole
    objective: ``sum_j weights[j] * L_j`` has it. For the linear ``advantage`` objective a path's
    weight needs only its own log-likelihood (the floor); the others need all paths' values."""
    logprobs = path_logprobs.detach().double().requires_grad_(True)
    with torch.enable_grad():
        loss = rank_loss(logprobs, objective, reduction="sum", **kwargs)
        (weights,) = torch.autograd.grad(loss, logprobs)
    return weights.to(path_logprobs.dtype)


def _reduce(per_sequence: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_sequence
    if reduction == "sum":
        return per_sequence.sum()
    if reduction == "mean":
        return per_sequence.mean()
    raise ValueError(f"reduction='{reduction}' is not one of mean, sum, none")


def sequence_logprobs(token_nll: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-path, per-sequence mean target log-likelihood (Eq. 7).

    ``token_nll`` is ``[C, N, S]`` (negative log-likelihood of each target, as Megatron's
    ``compute_language_model_loss`` returns it); ``loss_mask`` is ``[N, S]``. A sequence with
    no counted token gets 0.
    """
    mask = loss_mask.to(token_nll.dtype)
    return -(token_nll * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def response_logprobs(
    token_logprobs: torch.Tensor, loss_mask: torch.Tensor, cu_seqlens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7 per response, for documents packed into one row (the THD layout of fine-tuning).

    ``token_logprobs`` ``[C, T]`` (or ``[C, 1, T]``): each path's log-likelihood of every target
    of the row; ``loss_mask`` ``[T]`` (or ``[1, T]``): 1 on answer tokens; ``cu_seqlens``
    ``[D + 1]``: document ``d`` owns positions ``cu_seqlens[d] .. cu_seqlens[d+1] - 1`` (tokens
    past ``cu_seqlens[-1]`` belong to no document). Returns ``(logprobs [C, D'], answer_tokens
    [D'])``: the mean over each document's answer tokens, for the ``D'`` documents that have any.
    A document without answer tokens is left out (it is no response: it neither counts in the
    mean over responses nor gets a rank loss), as a row without loss tokens is in
    ``sequence_logprobs``'s callers."""
    paths = token_logprobs.shape[0]
    values = token_logprobs.reshape(paths, -1)
    mask = loss_mask.reshape(-1).to(values.dtype)
    total = values.shape[1]
    if mask.shape[0] != total:
        raise ValueError(f"loss mask of {mask.shape[0]} tokens for a row of {total}")
    bounds = cu_seqlens.reshape(-1).to(torch.long).to(values.device)
    if bounds.numel() < 2 or bounds[0] != 0 or (bounds[1:] < bounds[:-1]).any() or bounds[-1] > total:
        raise ValueError(f"cu_seqlens {bounds.tolist()} must rise from 0 to at most the row's {total} tokens")
    docs = bounds.numel() - 1
    # The document of every position (docs = none: past the last document).
    owner = torch.bucketize(torch.arange(total, device=values.device), bounds[1:], right=True)
    inside = (owner < docs).to(values.dtype)
    mask = mask * inside
    owner = owner.clamp(max=docs - 1)
    sums = torch.zeros(paths, docs, dtype=values.dtype, device=values.device).index_add(1, owner, values * mask)
    counts = torch.zeros(docs, dtype=values.dtype, device=values.device).index_add(0, owner, mask)
    answered = counts > 0
    return sums[:, answered] / counts[answered], counts[answered]


def tier_order_correct(path_logprobs: torch.Tensor) -> torch.Tensor:
    """Per sequence: 1.0 where ``L_1 > L_2 > ... > L_C`` holds strictly, else 0.0."""
    if path_logprobs.shape[0] == 1:
        return torch.ones_like(path_logprobs[0])
    return (path_logprobs[:-1] > path_logprobs[1:]).all(dim=0).to(path_logprobs.dtype)
