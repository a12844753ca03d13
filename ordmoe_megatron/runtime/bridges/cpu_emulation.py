"""The CPU emulation: megatron-core's real code paths on a machine without CUDA.

``install()`` (through ``bridges.enable()`` when there is no CUDA) lets unit tests and small
benchmarks run the real Megatron code paths (tensor/sequence/pipeline/expert parallelism, MoE
token dispatch, 1F1B schedules) with ``torch.distributed`` on gloo. It is idempotent. Every patch
first checks that the thing it replaces still exists (and, where it matters, looks like what we
expect), and raises ``guards.BridgeError`` otherwise, so that a megatron-core upgrade fails
loudly instead of silently running unpatched code.

Bridged spots (and why):

0. ``torch.compile`` -- Megatron wraps small fusions in it (``jit_fuser``); on CPU inductor would
   build C++ kernels (seconds each) and query CUDA device properties, so dynamo is disabled and
   those functions run eagerly. Denormal floats are flushed to zero, as GPUs do: x86 CPUs are
   many times slower on them, and lower tiers' log-likelihoods can reach them.

1. ``torch.cuda`` runtime API -- Megatron calls ``torch.cuda.Stream/Event/current_stream/
   default_stream/set_stream/stream/synchronize/current_device/set_device/
   get_device_capability/get_device_properties`` and ``torch.cuda.nvtx.range_push/range_pop/
   mark/range`` directly. On a CPU build these raise. CPU execution is synchronous and in order,
   so streams become one shared no-op stream (all instances compare equal, so "am I on a side
   stream?" checks are False), events only record a wall-clock timestamp (``elapsed_time`` works,
   in ms, for timers), synchronization is a no-op, the current device is ordinal 0 (which the
   device mode of item 7 maps to the CPU), and NVTX ranges are no-ops.

2. CUDA RNG -> CPU RNG -- ``torch.cuda.get_rng_state/set_rng_state/manual_seed/manual_seed_all``
   and Megatron's ``tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state`` are mapped
   onto the CPU default generator, because on CPU every random op (init, dropout) draws from it.
   This makes ``model_parallel_cuda_manual_seed`` and ``CudaRNGStatesTracker.fork`` work exactly
   as on GPU: forking swaps the generator state in and out, so tensor-parallel / expert-parallel
   RNG streams are distinct per rank and deterministic. Consequence: ``torch.cuda.manual_seed``
   now reseeds the CPU generator (on GPU it would not). The tracker's "CPU RNG state changed
   within GPU RNG context" warning is therefore always true and is filtered out (only that
   message, only on Megatron's random-module logger). CUDA-graph-safe RNG (``graph_safe=True``)
   is not supported and raises.

3. (``moe_utils.te_general_gemm``, missing without Transformer Engine on a GPU too: the bridge
   is ``bridges.transformer_engine``.)

4. ``maybe_move_tensor_to_cpu`` (moe_utils, imported by name into token_dispatcher) -- the
   all-to-all dispatcher relies on it to turn split sizes into host values, but it only converts
   CUDA tensors. On CPU the splits stayed tensors, which gloo's ``all_to_all_single`` rejects.
   Replaced by a version that converts CPU tensors too, so ``as_numpy=True`` yields the numpy
   int array the GPU path yields (a plain list would break the dispatcher's ``.tolist()``).

5. Uneven ``all_gather``/``reduce_scatter`` -- ``tensor_parallel.mappings._gather_along_first_dim``
   / ``_reduce_scatter_along_first_dim`` use list collectives with *uneven* split sizes when
   ``output_split_sizes``/``input_split_sizes`` is given (alltoall dispatcher with expert-TP > 1).
   gloo only supports equal sizes, so on a gloo group these pad every chunk to the largest size,
   run the even collective and strip the padding. Other backends call the original.

6. Final LayerNorm / sequence parallelism -- without TE or Apex the local spec uses
   ``WrappedTorchNorm``, which refuses ``sequence_parallel``; but MoE with TP > 1 requires SP.
   :class:`CPUSequenceParallelNorm` is a plain LayerNorm/RMSNorm (``config.normalization``)
   whose parameters carry ``sequence_parallel=True``, so ``finalize_model_grads`` all-reduces
   their grads over the TP group when SP is on (and ignores the flag otherwise). Use
   :func:`sequence_parallel_layer_spec` to put it into a layer spec. ``TransformerBlock``'s final
   norm is not reachable from a layer spec, so ``install()`` swaps the module-level
   ``transformer_block.LayerNormImpl`` from ``WrappedTorchNorm`` to this class. State-dict keys
   (``weight``, ``bias``) and numerics are identical to ``torch.nn.LayerNorm``/``RMSNorm``.

7. Hard-coded CUDA devices -- schedules (``torch.zeros(..., device="cuda")``), p2p communication,
   the router (``weight.data.to(device=torch.cuda.current_device())``), DDP buffers, etc. A
   ``torch.overrides.TorchFunctionMode`` (:class:`CudaToCPUMode`) rewrites CUDA device arguments
   (``"cuda"``, ``"cuda:N"``, ``torch.device("cuda")``, a bare ordinal) to the CPU, drops
   ``pin_memory=True``, makes ``Tensor.cuda()``/``Tensor.pin_memory()`` return the tensor itself
   and ``Tensor.record_stream()`` a no-op, and makes ``Tensor.type()`` report the CUDA type name
   (``'torch.cuda.FloatTensor'``) because Megatron's optimizer and grad clipping assert it.

   The mode is re-entered inside ``Tensor.backward``/``torch.autograd.backward``/``grad``
   (torch suspends a mode while its handler runs, and Megatron's custom autograd backwards,
   e.g. the all-to-all, allocate on ``torch.cuda.current_device()``).

   Torch-function modes live on a per-thread stack. ``install()`` pushes the mode onto the stack
   of the calling thread and leaves it there for the life of the thread, so schedules invoked
   later from user code are covered. Other threads (e.g. ones a benchmark starts) call
   ``bridges.enable()`` themselves (it pushes the mode once per thread).

Not bridged: ``torch.autocast("cuda", ...)`` (used by schedules only when
``config.enable_autocast`` is set; on CPU torch warns and runs it as a disabled autocast), CUDA
graphs, Transformer Engine / Apex kernels and fused
ops (keep ``moe_permute_fusion``, ``gradient_accumulation_fusion``, ``bias_*_fusion``,
``masked_softmax_fusion`` etc. off), and legacy ``torch.cuda.FloatTensor(...)`` constructors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
import time
import types
from typing import Any

import megatron.core.tensor_parallel.mappings as mappings
import megatron.core.tensor_parallel.random as mrandom
import megatron.core.transformer.moe.moe_utils as moe_utils
import megatron.core.transformer.moe.token_dispatcher as token_dispatcher
import megatron.core.transformer.transformer_block as transformer_block
import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from torch.overrides import TorchFunctionMode

from ordmoe_megatron.runtime.bridges.guards import BridgeError, check_params, replace_existing

__all__ = [
    "CPUSequenceParallelNorm",
    "CudaToCPUMode",
    "config_overrides",
    "install",
    "is_enabled",
    "sequence_parallel_layer_spec",
]


_lock = threading.Lock()
_patched = False  # process-wide patches (items 1-6) applied
_thread_state = threading.local()  # per-thread: the CudaToCPUMode pushed by install()


# --------------------------------------------------------------------------------------------
# 1. torch.cuda runtime stand-ins
# --------------------------------------------------------------------------------------------
class _CPUStream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is synchronous and in order, so there is a
    single logical stream; every instance compares equal and all waits are no-ops."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: "_CPUEvent | None" = None) -> "_CPUEvent":
        event = event if event is not None else _CPUEvent()
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> "_CPUStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _CPUStream)

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "<cpu_emulation stream>"


class _CPUEvent:
    """Stand-in for ``torch.cuda.Event``: completes immediately; ``record`` stores a wall-clock
    timestamp so ``elapsed_time`` (milliseconds, like CUDA) works for Megatron's timers."""

    def __init__(
        self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False, **kwargs: Any
    ) -> None:
        self._time: float | None = None

    def record(self, stream: Any = None) -> None:
        self._time = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: "_CPUEvent") -> float:
        if self._time is None or end_event._time is None:
            raise RuntimeError("elapsed_time needs both events recorded")
        return (end_event._time - self._time) * 1000.0


_STREAM = _CPUStream()


def _noop() -> Any:
    """A fresh no-op function: each patched name needs its own object, because torch.compile's
    rule table (trace_rules) refuses one object registered under names with different rules."""

    def noop(*args: Any, **kwargs: Any) -> None:
        return None

    return noop


def _device_capability(device: Any = None) -> tuple[int, int]:
    # (0, 0): no tensor-core generation, so capability-gated features stay off.
    return (0, 0)


def _device_properties(device: Any = None) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        name="cpu (megatron cpu_emulation)", major=0, minor=0, total_memory=0, multi_processor_count=1
    )


# --------------------------------------------------------------------------------------------
# 2. CUDA RNG mapped onto the CPU default generator
# --------------------------------------------------------------------------------------------
def _cuda_get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _cuda_set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    torch.set_rng_state(new_state)


def _cuda_manual_seed(seed: int) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, i.e. us.
    torch.default_generator.manual_seed(int(seed))


def _megatron_get_cuda_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    if graph_safe:
        raise NotImplementedError("cpu_emulation: CUDA-graph-safe RNG states are not emulated")
    return torch.get_rng_state()  # already a fresh copy, so `clone` needs no extra work


def _megatron_set_cuda_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    if graph_safe:
        raise NotImplementedError("cpu_emulation: CUDA-graph-safe RNG states are not emulated")
    torch.set_rng_state(new_state)


class _DropCpuRngChangedWarning(logging.Filter):
    """With a single (CPU) generator, the tracker's 'CPU RNG state changed within GPU RNG
    context' warning fires on every fork that draws random numbers; it means nothing here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


# --------------------------------------------------------------------------------------------
# 4. host-side split sizes
# --------------------------------------------------------------------------------------------
def _maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """Like Megatron's version, but also converts tensors that are already on the CPU, so the
    dispatcher ends up with exactly what it gets on GPU: host split sizes as a numpy int array
    (the dispatcher calls ``.tolist()`` on them; gloo's ``all_to_all_single`` accepts them,
    a tensor it rejects)."""
    if torch.is_tensor(tensor):
        tensor = tensor.cpu()
        if as_numpy:
            return tensor.numpy()
    return tensor


# --------------------------------------------------------------------------------------------
# 5. uneven all_gather / reduce_scatter on gloo
# --------------------------------------------------------------------------------------------
def _is_gloo(group: Any) -> bool:
    return torch.distributed.get_backend(group) == "gloo"


def _padded(chunk: torch.Tensor, rows: int) -> torch.Tensor:
    if chunk.shape[0] == rows:
        return chunk.contiguous()
    out = chunk.new_zeros((rows, *chunk.shape[1:]))
    out[: chunk.shape[0]] = chunk
    return out


def _wrap_gather_along_first_dim(original: Any) -> Any:
    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1 or not _is_gloo(group):
            return original(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        rows = max(sizes)
        gathered = [input_.new_empty((rows, *input_.shape[1:])) for _ in sizes]
        torch.distributed.all_gather(gathered, _padded(input_, rows), group=group)
        return torch.cat([g[:n] for g, n in zip(gathered, sizes)], dim=0)

    _gather_along_first_dim.__wrapped__ = original
    return _gather_along_first_dim


def _wrap_reduce_scatter_along_first_dim(original: Any) -> Any:
    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1 or not _is_gloo(group):
            return original(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(s) for s in input_split_sizes]
        rows = max(sizes)
        chunks = [_padded(c, rows) for c in torch.split(input_, sizes, dim=0)]
        output = input_.new_empty((rows, *input_.shape[1:]))
        torch.distributed.reduce_scatter(output, chunks, group=group)
        return output[: sizes[group.rank()]].contiguous()

    _reduce_scatter_along_first_dim.__wrapped__ = original
    return _reduce_scatter_along_first_dim


# --------------------------------------------------------------------------------------------
# 6. sequence-parallel-capable norm
# --------------------------------------------------------------------------------------------
class CPUSequenceParallelNorm(torch.nn.Module):
    """LayerNorm or RMSNorm (chosen by ``config.normalization``) that accepts
    ``config.sequence_parallel``.

    Normalization is per token, so a sequence-sharded input needs no communication; the only
    SP requirement is that the (replicated) weight gradients get summed over the TP group,
    which Megatron's ``finalize_model_grads`` does for parameters marked
    ``sequence_parallel=True`` whenever ``config.sequence_parallel`` is on. Constructor
    signature matches Megatron's norm modules so it can be used in a ``ModuleSpec``.
    """

    def __init__(
        self,
        config: Any,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str | None = None,
    ) -> None:
        super().__init__()
        # Like WrappedTorchNorm, config decides (the local spec's `normalization` arg is
        # routed through config.normalization).
        self.normalization = config.normalization
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(
                f"CPUSequenceParallelNorm: unsupported normalization {self.normalization!r} (LayerNorm or RMSNorm)"
            )
        self.hidden_size = hidden_size
        self.eps = eps
        self.zero_centered_gamma = bool(config.layernorm_zero_centered_gamma)
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size))
        if self.normalization == "LayerNorm":
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size))
        else:
            self.register_parameter("bias", None)
        for param in self.parameters():
            param.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.zero_centered_gamma else self.weight
        if self.normalization == "LayerNorm":
            return F.layer_norm(x, (self.hidden_size,), weight, self.bias, self.eps)
        return F.rms_norm(x, (self.hidden_size,), weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalization}, {self.hidden_size}, eps={self.eps}"


def sequence_parallel_layer_spec(spec: Any) -> Any:
    """Return a copy of a layer ``ModuleSpec`` (e.g. from ``get_gpt_layer_local_spec``) with
    every ``WrappedTorchNorm`` replaced by :class:`CPUSequenceParallelNorm`, so the model can
    use ``sequence_parallel=True`` (needed for MoE with TP > 1) on CPU."""

    def swap(obj: Any) -> Any:
        if obj is WrappedTorchNorm:
            return CPUSequenceParallelNorm
        if isinstance(obj, ModuleSpec):
            return dataclasses.replace(obj, module=swap(obj.module), submodules=swap(obj.submodules))
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.replace(
                obj, **{f.name: swap(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
            )
        if isinstance(obj, (list, tuple)):
            return type(obj)(swap(o) for o in obj)
        return obj

    return swap(spec)


# --------------------------------------------------------------------------------------------
# 7. CUDA device arguments -> CPU
# --------------------------------------------------------------------------------------------
_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    f"torch.{name}": f"torch.cuda.{name}"
    for name in (
        "FloatTensor",
        "DoubleTensor",
        "HalfTensor",
        "BFloat16Tensor",
        "ByteTensor",
        "CharTensor",
        "ShortTensor",
        "IntTensor",
        "LongTensor",
        "BoolTensor",
    )
}
_CPU_TYPE_NAMES = {v: k for k, v in _CUDA_TYPE_NAMES.items()}


# Python-level torch entry points that run other torch code (the backward pass) which must
# still see the mode.
_KEEP_MODE_INSIDE = frozenset({torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad})


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    # A bare ordinal means a CUDA device (torch.cuda.current_device() returns 0 here).
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCPUMode(TorchFunctionMode):
    """Torch-function mode that turns CUDA device requests into CPU ones (see module doc, 7)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            args = tuple(_CPU if (i > 0 and _is_cuda_device(a)) else a for i, a in enumerate(args))
        elif func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        elif func is torch.Tensor.record_stream:
            return None
        elif func is torch.Tensor.type:
            if len(args) == 1 and not kwargs:
                name = func(*args)
                return _CUDA_TYPE_NAMES.get(name, name)
            if len(args) > 1 and isinstance(args[1], str):
                args = (args[0], _CPU_TYPE_NAMES.get(args[1], args[1]), *args[2:])
        if kwargs:
            if "device" in kwargs and _is_cuda_device(kwargs["device"]):
                kwargs = {**kwargs, "device": _CPU}
            if kwargs.get("pin_memory"):
                kwargs = {**kwargs, "pin_memory": False}
        if func in _KEEP_MODE_INSIDE:
            # Torch pops the mode while this handler runs, and the whole backward pass runs
            # inside these calls: Megatron's custom autograd backwards allocate on
            # torch.cuda.current_device(). Re-enter the mode and skip one dispatch hop.
            with self:
                return torch.overrides.redispatch_function(func, types, args, kwargs)
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# install()
# --------------------------------------------------------------------------------------------
def _apply_patches() -> None:
    """The process-wide patches (items 0-2, 4-6), once."""
    global _patched
    with _lock:
        if _patched:
            return
        # 0. Megatron wraps its fusions in torch.compile (jit_fuser). On CPU, inductor would
        # build C++ kernels (seconds each) and query CUDA device properties: run them eagerly.
        # Flush denormals as GPUs do (a tiny run slowed 3x as its lower tiers' log-likelihoods fell).
        torch.set_flush_denormal(True)
        torch._dynamo.config.disable = True

        if not hasattr(torch.overrides, "redispatch_function"):
            raise BridgeError(
                "cpu_emulation: torch.overrides.redispatch_function missing "
                "(needed to keep the device mode active in backward)"
            )

        # 1. torch.cuda runtime
        cuda = torch.cuda
        for name, value in {
            "Stream": _CPUStream,
            "Event": _CPUEvent,
            "current_stream": lambda device=None: _STREAM,
            "default_stream": lambda device=None: _STREAM,
            "set_stream": _noop(),
            "stream": lambda stream=None: contextlib.nullcontext(),
            "synchronize": _noop(),
            "current_device": lambda: 0,
            "set_device": _noop(),
            "get_device_capability": _device_capability,
            "get_device_properties": _device_properties,
        }.items():
            replace_existing(cuda, name, value, "torch.cuda")
        for name in ("range_push", "range_pop", "mark"):
            replace_existing(cuda.nvtx, name, _noop(), "torch.cuda.nvtx")
        replace_existing(cuda.nvtx, "range", lambda *a, **k: contextlib.nullcontext(), "torch.cuda.nvtx")

        # 2. RNG
        for module, where in ((cuda, "torch.cuda"), (cuda.random, "torch.cuda.random")):
            replace_existing(module, "get_rng_state", _cuda_get_rng_state, where)
            replace_existing(module, "set_rng_state", _cuda_set_rng_state, where)
            replace_existing(module, "manual_seed", functools.partial(_cuda_manual_seed), where)
            replace_existing(module, "manual_seed_all", functools.partial(_cuda_manual_seed), where)
        check_params(
            mrandom._get_cuda_rng_state, ("device", "clone", "graph_safe"), "tensor_parallel.random._get_cuda_rng_state"
        )
        check_params(
            mrandom._set_cuda_rng_state,
            ("new_state", "device", "graph_safe"),
            "tensor_parallel.random._set_cuda_rng_state",
        )
        replace_existing(
            mrandom, "_get_cuda_rng_state", _megatron_get_cuda_rng_state, "megatron.core.tensor_parallel.random"
        )
        replace_existing(
            mrandom, "_set_cuda_rng_state", _megatron_set_cuda_rng_state, "megatron.core.tensor_parallel.random"
        )
        logging.getLogger(mrandom.__name__).addFilter(_DropCpuRngChangedWarning())

        # 4. split sizes
        check_params(
            moe_utils.maybe_move_tensor_to_cpu,
            ("tensor", "as_numpy", "record_stream"),
            "moe_utils.maybe_move_tensor_to_cpu",
        )
        replace_existing(
            moe_utils, "maybe_move_tensor_to_cpu", _maybe_move_tensor_to_cpu, "megatron.core.transformer.moe.moe_utils"
        )
        replace_existing(
            token_dispatcher,
            "maybe_move_tensor_to_cpu",
            _maybe_move_tensor_to_cpu,
            "megatron.core.transformer.moe.token_dispatcher",
        )

        # 5. uneven gather / reduce-scatter on gloo
        check_params(
            mappings._gather_along_first_dim,
            ("input_", "group", "output_split_sizes", "use_global_buffer"),
            "mappings._gather_along_first_dim",
        )
        check_params(
            mappings._reduce_scatter_along_first_dim,
            ("input_", "group", "input_split_sizes", "use_global_buffer"),
            "mappings._reduce_scatter_along_first_dim",
        )
        replace_existing(
            mappings,
            "_gather_along_first_dim",
            _wrap_gather_along_first_dim(mappings._gather_along_first_dim),
            "megatron.core.tensor_parallel.mappings",
        )
        replace_existing(
            mappings,
            "_reduce_scatter_along_first_dim",
            _wrap_reduce_scatter_along_first_dim(mappings._reduce_scatter_along_first_dim),
            "megatron.core.tensor_parallel.mappings",
        )

        # 6. final norm of TransformerBlock (only when it is the torch fallback)
        if not hasattr(transformer_block, "LayerNormImpl"):
            raise BridgeError("cpu_emulation: transformer_block.LayerNormImpl not found")
        if transformer_block.LayerNormImpl is WrappedTorchNorm:
            transformer_block.LayerNormImpl = CPUSequenceParallelNorm

        _patched = True


def is_enabled() -> bool:
    """True when the emulation is active in this process and the calling thread has the
    device mode installed."""
    return _patched and getattr(_thread_state, "mode", None) is not None


def config_overrides() -> dict:
    """``TransformerConfig`` settings that CPU runs need (empty when CUDA is present).

    ``batch_p2p_comm=False``: with two pipeline stages a rank's previous and next stage are the
    same peer, and the interleaved schedule batches a send and a receive of same-shaped tensors
    in each direction. NCCL matches the batched operations as Megatron orders them; gloo's
    ``batch_isend_irecv`` can pair an activation with a gradient instead, silently. Unbatched
    point-to-point operations are matched in order on gloo too.
    """
    return {} if torch.cuda.is_available() else {"batch_p2p_comm": False}


def install() -> None:
    """The emulation for this process and the calling thread (see the module docstring):
    process-wide patches once, and the CUDA->CPU device mode pushed onto the calling thread's
    torch-function-mode stack once, where it stays."""
    _apply_patches()
    if getattr(_thread_state, "mode", None) is None:
        mode = CudaToCPUMode()
        mode.__enter__()  # deliberately never exited: active for the rest of the thread
        _thread_state.mode = mode
