"""Megatron side I/O: Megatron-LM's checkpoint layout around a ``dist_checkpointing`` checkpoint.

Layout written for converted checkpoints (what Megatron-LM's ``--load`` expects)::

    <dir>/latest_checkpointed_iteration.txt   "release"
    <dir>/release/                            dist_checkpointing checkpoint of
                                              {'model': model.sharded_state_dict(),
                                               'checkpoint_version': 3.0, 'iteration': 0}
    <dir>/model_args.json                     the model flags (ordmoe_megatron.runtime.model_flags)
    <dir>/hf_metadata.json                    HF model_type + carried config fields (for export)

Training checkpoints (``iter_0000100/`` named by the tracker file) are read the same way.
"""

from __future__ import annotations

import dataclasses as dc
import json
import os
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from ordmoe_megatron.runtime import checkpointing, distributed
from ordmoe_megatron.runtime.checkpointing import HF_METADATA, MODEL_ARGS, TRACKER, checkpoint_dir, latest_iteration
from ordmoe_megatron.runtime.model_flags import gpt_model_from_flags, normalize_flags, transformer_config_from_flags

from .engine import ConversionError
from .megatron_lm_args import megatron_lm_model_flags

FLAG = "--mcore-dir"  # how the conversion's refusals name the Megatron checkpoint directory


# ----------------------------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------------------------
def resolve_checkpoint_dir(mcore_dir: str) -> str:
    """The ``dist_checkpointing`` directory: named by the tracker file (``release`` or an
    iteration), or ``mcore_dir`` itself when it is one."""
    has_tracker = os.path.exists(os.path.join(mcore_dir, TRACKER))
    if has_tracker:
        path = checkpoint_dir(mcore_dir, latest_iteration(mcore_dir, FLAG))
    else:
        path = mcore_dir
    if not os.path.exists(os.path.join(path, "metadata.json")):
        raise ConversionError(
            f"{path}: not a Megatron dist_checkpointing checkpoint (no metadata.json"
            + ("" if has_tracker else f", and no {TRACKER} in {mcore_dir}")
            + ")"
        )
    return path


def write_model_args(out_dir: str, flags: Dict[str, Any]) -> None:
    with open(os.path.join(out_dir, MODEL_ARGS), "w") as fh:
        json.dump(normalize_flags(flags), fh, indent=2, sort_keys=True)
        fh.write("\n")


def read_model_args(mcore_dir: str) -> Dict[str, Any]:
    path = os.path.join(mcore_dir, MODEL_ARGS)
    if not os.path.exists(path):
        raise ConversionError(f"{path} not found: the model flags of this checkpoint are needed")
    try:
        with open(path) as fh:
            flags = json.load(fh)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: {e}") from None
    return normalize_flags(flags, where=f"{path}: ")


def read_checkpoint_flags(mcore_dir: str) -> Dict[str, Any]:
    """Model flags of a checkpoint, normalized: ``runtime.checkpointing.checkpoint_model_flags``
    (``model_args.json``, ``run.json``), else a Megatron-LM checkpoint's ``common.pt`` args."""
    flags = checkpointing.checkpoint_model_flags(mcore_dir, FLAG)
    if flags is None:
        flags = megatron_lm_model_flags(mcore_dir, FLAG)
    if flags is None:
        raise ConversionError(
            f"{FLAG} {mcore_dir}: {os.path.join(mcore_dir, MODEL_ARGS)} not found (nor model_flags in the "
            "checkpoint's run.json, nor Megatron-LM's args in its common.pt): the model flags of this "
            "checkpoint are needed"
        )
    return normalize_flags(flags, where=f"{FLAG} {mcore_dir}: ")


def write_hf_metadata(out_dir: str, meta: Dict[str, Any]) -> None:
    with open(os.path.join(out_dir, HF_METADATA), "w") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)
        fh.write("\n")


def read_hf_metadata(mcore_dir: str) -> Optional[Dict[str, Any]]:
    return checkpointing.read_hf_metadata(mcore_dir, FLAG)


# ----------------------------------------------------------------------------------------------
# process / model
# ----------------------------------------------------------------------------------------------
def ensure_single_process() -> None:
    """Conversion runs in one process (gloo even with a GPU: it moves CPU tensors only), unless
    the caller already has a process group and Megatron's parallel state."""
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError("conversion runs in a single process (world size 1)")
        return
    distributed.init_single_process(backend="gloo")


def build_model(flags: Dict[str, Any], device: str = "meta", layer_spec=None):
    """GPTModel for ``flags`` with all parallel sizes 1. ``device='meta'`` allocates nothing:
    conversion only needs its state-dict keys, shapes and sharded-state-dict structure."""
    config = transformer_config_from_flags(
        flags,
        use_cpu_initialization=True,
        perform_initialization=device != "meta",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
    )
    with torch.device(device):
        return gpt_model_from_flags(flags, config, layer_spec=layer_spec, pre_process=True, post_process=True)


def tensor_shapes(model) -> Dict[str, tuple]:
    """state-dict key -> shape for the model's real tensors (no ``_extra_state``)."""
    return {
        k: tuple(v.shape)
        for k, v in model.state_dict(keep_vars=True).items()
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }


def save_checkpoint(sharded_model_sd: Dict[str, Any], out_dir: str) -> None:
    """Write ``out_dir/release`` + tracker (Megatron-LM's layout for a release checkpoint). In a
    multi-rank job every rank calls this with its model's sharded state dict."""
    checkpointing.save_checkpoint(out_dir, None, {"model": sharded_model_sd}, include_rng=False)


def load_model_weights(model, mcore_dir: str, strict: bool = True) -> None:
    """Load a converted (or training) checkpoint's weights into ``model`` (any parallel layout:
    ``dist_checkpointing`` reshards). All ranks call this."""
    root = mcore_dir if os.path.exists(os.path.join(mcore_dir, TRACKER)) else None
    if root is None:
        raise ConversionError(f"{mcore_dir}: no {TRACKER}; point at the directory that holds it")
    checkpointing.load_checkpoint(root, [model], load_rng=False, strict=strict, flag=FLAG)


# ----------------------------------------------------------------------------------------------
# region reads (export streams one decoder layer at a time)
# ----------------------------------------------------------------------------------------------
def read_tensor_metadata(ckpt_dir: str) -> Dict[str, Any]:
    """``runtime.checkpointing.read_tensor_metadata``: a missing or truncated file is named."""
    return checkpointing.read_tensor_metadata(ckpt_dir)


def sharded_region(sh) -> Tuple[str, tuple, tuple]:
    """(sharded key, global offset, size) of the part of the stored global tensor that holds a
    model tensor, for a ``ShardedTensor`` or a ``ShardedTensorFactory`` (e.g. the SwiGLU
    ``linear_fc1`` factory, whose parts tile one box) built with all parallel sizes 1."""
    parts = [sh] if isinstance(sh, ShardedTensor) else list(nested_values(sh.build()))
    keys = {p.key for p in parts}
    if len(keys) != 1 or any(p.flattened_range is not None for p in parts):
        raise ConversionError(f"unsupported sharded layout for {sh.key}")
    boxes = [(tuple(p.global_offset), (1,) * p.prepend_axis_num + tuple(p.local_shape)) for p in parts]
    lo = tuple(min(b[0][d] for b in boxes) for d in range(len(boxes[0][0])))
    hi = tuple(max(b[0][d] + b[1][d] for b in boxes) for d in range(len(boxes[0][0])))
    size = tuple(high - low for low, high in zip(lo, hi))
    volume = 1
    for s in size:
        volume *= s
    if volume != sum(int(torch.Size(b[1]).numel()) for b in boxes):
        raise ConversionError(f"sharded parts of {sh.key} do not tile one region")
    return keys.pop(), lo, size


def read_regions(ckpt_dir: str, requests: Dict[str, Tuple[str, tuple, tuple, torch.dtype]]) -> Dict[str, torch.Tensor]:
    """Read sub-boxes of stored global tensors with plain torch DCP (no process group needed).
    ``requests``: name -> (sharded key, offset, size, dtype). Reading only the boxes asked for
    keeps memory at one layer, whatever parallel layout the checkpoint was saved with."""
    buffers = {name: torch.empty(size, dtype=dtype) for name, (_, _, size, dtype) in requests.items()}

    class _BoxPlanner(LoadPlanner):
        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
            self.metadata = metadata

        def create_local_plan(self):
            items = []
            for name, (key, offset, size, _) in requests.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=torch.Size(size))
                covered = 0
                for item in create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk]):
                    items.append(dc.replace(item, dest_index=MetadataIndex(name)))
                    covered += torch.Size(item.lengths).numel()
                if covered != torch.Size(size).numel():
                    raise ConversionError(
                        f"tensor {key} (for {name}): the checkpoint stores only "
                        f"{covered} of the {torch.Size(size).numel()} values"
                    )
            return LoadPlan(items)

        def create_global_plan(self, global_plan):
            return global_plan

        def finish_plan(self, central_plan):
            return central_plan

        def load_bytes(self, read_item, value):
            raise ConversionError(f"unexpected non-tensor item {read_item.storage_index.fqn}")

        def resolve_tensor(self, read_item):
            t = buffers[read_item.dest_index.fqn]
            for d, (o, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                t = t.narrow(d, o, n)
            return t

        def commit_tensor(self, read_item, tensor):
            pass

    try:
        dcp_load(buffers, storage_reader=FileSystemReader(ckpt_dir), planner=_BoxPlanner(), no_dist=True)
    except (ConversionError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        raise ConversionError(
            f"{ckpt_dir}: reading {', '.join(sorted(requests))[:200]} failed (truncated or corrupt checkpoint?): {e}"
        ) from None
    return buffers
