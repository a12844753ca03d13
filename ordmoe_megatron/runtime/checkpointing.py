"""Checkpoints in Megatron-LM's layout, written with ``megatron.core.dist_checkpointing``.

``<root>/latest_checkpointed_iteration.txt`` names the newest complete checkpoint
(``release`` for converted ones); ``<root>/iter_0000100/`` holds the distributed checkpoint of
``{'model': ..., 'optimizer': ...}`` (``model0``, ``model1``, .. with virtual pipeline stages),
``run.json`` (iteration, data position, LR scheduler, model flags, OrdMoE settings) and one
``rng_rank<N>.pt`` per rank. A checkpoint saved under one parallel layout loads under another.

A save writes into a temporary directory that is renamed into place before the tracker file is
replaced (both atomic), so an interrupted save never leaves a checkpoint that loads as valid.

The functions that read a checkpoint take ``flag``, the flag that named its directory
(``--load``): their refusals then start with ``--load <root>: ``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle  # only for its error type: nothing here unpickles outside weights_only=True
import random
import re
import shutil
import tempfile
from typing import Callable, Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.runtime import bridges, compat
from ordmoe_megatron.runtime.distributed import device
from ordmoe_megatron.runtime.model_flags import normalize_flags

TRACKER = "latest_checkpointed_iteration.txt"
RUN_FILE = "run.json"
MODEL_ARGS = "model_args.json"  # the model flags next to a converted checkpoint
HF_METADATA = "hf_metadata.json"  # a converted checkpoint's Hugging Face model type and fields
CHECKPOINT_VERSION = 3.0


class CheckpointError(OrdMoEError):
    """A checkpoint that cannot be used: missing, incomplete, corrupt or from another model."""


def _given(flag: Optional[str], root: str) -> str:
    """How a refusal names the checkpoint directory the user gave: ``'--load ckpt: '``."""
    return f"{flag} {root}: " if flag else ""


def checkpoint_dir(root: str, iteration: Optional[int]) -> str:
    return os.path.join(root, "release" if iteration is None else f"iter_{iteration:07d}")


def latest_iteration(root: str, flag: Optional[str] = None) -> Optional[int]:
    """The iteration the tracker names (None for ``release``); CheckpointError if there is none."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        raise CheckpointError(
            _given(flag, root)
            + f"{root} is not a checkpoint directory: {TRACKER} is missing. Point --load at the directory "
            "that --save wrote (the one containing the tracker file)."
        )
    try:
        with open(tracker) as f:
            tag = f.read().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(_given(flag, root) + f"{tracker} cannot be read ({err}); restore it") from None
    if tag == "release":
        return None
    try:
        return int(tag)
    except ValueError:
        raise CheckpointError(
            _given(flag, root) + f"{tracker} is corrupt (holds {tag!r}); it should name an iteration or 'release'"
        ) from None


def has_checkpoint(root: Optional[str]) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, TRACKER))


def sharded_model_state(chunks: list) -> dict:
    """Megatron-LM's naming: ``model``, or ``model0``, ``model1``, .. with virtual stages."""
    if len(chunks) == 1:
        return {"model": _sharded_state_dict(chunks[0])}
    return {f"model{i}": _sharded_state_dict(chunk) for i, chunk in enumerate(chunks)}


def _sharded_state_dict(chunk) -> dict:
    # A stage with the MTP block but not the embedding (the last pipeline stage) ties its copy of
    # the embedding through the data-parallel group that Megatron-LM passes in the metadata.
    if getattr(chunk, "mtp_process", False) and not chunk.pre_process:
        return chunk.sharded_state_dict(metadata=ensure_metadata_has_dp_cp_group(None))
    return chunk.sharded_state_dict()


def rng_path(path: str, rank: int) -> str:
    """The random states a rank saved in the iteration directory ``path``."""
    return os.path.join(path, f"rng_rank{rank}.pt")


def random_states() -> dict:
    """Every random generator's state on this rank (Python, NumPy, torch, CUDA, Megatron's
    tracker), as tensors, ints and floats only: ``torch.load(weights_only=True)`` reads it back,
    so a crafted ``rng_rank<N>.pt`` cannot run code."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "state": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "tracker": dict(get_cuda_rng_tracker().get_states()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_random_states(state: dict) -> None:
    """Restore what ``random_states`` returned."""
    py, npy = state["python"], state["numpy"]
    random.setstate((int(py["version"]), tuple(int(w) for w in py["state"].tolist()), py["gauss"]))
    np.random.set_state(
        (
            npy["kind"],
            npy["state"].numpy().astype(np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def read_random_states(rng_file: str, given: str = "") -> dict:
    """The random states in ``rng_file``, read with ``weights_only=True`` (tensors and plain
    values only: nothing in the file runs); a ``CheckpointError`` names the file otherwise."""
    try:
        state = torch.load(rng_file, weights_only=True)
        if not isinstance(state, dict) or not {"python", "numpy", "torch", "tracker"} <= set(state):
            raise ValueError("not the random states ordmoe-pretrain saves")
        return state
    except (OSError, EOFError, RuntimeError, KeyError, ValueError, TypeError, pickle.UnpicklingError) as err:
        detail = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(
            given + f"{rng_file}: cannot restore the random states ({type(err).__name__}: {detail}); "
            "a file that holds more than tensors and numbers is not read. Restore the file, load an "
            "earlier checkpoint, or pass --finetune to start from its weights"
        ) from None


def write_text_atomically(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` through a fresh ``mkstemp`` file next to it: a link planted
    under a temporary name is never followed, and ``path`` is never half written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def check_stale_saves(root: Optional[str], flag: str = "--save") -> None:
    """Refuse, before any work, an ``iter_NNNNNNN.incomplete`` (or ``release.incomplete``) entry
    under ``root`` that is not a directory (a file, or a link: planted, never followed). A
    directory of that name is what an interrupted save of ours leaves: the next save replaces it."""
    if not root or not os.path.isdir(root):
        return
    for name in sorted(os.listdir(root)):
        if re.fullmatch(r"(iter_\d{7}|release)\.incomplete", name):
            entry = os.path.join(root, name)
            if os.path.islink(entry) or not os.path.isdir(entry):
                raise CheckpointError(
                    f"{flag} {root}: {entry} is a {'link' if os.path.islink(entry) else 'file'}, not an "
                    "interrupted save of ordmoe-pretrain; remove it"
                )


def save_checkpoint(
    root: str,
    iteration: Optional[int],
    model_state: dict,
    optimizer=None,
    run: Optional[dict] = None,
    include_rng: bool = True,
) -> str:
    """Save ``model_state`` (``sharded_model_state(chunks)``) and optimizer, run state, RNG for
    ``iteration`` (None: ``release``). Every rank calls it."""
    rank = torch.distributed.get_rank()
    final = checkpoint_dir(root, iteration)
    tmp = final + ".incomplete"
    if rank == 0:
        check_stale_saves(root)
        shutil.rmtree(tmp, ignore_errors=True)  # an interrupted save of ours
        os.makedirs(tmp)
    torch.distributed.barrier()
    # checkpoint_version and iteration are what Megatron-LM's loader reads from the common state.
    state = {**model_state, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration or 0}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_state)
    bridges.checkpoint_writers_die_with_parent()
    failure = None
    try:
        dist_checkpointing.save(state, tmp)
        if include_rng:
            torch.save(random_states(), rng_path(tmp, rank))
        if rank == 0:
            with open(os.path.join(tmp, RUN_FILE), "w") as f:
                json.dump({"iteration": iteration, **(run or {})}, f, indent=2, default=str)
    except Exception as err:  # noqa: BLE001 - a full disk reaches us wrapped in many types
        failure = _os_error(err)
        if failure is None:
            raise
    failed = torch.tensor([int(failure is not None)], device=device())
    torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)  # every rank stops alike
    if failed.item():
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_iteration(root) if has_checkpoint(root) else None
        why = f"{failure.strerror or failure}" if failure is not None else "another rank could not write"
        raise CheckpointError(
            f"--save {root}: cannot write the checkpoint of iteration {iteration} ({why}); "
            + (f"the checkpoint of iteration {previous} is kept" if has_checkpoint(root) else "nothing was saved")
            + ": free space (or fix the directory) and run the same command to resume"
        )
    torch.distributed.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_text_atomically(os.path.join(root, TRACKER), "release" if iteration is None else str(iteration))
    torch.distributed.barrier()
    return final


def non_finite_parameters(chunks: list) -> list[str]:
    """The names of the parameters of ``chunks`` that hold a NaN or an infinity (on this rank)."""
    return [
        name
        for chunk in chunks
        for name, param in chunk.named_parameters()
        if not bool(torch.isfinite(param.detach()).all())
    ]


def _os_error(err: BaseException) -> Optional[OSError]:
    """The ``OSError`` (a full disk, a read-only directory) behind ``err``, if one is."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _take_current_schedule(state, current_groups: list) -> None:
    """Give the saved parameter groups in ``state`` the current groups' schedule values where the
    optimizer matches groups by them (``compat.SCHEDULE_GROUP_KEYS``, megatron-core 0.19). The
    schedule is the run's: a resume compared it, or overrides it on purpose; the scheduler sets
    the groups' learning rates from it on the next step either way."""
    if not compat.SCHEDULE_GROUP_KEYS:
        return
    identity = lambda group: tuple(group.get(key) for key in compat.GROUP_IDENTITY_KEYS)  # noqa: E731
    current = {identity(group): group for group in current_groups}
    for groups in _param_group_lists(state):
        for group in groups:
            match = current.get(identity(group))
            if match is None:
                continue
            for key in compat.SCHEDULE_GROUP_KEYS:  # an absent key means "the scheduler's value"
                if key in match:
                    group[key] = match[key]
                else:
                    group.pop(key, None)


def _param_group_lists(state):
    """Every ``param_groups`` list in an optimizer state (chained and mixed-precision optimizers
    nest them)."""
    if isinstance(state, dict):
        if isinstance(state.get("param_groups"), list):
            yield state["param_groups"]
        for value in state.values():
            if isinstance(value, (dict, list)):
                yield from _param_group_lists(value)
    elif isinstance(state, list):
        for value in state:
            yield from _param_group_lists(value)


def read_run(root: str, flag: Optional[str] = None) -> dict:
    """``run.json`` of the newest checkpoint under ``root`` ({} for converted checkpoints)."""
    path = os.path.join(checkpoint_dir(root, latest_iteration(root, flag)), RUN_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(
            _given(flag, root) + f"{path} is corrupt ({err}); restore it or load an earlier checkpoint"
        ) from None


def checkpoint_model_flags(root: str, flag: Optional[str] = None) -> Optional[dict]:
    """The model flags a checkpoint was made with: ``model_args.json`` (converted checkpoints) or
    ``run.json`` (checkpoints saved by ordmoe-pretrain); None if it records neither."""
    converted = os.path.join(root, MODEL_ARGS)
    if os.path.isfile(converted):
        try:
            with open(converted) as f:
                return json.load(f)
        except (OSError, ValueError) as err:
            raise CheckpointError(
                _given(flag, root) + f"{converted} is corrupt ({err}); convert the model again"
            ) from None
    return read_run(root, flag).get("model_flags")


def check_compatible(root: str, model_flags: dict, flag: str = "--load") -> None:
    """Refuse a checkpoint whose model differs from the one about to be built (before loading)."""
    saved = checkpoint_model_flags(root, flag)
    if saved is None:
        return
    # The training length is not part of the model: a model may continue at another length.
    differing = {k: (saved[k], v) for k, v in model_flags.items() if k in saved and k != "seq_length" and saved[k] != v}
    if differing:
        detail = ", ".join(
            f"--{k.replace('_', '-')} is {v!r} here but {s!r} in the checkpoint" for k, (s, v) in differing.items()
        )
        raise CheckpointError(
            f"{flag} {root} was saved by another model configuration: {detail}. "
            f"Use the checkpoint's model flags (see its run.json) or another {flag}."
        )


def load_checkpoint(
    root: str,
    chunks: list,
    optimizer=None,
    load_rng: bool = True,
    strict: bool = True,
    optional: Optional[Callable[[str], bool]] = None,
    flag: Optional[str] = None,
) -> dict:
    """Load the newest checkpoint under ``root`` into ``chunks`` (and ``optimizer``, and with
    ``load_rng`` this rank's random states, which must be there); returns its ``run.json``.

    ``optional(name)``: model state the checkpoint may lack (a state-dict name); what it lacks
    keeps the model's own values."""
    given = _given(flag, root)
    iteration = latest_iteration(root, flag)
    path = checkpoint_dir(root, iteration)
    check_layout(path, given)
    state = sharded_model_state(chunks)
    absent: dict = {}
    if optional is not None:
        stored = read_tensor_metadata(path, given)
        for model_key, model_state in state.items():
            absent[model_key] = [
                name
                for name, value in model_state.items()
                if optional(name) and getattr(value, "key", name) not in stored
            ]
            for name in absent[model_key]:
                del model_state[name]
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=True)
    try:
        loaded = dist_checkpointing.load(state, path)
    except Exception as err:  # dist_checkpointing raises many types; name the checkpoint and the cause
        raise CheckpointError(given + f"cannot load {path}: {type(err).__name__}: {err}") from err
    for i, chunk in enumerate(chunks):
        model_key = "model" if len(chunks) == 1 else f"model{i}"
        own = chunk.state_dict()
        chunk.load_state_dict(
            {**loaded[model_key], **{name: own[name] for name in absent.get(model_key, [])}}, strict=strict
        )
    if optimizer is not None:
        _take_current_schedule(loaded["optimizer"], optimizer.param_groups)
        optimizer.load_state_dict(loaded["optimizer"])
    if load_rng:
        set_random_states(read_random_states(rng_path(path, torch.distributed.get_rank()), given))
    return read_run(root, flag)


def check_layout(path: str, given: str = "") -> None:
    """The iteration directory is a whole checkpoint this megatron-core can read:
    ``metadata.json`` readable, and ``common.pt`` there when the layout has one. ``given``
    starts every refusal (``_given``)."""
    if not os.path.isdir(path):
        raise CheckpointError(
            given + f"{path} is missing: the tracker names a checkpoint that is not there; point the "
            "tracker at an iteration that exists, or load an earlier checkpoint"
        )
    meta_file = os.path.join(path, "metadata.json")
    if not os.path.isfile(meta_file):
        raise CheckpointError(
            given + f"{path} is missing or incomplete (no metadata.json); the save may have been "
            "interrupted: load an earlier checkpoint"
        )
    try:
        with open(meta_file) as f:
            metadata = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(
            given + f"{meta_file} is corrupt ({err}); restore it or load an earlier checkpoint"
        ) from None
    problem = compat.checkpoint_layout_problem(metadata)
    if problem:
        raise CheckpointError(given + f"{path} {problem}")
    if "common_backend" in metadata and not os.path.isfile(os.path.join(path, "common.pt")):
        raise CheckpointError(
            given + f"{os.path.join(path, 'common.pt')} is missing (the checkpoint's common state); "
            "restore it or load an earlier checkpoint"
        )


def read_tensor_metadata(path: str, given: str = "") -> dict:
    """Sharded key -> torch DCP ``TensorStorageMetadata`` of the checkpoint in ``path``, after
    checking that every stored item lies inside its file: a missing or truncated ``.distcp`` is
    named here, before anything is built. ``given`` starts every refusal (``_given``)."""
    try:
        md = FileSystemReader(path).read_metadata()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001 - torch raises many types here
        raise CheckpointError(given + f"{path}: unreadable checkpoint metadata (.metadata): {err}") from None
    sizes: dict = {}
    for index, info in (md.storage_data or {}).items():
        rel = getattr(info, "relative_path", None)
        if rel is None:
            continue
        if rel not in sizes:
            file = os.path.join(path, rel)
            if not os.path.exists(file):
                raise CheckpointError(given + f"{file}: checkpoint file missing (holds {index.fqn})")
            sizes[rel] = os.path.getsize(file)
        end = int(info.offset) + int(info.length)
        if sizes[rel] < end:
            raise CheckpointError(
                given + f"{os.path.join(path, rel)}: truncated checkpoint file ({sizes[rel]} bytes, "
                f"{index.fqn} ends at byte {end})"
            )
    return {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


@dataclasses.dataclass
class CheckpointInfo:
    """What ``inspect_checkpoint`` found: enough to build the model before loading anything."""

    root: str
    iteration: Optional[int]  # None for a converted ('release') checkpoint
    path: str  # the iteration directory
    flags: Optional[dict]  # the model flags, normalized (None when the checkpoint records none)
    tensors: dict  # sharded key -> storage metadata
    run: dict  # run.json ({} for converted checkpoints)
    hf_metadata: Optional[dict]  # hf_metadata.json of a converted checkpoint

    @property
    def kind(self) -> str:
        return "converted" if self.iteration is None else "trained"


def inspect_checkpoint(root: str, flag: Optional[str] = None, read_tensors: bool = True) -> CheckpointInfo:
    """The one checkpoint check of every front end, without loading weights: the tracker, the
    iteration directory, ``metadata.json``, every stored file against the checkpoint metadata,
    ``run.json`` and the model flags. A ``CheckpointError`` names the bad file.

    The checkpoint metadata (``.metadata``) is a pickle, read only where the checkpoint is about
    to be loaded anyway: ``read_tensors=False`` (a dry run) leaves it unread and ``tensors`` empty."""
    given = _given(flag, root)
    if not os.path.isdir(root):
        raise CheckpointError(given + f"{root}: no such checkpoint directory")
    iteration = latest_iteration(root, flag)
    path = checkpoint_dir(root, iteration)
    check_layout(path, given)
    tensors = read_tensor_metadata(path, given) if read_tensors else {}
    run = read_run(root, flag)
    flags = checkpoint_model_flags(root, flag)
    if flags is not None:
        flags = normalize_flags(flags, where=given + f"{root}: unusable model flags: ")
    return CheckpointInfo(
        root=root,
        iteration=iteration,
        path=path,
        flags=flags,
        tensors=tensors,
        run=run,
        hf_metadata=read_hf_metadata(root, flag),
    )


def read_hf_metadata(root: str, flag: Optional[str] = None) -> Optional[dict]:
    """``hf_metadata.json`` next to a converted checkpoint (None when there is none)."""
    path = os.path.join(root, HF_METADATA)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(_given(flag, root) + f"{path} is corrupt ({err}); convert the model again") from None
