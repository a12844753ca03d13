"""A hook around Megatron's ``get_forward_backward_func()`` for OrdMoE models: the one place the
OrdMoE loss is bound and the paths of a micro-batch are scheduled.

A ``forward_step`` written for plain Megatron returns ``functools.partial(loss_func, loss_mask,
...)``; the hook keeps the ``loss_mask`` and puts the OrdMoE loss in its place. Then, by
``OrdMoEConfig.path_schedule``:

- ``fused``: each micro-batch runs its ``C`` paths in one forward, stacked on the batch
  dimension. The pipeline schedules send ``[s, b + (C-1)*m, h]`` activations between stages, so
  the ``micro_batch_size`` they size their point-to-point buffers with is that many rows.
- ``sequential``: each path of a micro-batch is its own micro-batch of Megatron's schedule
  (``C x num_microbatches`` of them; each data item is read once and served ``C`` times): one
  path's activations at a time, the plain point-to-point shapes, the fused run's gradients.
  Megatron divides each micro-batch's loss, and the auxiliary losses' scale, by the micro-batches
  it ran, so the loss scale is multiplied by ``C`` for the call (per-token loss needs no
  correction: the paths count path 1's tokens once). Sub-sampled lower paths send fewer rows than
  path 1 between pipeline stages: the call turns on Megatron's ``variable_seq_lengths`` (each
  tensor's shape is sent first). An objective that is not linear in each path's log-likelihood
  first runs a forward-only pass of all paths (random states restored after it) for the weights.

Sub-sampled lower paths (``lower_path_fraction < 1``): before each training micro-batch, ``m``
of its ``b`` sequences are drawn for paths 2..C from a generator seeded by (seed, data-parallel
rank, step, micro-batch): tensor- and pipeline-parallel ranks agree, data-parallel ranks draw
independently, a resumed run draws what the uninterrupted one did. Evaluation runs every path on
every sequence.

Packed sequences (THD): the model stacks the fused paths along the tokens (``mcore.model``)
and records each micro-batch's document boundaries, which the loss takes (Eq. 7 per response).

Works for every schedule ``get_forward_backward_func()`` returns (no pipelining, 1F1B,
interleaved), with and without ``calculate_per_token_loss``. With one path (``C = 1``) Megatron's
own function is returned: the user's loss function runs unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from typing import Callable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from ordmoe_megatron.mcore.loss import MicroBatchPaths, ordmoe_loss, ordmoe_path_loss
from ordmoe_megatron.mcore.metrics import tier_load_paused
from ordmoe_megatron.mcore.model import OrdMoEGPTModel
from ordmoe_megatron.method import OrdMoEConfig
from ordmoe_megatron.runtime import compat
from ordmoe_megatron.runtime.checkpointing import random_states, set_random_states


def get_ordmoe_forward_backward_func(
    ordmoe: OrdMoEConfig,
    vocab_size: int,
    per_token_loss: bool = False,
    *,
    seed: int = 0,
    step_fn: Optional[Callable[[], int]] = None,
    **schedule_kwargs,
):
    """``get_forward_backward_func(**schedule_kwargs)`` for a model that runs all
    ``ordmoe.num_tiers`` paths. ``seed`` and ``step_fn`` (the training iteration) key the draws
    of sub-sampled lower paths; without ``step_fn`` the training calls are counted."""
    forward_backward = get_forward_backward_func(**schedule_kwargs)
    if not ordmoe.enabled:
        return forward_backward
    paths = PathSchedule(ordmoe, vocab_size, per_token_loss, seed, step_fn)

    @functools.wraps(forward_backward)
    def ordmoe_forward_backward(**kwargs):
        return paths.run(forward_backward, **kwargs)

    return ordmoe_forward_backward


class PathSchedule:
    """Runs one ``forward_backward`` call with every path of every micro-batch."""

    def __init__(
        self,
        ordmoe: OrdMoEConfig,
        vocab_size: int,
        per_token_loss: bool,
        seed: int,
        step_fn: Optional[Callable[[], int]],
    ):
        self.ordmoe = ordmoe
        self.num_paths = ordmoe.num_tiers
        self.vocab_size = vocab_size
        self.per_token_loss = per_token_loss
        self.seed = seed
        self.step_fn = step_fn
        self.training_calls = 0

    def run(
        self,
        forward_backward,
        *,
        forward_step_func,
        data_iterator,
        model,
        num_microbatches: int,
        micro_batch_size: int,
        forward_only: bool = False,
        **kwargs,
    ):
        chunks = model if isinstance(model, list) else [model]
        models = {id(chunk): _ordmoe_model(chunk) for chunk in chunks}
        lower = micro_batch_size if forward_only else self.ordmoe.lower_path_rows(micro_batch_size)
        draw = self._subset_drawer(micro_batch_size, lower, next(chunks[0].parameters()).device)
        if not forward_only:
            self.training_calls += 1
        common = dict(model=model, forward_only=forward_only, **kwargs)
        try:
            if self.ordmoe.path_schedule == "fused":
                return self._fused(
                    forward_backward,
                    forward_step_func,
                    data_iterator,
                    num_microbatches,
                    micro_batch_size,
                    lower,
                    models,
                    draw,
                    common,
                )
            return self._sequential(
                forward_backward,
                forward_step_func,
                data_iterator,
                num_microbatches,
                micro_batch_size,
                lower,
                models,
                draw,
                common,
                get_model_config(chunks[0]),
            )
        finally:
            for ordmoe_model in models.values():
                ordmoe_model.set_path_tiers(list(range(self.num_paths)))
                ordmoe_model.set_path_rows(None)

    def _fused(
        self, forward_backward, forward_step_func, data_iterator, num_microbatches, batch, lower, models, draw, common
    ):
        counts = {key: 0 for key in models}
        bind = functools.partial(
            ordmoe_loss,
            ordmoe=self.ordmoe,
            num_paths=self.num_paths,
            vocab_size=self.vocab_size,
            per_token_loss=self.per_token_loss,
        )

        def forward_step(data, chunk, *args, **kwargs):
            micro_batch = counts[id(chunk)]
            counts[id(chunk)] += 1
            rows = draw(micro_batch)
            models[id(chunk)].set_path_rows(rows)
            output, loss_func = forward_step_func(data, chunk, *args, **kwargs)
            cu_seqlens = models[id(chunk)].packed_cu_seqlens  # packed sequences: Eq. 7 per document
            return output, functools.partial(bind, _loss_mask(loss_func), lower_rows=rows, cu_seqlens=cu_seqlens)

        return forward_backward(
            forward_step_func=functools.wraps(forward_step_func)(forward_step),
            data_iterator=data_iterator,
            num_microbatches=num_microbatches,
            micro_batch_size=batch + (self.num_paths - 1) * lower,
            **common,
        )

    def _sequential(
        self,
        forward_backward,
        forward_step_func,
        data_iterator,
        num_microbatches,
        batch,
        lower,
        models,
        draw,
        common,
        config,
    ):
        paths = self.num_paths
        forward_only = common["forward_only"]
        # Sub-sampled lower paths send fewer rows than path 1 between pipeline stages.
        shapes = (
            _variable_shapes(config)
            if lower < batch and parallel_state.get_pipeline_model_parallel_world_size() > 1
            else contextlib.nullcontext()
        )
        scale = contextlib.nullcontext() if forward_only or self.per_token_loss else _loss_scales_times(config, paths)
        run = functools.partial(
            self._sequential_pass,
            forward_backward,
            forward_step_func,
            num_microbatches=num_microbatches,
            batch=batch,
            models=models,
            draw=draw,
        )
        weight_logprobs = None
        with shapes:
            if not forward_only and not self.ordmoe.linear_objective:
                recorded = _map_iterators(data_iterator, _Recording)
                saved = random_states()
                with torch.no_grad(), tier_load_paused(models.values()):
                    _, states = run(recorded, weight_logprobs=None, common=dict(common, forward_only=True))
                set_random_states(saved)
                weight_logprobs = {
                    k: torch.stack([s.logprobs[j] for j in range(paths)])
                    for k, s in states.items()
                    if len(s.logprobs) == paths
                }
                data_iterator = _map_iterators(recorded, lambda r: iter(r.items))
            with scale:
                reports, _ = run(data_iterator, weight_logprobs=weight_logprobs, common=common)
        return reports

    def _sequential_pass(
        self,
        forward_backward,
        forward_step_func,
        data_iterator,
        *,
        num_microbatches,
        batch,
        models,
        draw,
        weight_logprobs,
        common,
    ):
        """One ``forward_backward`` over ``C x num_microbatches`` single-path micro-batches; returns
        its reports and the per-micro-batch ``MicroBatchPaths`` (filled on the last pipeline stage)."""
        paths = self.num_paths
        counts = {key: 0 for key in models}
        states: dict[int, MicroBatchPaths] = {}
        bind = functools.partial(
            ordmoe_path_loss,
            ordmoe=self.ordmoe,
            num_paths=paths,
            vocab_size=self.vocab_size,
            per_token_loss=self.per_token_loss,
            weights_needed=not common["forward_only"],
        )

        def forward_step(data, chunk, *args, **kwargs):
            micro_batch, path = divmod(counts[id(chunk)], paths)
            counts[id(chunk)] += 1
            rows = draw(micro_batch)
            models[id(chunk)].set_path_tiers([path])
            models[id(chunk)].set_path_rows(None if path == 0 else rows)
            output, loss_func = forward_step_func(data, chunk, *args, **kwargs)
            state = states.setdefault(
                micro_batch,
                MicroBatchPaths(weight_logprobs=None if weight_logprobs is None else weight_logprobs.get(micro_batch)),
            )
            return output, functools.partial(
                bind,
                _loss_mask(loss_func),
                path=path,
                paths_of_micro_batch=state,
                lower_rows=rows,
                cu_seqlens=models[id(chunk)].packed_cu_seqlens,
            )

        reports = forward_backward(
            forward_step_func=functools.wraps(forward_step_func)(forward_step),
            data_iterator=_map_iterators(data_iterator, lambda it: _RepeatEach(it, paths)),
            num_microbatches=num_microbatches * paths,
            micro_batch_size=batch,
            **common,
        )
        return reports, states

    def _subset_drawer(self, batch: int, lower: int, device) -> Callable[[int], Optional[torch.Tensor]]:
        """``draw(micro_batch)``: the sorted rows of the lower paths (None: all ``batch`` rows)."""
        if lower >= batch:
            return lambda micro_batch: None
        step = self.step_fn() if self.step_fn is not None else self.training_calls
        dp_rank = parallel_state.get_data_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0

        @functools.lru_cache(maxsize=None)
        def draw(micro_batch: int) -> torch.Tensor:
            key = hashlib.blake2b(f"{self.seed}:{dp_rank}:{step}:{micro_batch}".encode(), digest_size=8).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(key, "little") & (2**63 - 1))
            return torch.randperm(batch, generator=generator)[:lower].sort().values.to(device)

        return draw


def _ordmoe_model(chunk: torch.nn.Module) -> OrdMoEGPTModel:
    """The ``OrdMoEGPTModel`` inside Megatron's wrappers (DDP, Float16Module), itself or as the
    ``language_model`` of a multimodal model (``LLaVAModel``, ``MimoModel``)."""
    module = chunk
    while not isinstance(module, OrdMoEGPTModel):
        if isinstance(getattr(module, "language_model", None), OrdMoEGPTModel):
            return module.language_model
        if not hasattr(module, "module"):
            raise TypeError(
                "OrdMoE schedules need OrdMoEGPTModel chunks (mcore.model), or multimodal models whose "
                f"language_model is one (mcore.multimodal); got {type(chunk).__name__}"
            )
        module = module.module
    return module


def _loss_mask(loss_func) -> Optional[torch.Tensor]:
    # None: Megatron-LM core_v0.18 on gives pipeline stages before the last no loss mask; the
    # schedules call the loss function on the last stage only. MIMO's examples bind loss_mask=.
    if isinstance(loss_func, functools.partial):
        if loss_func.args and (loss_func.args[0] is None or isinstance(loss_func.args[0], torch.Tensor)):
            return loss_func.args[0]
        mask = loss_func.keywords.get("loss_mask", False)
        if mask is None or isinstance(mask, torch.Tensor):
            return mask
    raise TypeError(
        "OrdMoE: forward_step must return (output, functools.partial(loss_func, loss_mask, ...)) as "
        "Megatron-LM's pretrain_gpt.py does (or loss_mask=...), so the OrdMoE loss can take the loss mask; "
        f"got {loss_func!r}"
    )


def _map_iterators(data_iterator, wrap):
    """``wrap`` each data iterator (one per virtual pipeline stage when a list); None stays None."""
    if isinstance(data_iterator, list):
        return [None if it is None else wrap(it) for it in data_iterator]
    return None if data_iterator is None else wrap(data_iterator)


class _RepeatEach:
    """Serves each item of ``iterator`` ``times`` times in a row: one read per micro-batch, one
    serving per path. (A pipeline stage that reads no data never calls it.)"""

    def __init__(self, iterator, times: int):
        self.iterator, self.times, self.left, self.item = iterator, times, 0, None

    def __iter__(self):
        return self

    def __next__(self):
        if self.left == 0:
            self.item = next(self.iterator)
            self.left = self.times
        self.left -= 1
        return self.item


class _Recording:
    """Keeps what it serves, for the pre-pass's data to be served again."""

    def __init__(self, iterator):
        self.iterator, self.items = iterator, []

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.iterator)
        self.items.append(item)
        return item


@contextlib.contextmanager
def _loss_scales_times(config, factor: int):
    """Multiply the config's loss-scale functions by ``factor`` for one call: Megatron divides
    each micro-batch's loss, and the auxiliary losses' scale, by the micro-batches it ran."""
    names = ("grad_scale_func",) + tuple(n for n in compat.AUX_LOSS_SCALE_FUNCS if getattr(config, n, None))
    saved = {name: getattr(config, name) for name in names}
    base = saved["grad_scale_func"]
    config.grad_scale_func = (lambda loss: base(loss) * factor) if base is not None else (lambda loss: loss * factor)
    for name in names[1:]:
        setattr(config, name, lambda scale=saved[name]: scale() * factor)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


@contextlib.contextmanager
def _variable_shapes(config):
    """Megatron's point-to-point exchanges each tensor's shape first (``variable_seq_lengths``)."""
    saved = config.variable_seq_lengths
    config.variable_seq_lengths = True
    try:
        yield
    finally:
        config.variable_seq_lengths = saved
