"""``run_on_ranks``: a test body on 1, 2 or 4 gloo processes on the CPU (127.0.0.1 only), on a
GPU machine too (the processes see no CUDA device).

For tests only: nothing in the package imports this module. Each process starts through the one
bootstrap, ``runtime.distributed``.

``run_on_ranks`` always starts fresh processes with the ``spawn`` start method, also for
``world_size == 1``: the caller's process never gets a process group, Megatron global state or
the CPU-emulation device mode, and every world size has the same semantics (``fn``, its
arguments and its return value must be picklable; ``fn`` must be importable, i.e. defined at
module level).
"""

from __future__ import annotations

import os
import pickle
import queue as queue_lib
import socket
import time
import traceback
from typing import Any, Callable, Optional

import torch
import torch.multiprocessing as mp

from ordmoe_megatron.runtime.bridges import exit_when_parent_exits
from ordmoe_megatron.runtime.distributed import LOOPBACK, find_free_port, init_process_group

__all__ = ["RankFailedError", "run_on_ranks"]


class RankFailedError(RuntimeError):
    """A rank raised, died or timed out; the message carries the rank's traceback text."""


def _loopback_interface() -> Optional[str]:
    names = [name for _, name in socket.if_nameindex()]
    for name in ("lo", "lo0"):
        if name in names:
            return name
    return None


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, kwargs: dict, results: Any) -> None:
    # Keep gloo on the loopback interface: without this it binds to whatever the hostname
    # resolves to.
    loopback = _loopback_interface()
    if loopback is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
    os.environ.update(
        MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    exit_when_parent_exits()  # don't outlive a parent killed without its cleanup
    # Two CPU cores shared by all ranks: avoid oversubscribing with intra-op threads.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        init_process_group("gloo", timeout_s=300)
        value = fn(rank, world_size, *args, **kwargs)
        payload = (rank, True, pickle.dumps(value))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        payload = (rank, False, traceback.format_exc())
    try:
        results.put(payload)
    except BaseException:  # noqa: BLE001
        results.put((rank, False, traceback.format_exc()))
    try:
        if torch.distributed.is_initialized():
            # Only tear down when this rank succeeded; a failed rank may have peers stuck in a
            # collective, and the parent kills everyone anyway.
            if payload[1]:
                torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - teardown problems must not mask the result
        pass


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600.0, **kwargs: Any) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned processes.

    Each process joins a gloo process group on a free 127.0.0.1 port through
    ``runtime.distributed.init_process_group`` (which installs the bridges) before ``fn``.
    Returns the per-rank return values, ordered by rank. If any rank raises, the others are killed
    and :class:`RankFailedError` is raised with that rank's traceback text; the same happens when a
    process dies without reporting, or when ``timeout`` seconds pass. (``timeout`` is consumed here,
    not passed to ``fn``.)
    """
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = find_free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, fn, args, kwargs, results),
            daemon=False,
            name=f"ordmoe-rank{rank}",
        )
        for rank in range(world_size)
    ]
    # On the CPU by design, also on a GPU machine: the processes see no CUDA device.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        for proc in procs:
            proc.start()
    finally:
        if visible is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible

    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(values))
                raise RankFailedError(f"run_on_ranks: timed out after {timeout:.0f}s; ranks {missing} did not finish")
            try:
                rank, ok, data = results.get(timeout=min(remaining, 1.0))
            except queue_lib.Empty:
                for rank, proc in enumerate(procs):
                    if rank not in values and not proc.is_alive():
                        # Give a result already in flight a moment to arrive.
                        try:
                            rank2, ok2, data2 = results.get(timeout=2.0)
                        except queue_lib.Empty:
                            raise RankFailedError(
                                f"run_on_ranks: rank {rank} exited with code {proc.exitcode} without reporting a result"
                            ) from None
                        _store(values, rank2, ok2, data2)
                        break
                continue
            _store(values, rank, ok, data)
    finally:
        for proc in procs:
            proc.join(timeout=5.0 if len(values) == world_size else 0.0)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
        results.close()
    return [values[rank] for rank in range(world_size)]


def _store(values: dict, rank: int, ok: bool, data: Any) -> None:
    if not ok:
        raise RankFailedError(f"run_on_ranks: rank {rank} failed:\n{data}")
    values[rank] = pickle.loads(data)
