"""A hook around Megatron's ``get_forward_backward_func()`` for OrdMoE models.

Two things change when every micro-batch carries ``C`` paths, and nothing else in the user's
training loop has to:

- the pipeline schedules send ``[s, C*b, h]`` activations between stages, so the
  ``micro_batch_size`` they size their point-to-point buffers with is ``C`` times the user's;
- the loss of the last stage is the OrdMoE loss: a ``forward_step`` written for plain Megatron
  returns ``functools.partial(loss_func, loss_mask, ...)``; the hook keeps the ``loss_mask`` and
  puts ``ordmoe_loss`` in its place. This is the one place ``ordmoe_loss`` is bound.

Works for every schedule ``get_forward_backward_func()`` returns (no pipelining, 1F1B,
interleaved), with and without ``calculate_per_token_loss``. With one path (``C = 1``) Megatron's
own function is returned: the user's loss function runs unchanged.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from ordmoe_megatron.mcore.loss import ordmoe_loss
from ordmoe_megatron.method import OrdMoEConfig


def get_ordmoe_forward_backward_func(ordmoe: OrdMoEConfig, vocab_size: int, per_token_loss: bool = False,
                                     **schedule_kwargs):
    """``get_forward_backward_func(**schedule_kwargs)`` for a model that runs all
    ``ordmoe.num_tiers`` paths."""
    forward_backward = get_forward_backward_func(**schedule_kwargs)
    if not ordmoe.enabled:
        return forward_backward
    num_paths = ordmoe.num_tiers
    bind_loss = functools.partial(
        ordmoe_loss, ordmoe=ordmoe, num_paths=num_paths, vocab_size=vocab_size, per_token_loss=per_token_loss
    )

    def forward_step_with_ordmoe_loss(forward_step_func):
        @functools.wraps(forward_step_func)
        def forward_step(*args, **kwargs):
            output, loss_func = forward_step_func(*args, **kwargs)
            return output, functools.partial(bind_loss, _loss_mask(loss_func))

        return forward_step

    @functools.wraps(forward_backward)
    def ordmoe_forward_backward(*, forward_step_func, micro_batch_size, **kwargs):
        return forward_backward(
            forward_step_func=forward_step_with_ordmoe_loss(forward_step_func),
            micro_batch_size=micro_batch_size * num_paths,
            **kwargs,
        )

    return ordmoe_forward_backward


def _loss_mask(loss_func) -> Optional[torch.Tensor]:
    # None: Megatron-LM core_v0.18 on gives pipeline stages before the last no loss mask; the
    # schedules call the loss function on the last stage only.
    if isinstance(loss_func, functools.partial) and loss_func.args and (
            loss_func.args[0] is None or isinstance(loss_func.args[0], torch.Tensor)):
        return loss_func.args[0]
    raise TypeError(
        "OrdMoE: forward_step must return (output, functools.partial(loss_func, loss_mask, ...)) as "
        "Megatron-LM's pretrain_gpt.py does, so the OrdMoE loss can take the loss mask; "
        f"got {loss_func!r}"
    )
