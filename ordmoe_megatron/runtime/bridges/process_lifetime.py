"""Process lifetime: no process this package starts outlives the process that started it.

``dist_checkpointing``'s writer processes die with the training process
(``checkpoint_writers_die_with_parent``), and a worker that watches its parent ends once the
parent is gone (``exit_when_parent_exits``), however the parent died.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.managers import SyncManager

from megatron.core.dist_checkpointing.strategies import filesystem_async

from ordmoe_megatron.runtime.bridges.guards import replace_existing

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """In a child process: the kernel kills it when its parent dies (Linux), however the parent
    dies; elsewhere a thread watches the parent."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            return
    except (OSError, AttributeError):
        pass
    exit_when_parent_exits()


def exit_when_parent_exits() -> None:
    """A daemon thread ends this process once its parent is gone (however the parent died)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="ordmoe-parent-watch").start()


_writers_bound = False


def checkpoint_writers_die_with_parent() -> None:
    """``dist_checkpointing`` writes through a ``multiprocessing`` manager process it spawns on
    the first save and keeps (275-600 MB), and through forked writer processes. A SIGKILL of the
    training process left them running as orphans. Here the manager is started ahead of Megatron,
    with a parent watch, and every forked child dies with its parent. Idempotent."""
    global _writers_bound
    if _writers_bound:
        return
    replace_existing(
        filesystem_async,
        "_results_queue",
        filesystem_async._results_queue,
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
    )
    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=_die_with_parent)
        _MANAGERS.append(manager)
        filesystem_async._results_queue = manager.Queue()
    os.register_at_fork(after_in_child=_die_with_parent)
    _writers_bound = True


_MANAGERS: list = []  # kept alive for the process's life, as Megatron keeps its own
