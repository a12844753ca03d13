"""Running the cells: several at once, each its own ``ordmoe-pretrain`` process, resumable.

A cell is finished when its ``result.json`` exists (written after its run succeeded and its
evaluation was read); a later sweep skips it. An unfinished cell (the sweep was stopped while it
ran, or it failed) starts over: its directory is cleared first. A SIGTERM or SIGINT to the sweep
goes on to every running cell, and the sweep ends only after they have saved and ended; a sweep
killed outright takes its cells with it (Linux). Either way no run is left behind writing into a
cell's directory when a resumed sweep clears it.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

from ordmoe_megatron.runtime.outputs import RunLock, read_json_file, read_json_lines, staged_file
from ordmoe_megatron.sweep.config import SweepConfig
from ordmoe_megatron.sweep.plan import Cell, cell_command

RESULT = "result.json"
# The child asks the kernel for SIGTERM when the sweep dies, then becomes the cell's run.
_DIE_WITH_SWEEP = (
    "import ctypes, os, signal, sys\n"
    "try:\n    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)\nexcept (OSError, AttributeError):\n"
    "    pass\nos.execv(sys.executable, [sys.executable] + sys.argv[1:])"
)


def read_result(config: SweepConfig, cell: Cell) -> Optional[dict]:
    path = os.path.join(cell.directory(config.out), RESULT)
    if not os.path.isfile(path):
        return None
    return read_json_file(path, "the cell runs again")


class _CellProcesses:
    """The running cells' processes. A stop signal to the sweep is passed on to each of them, and
    the sweep waits for them before it ends the way the signal would have ended it; no cell starts
    after that."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopped = False
        self.previous: dict = {}

    def __enter__(self) -> "_CellProcesses":
        if threading.current_thread() is threading.main_thread():  # only there can Python take signals
            for signum in self.SIGNALS:
                previous = signal.getsignal(signum)
                if previous in (signal.SIG_IGN, None):  # ignored (nohup), or a handler outside Python: left as is
                    continue
                self.previous[signum] = signal.signal(signum, self._stop)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)

    def start(self, command: list, **kwargs) -> Optional[subprocess.Popen]:
        """The cell's process, or None once the sweep is stopping."""
        with self.lock:
            if self.stopped:
                return None
            # Its own session: a Ctrl-C at the terminal reaches the cell once, from the sweep (a
            # second signal would end its save at once).
            process = subprocess.Popen(command, start_new_session=True, **kwargs)
            self.running.add(process)
            return process

    def wait(self, process: subprocess.Popen) -> int:
        code = process.wait()
        with self.lock:
            self.running.discard(process)
        return code

    def _stop(self, signum, frame) -> None:
        with self.lock:
            self.stopped = True
            running = list(self.running)
        # os.write, not print: the signal may have landed inside a print of the main thread.
        message = f"{signal.Signals(signum).name}: waiting for {len(running)} running cell(s) to save and end"
        os.write(sys.stdout.fileno(), f" sweep | {message}\n".encode())
        for process in running:
            process.send_signal(signum)
        for process in running:
            process.wait()
        self.__exit__()
        signal.raise_signal(signum)  # now end as the signal would have
        raise SystemExit(128 + signum)  # its restored handler returned


def run_cells(config: SweepConfig, cells: list[Cell], log: Callable[[str], None]) -> dict[Cell, dict]:
    """Run the unfinished ``cells`` (``config.jobs`` at a time); every cell's result, finished
    before or now. A failed cell's result has ``"failed"``: the log's last lines."""
    results = {cell: read_result(config, cell) for cell in cells}
    todo = [cell for cell in cells if results[cell] is None]
    for cell in cells:
        if results[cell] is not None:
            log(f"cell {cell.key}: finished before, kept")
    if not todo:
        return results
    gpus: "queue.Queue[Optional[int]]" = queue.Queue()
    for slot in range(config.jobs):
        gpus.put(slot % config.gpus if config.gpus else None)
    started, durations = time.time(), []
    for cell in todo:  # a cell another sweep's run still holds: refused before any cell runs
        _check_not_held(cell.directory(config.out), cell)
    with _CellProcesses() as processes, concurrent.futures.ThreadPoolExecutor(max_workers=config.jobs) as pool:
        futures = {pool.submit(_run_cell, config, cell, gpus, processes): cell for cell in todo}
        for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
            cell = futures[future]
            result = future.result()
            results[cell] = result
            durations.append(result["seconds"])
            left = len(todo) - done
            eta = sum(durations) / len(durations) * left / config.jobs
            log(
                f"cell {done:3d}/{len(todo)} {cell.key} | "
                + (
                    f"FAILED (exit {result['exit_code']}; see {result['log']})"
                    if "failed" in result
                    else f"path-1 ppl {result['path_perplexity'][0]:.3f}"
                )
                + f" | {result['seconds']:.1f} s | elapsed {_clock(time.time() - started)} | eta {_clock(eta)}"
            )
    return results


def _check_not_held(where: str, cell: Cell) -> None:
    """A cell whose run (of another sweep on the same --out) still holds its checkpoints is
    refused, not cleared. A run that has not made its checkpoint directory yet is not seen."""
    checkpoints = os.path.join(where, "checkpoints")
    if os.path.isdir(checkpoints):
        RunLock(checkpoints, f"cell {cell.key}: --save").release()


def _run_cell(config: SweepConfig, cell: Cell, gpus: "queue.Queue", processes: _CellProcesses) -> dict:
    where = cell.directory(config.out)
    if os.path.isdir(where):
        _check_not_held(where, cell)
        shutil.rmtree(where)  # an unfinished cell starts over
    os.makedirs(where)
    gpu = gpus.get()
    env = {**os.environ, "OMP_NUM_THREADS": str(config.threads_per_job)}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    command = cell_command(config, cell)
    start = time.time()
    try:
        with open(os.path.join(where, "log.txt"), "w") as out:
            out.write(" ".join(command) + "\n\n")
            out.flush()
            process = processes.start(
                [sys.executable, "-c", _DIE_WITH_SWEEP, *command[1:]], stdout=out, stderr=subprocess.STDOUT, env=env
            )
            code = processes.wait(process) if process is not None else None
    finally:
        gpus.put(gpu)
    seconds = time.time() - start
    log_path = os.path.join(where, "log.txt")
    if code is None:
        return {
            "failed": "the sweep was stopped before this cell started",
            "exit_code": None,
            "log": log_path,
            "seconds": 0.0,
        }
    if code != 0:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        return {"failed": tail, "exit_code": code, "log": log_path, "seconds": seconds}
    result = cell_result(where, seconds)
    with staged_file(os.path.join(where, RESULT)) as tmp:
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
    return result


def cell_result(where: str, seconds: float) -> dict:
    """The cell's held-out evaluation (its ``eval.json`` row), last training losses, and time."""
    with open(os.path.join(where, "eval.json")) as f:
        evaluation = next(iter(json.load(f).values()))
    last = read_json_lines(os.path.join(where, "metrics.jsonl"), "--metrics-out")[-1]
    return {
        **evaluation,
        "train_lm_loss": last["lm_loss"],
        "train_rank_loss": last.get("rank_loss"),
        "seconds": seconds,
    }


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
