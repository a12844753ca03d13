"""Hugging Face <-> Megatron-Core conversion entry points (``ordmoe-convert``: convert/cli.py)."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Dict, Optional

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from ordmoe_megatron.runtime import outputs
from ordmoe_megatron.runtime.model_flags import normalize_flags

from . import hf_io, mcore_io
from .engine import ConversionError, check_hf_tensors, iter_layer_groups
from .families import Family, get_family, infer_family


# ----------------------------------------------------------------------------------------------
# output safety (the rule is runtime.outputs')
# ----------------------------------------------------------------------------------------------
def check_output(out_dir: str, force: bool) -> None:
    """Refuse to touch an existing, non-empty output unless ``force`` (checked before any work)."""
    outputs.check_output(out_dir, force, "--force", is_dir=True)


@contextmanager
def staged_output(out_dir: str, force: bool):
    """``runtime.outputs.staged_dir``: the finished conversion replaces ``out_dir``; a failed one
    leaves it as it was."""
    check_output(out_dir, force)
    with outputs.staged_dir(out_dir, force, "--force") as tmp:
        yield tmp


def hf_config_to_flags(hf_dir: str):
    """Read and validate ``hf_dir/config.json``; returns (family, flags, saved config fields)."""
    model_type, saved, full, _ = hf_io.load_hf_config(hf_dir)
    family = get_family(model_type)
    flags = normalize_flags(family.config.to_flags(saved, full, family.model_type))
    return family, flags, saved


def _set_sharded_data(sh, tensor: torch.Tensor):
    if isinstance(sh, ShardedTensor):
        return dataclasses.replace(sh, data=tensor, dtype=tensor.dtype)
    return dataclasses.replace(sh, data=tensor)  # ShardedTensorFactory


def spill_to_disk(tensor: torch.Tensor, directory: str, index: int) -> torch.Tensor:
    """The tensor, written to a file and mapped back: the one ``dist_checkpointing.save`` of the
    whole model then reads pages from disk, so a model larger than memory converts with memory
    for about one tensor at a time."""
    path = os.path.join(directory, f"{index}.bin")
    tensor.contiguous().view(torch.uint8).numpy().tofile(path)
    return torch.from_file(path, shared=True, size=tensor.numel(), dtype=tensor.dtype).view(tensor.shape)


def hf_to_mcore(
    hf_dir: str, out_dir: str, force: bool = False, log: Optional[Callable[[str], None]] = None
) -> Dict[str, Any]:
    """Convert a Hugging Face MoE checkpoint into Megatron-LM's release layout at ``out_dir``;
    returns the model flags. Everything is validated (config fields, tensor names, shapes,
    file integrity) before any output is written; tensors are read one at a time."""
    log = log or (lambda s: None)
    check_output(out_dir, force)
    family, flags, saved = hf_config_to_flags(hf_dir)
    ckpt = hf_io.HFCheckpoint(hf_dir)
    table = family.tensors
    tied = not flags["untie_embeddings_and_output_weights"]
    if flags.get("mtp_num_layers") and not table.has_mtp_layers(ckpt.tensors, flags):
        # transformers' save_pretrained drops the MTP layers it does not build: the main model
        log(f"config.json has {flags['mtp_num_layers']} MTP layer(s), the checkpoint none: importing without MTP")
        flags = dict(flags, mtp_num_layers=None)
    copies = table.copy_names(flags)

    mcore_io.ensure_single_process()
    model = mcore_io.build_model(flags, device="meta")
    plan = table.plan(mcore_io.tensor_shapes(model), flags)
    check_hf_tensors(plan, ckpt.tensors, table, tied, copies)
    for p in plan:
        dtypes = {ckpt.tensors[n][1] for n in p.hf_names}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ConversionError(
                f"tensors {', '.join(p.hf_names)} have dtypes {sorted(map(str, dtypes))}; expected one floating dtype"
            )

    log(f"{family.model_type}: {len(plan)} Megatron tensors from {len(ckpt.tensors)} HF tensors")
    meta = {"model_type": family.model_type, "architecture": family.architecture, "config": saved}
    with staged_output(out_dir, force) as tmp, tempfile.TemporaryDirectory(dir=tmp) as spill:
        sharded = model.sharded_state_dict()
        for i, p in enumerate(plan):
            tensor = p.rule.transform.to_mcore([ckpt.get(n) for n in p.hf_names], flags)
            if tuple(tensor.shape) != p.mcore_shape:  # guards the tables themselves
                raise ConversionError(
                    f"{p.mcore_key}: built shape {list(tensor.shape)}, model expects {list(p.mcore_shape)}"
                )
            sharded[p.mcore_key] = _set_sharded_data(sharded[p.mcore_key], spill_to_disk(tensor, spill, i))
        if tied and table.tied_output and table.tied_output[0] in ckpt.tensors:
            out_name, src = table.tied_output
            if not torch.equal(ckpt.get(out_name), ckpt.get(src)):
                raise ConversionError(f"tie_word_embeddings is true but tensor {out_name} differs from {src}")
        for name, src in copies.items():
            src = src if src in ckpt.tensors else table.tied_output[1]
            if not torch.equal(ckpt.get(name), ckpt.get(src)):
                raise ConversionError(
                    f"tensor {name} differs from {src}: megatron-core's MTP layer shares {src}, "
                    "so only equal copies map"
                )
        ckpt.close()
        mcore_io.save_checkpoint(sharded, tmp)
        mcore_io.write_model_args(tmp, flags)
        mcore_io.write_hf_metadata(tmp, meta)
    log(f"wrote {out_dir}")
    return flags


# ----------------------------------------------------------------------------------------------
# Megatron -> HF
# ----------------------------------------------------------------------------------------------
def flags_to_hf_config(family: Family, flags: Dict[str, Any], meta: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """HF config values for ``flags``: mapped fields from the table, non-model fields carried
    from the import's metadata (when there is one). A mapped field whose recorded value equals
    the new one keeps its recorded spelling (e.g. 10000 vs 10000.0)."""
    mapped = family.config.to_hf(flags)
    recorded = (meta or {}).get("config", {}) if (meta or {}).get("model_type") == family.model_type else {}
    values = {k: v for k, v in recorded.items() if k in family.config.carried()}
    for k, v in mapped.items():
        values[k] = recorded[k] if k in recorded and recorded[k] == v else v
    values.setdefault("architectures", [family.architecture])
    return values


def _regions(plan, sharded, md) -> Dict[str, tuple]:
    """For every planned Megatron tensor: (sharded key, offset, size, dtype) in the checkpoint;
    a missing tensor or a global shape that differs from what the flags imply is an error."""
    out = {}
    for p in plan:
        sh = sharded[p.mcore_key]
        key, offset, size = mcore_io.sharded_region(sh)
        if key not in md:
            raise ConversionError(f"missing tensor {key} (for {p.mcore_key}) in the Megatron checkpoint")
        stored = tuple(md[key].size)
        expected = tuple(sh.global_shape) if hasattr(sh, "global_shape") else None
        if expected is None:
            expected = tuple(next(iter(nested_values(sh.build()))).global_shape)
        if stored != expected:
            raise ConversionError(
                f"tensor {key} (for {p.mcore_key}) has shape {list(stored)} in the Megatron "
                f"checkpoint, the model flags imply {list(expected)}"
            )
        dtype = md[key].properties.dtype
        if not dtype.is_floating_point:
            raise ConversionError(f"tensor {key} has non-float dtype {dtype}")
        out[p.mcore_key] = (key, offset, size, dtype)
    used = {r[0] for r in out.values()}
    extra = sorted(k for k in md if k.startswith(("embedding.", "decoder.", "output_layer.", "mtp.")) and k not in used)
    if extra:
        raise ConversionError(
            "Megatron checkpoint tensor(s) not part of the model that "
            "model_args.json describes: " + ", ".join(extra[:8])
        )
    return out


def tied_written(family: Family, flags: Dict[str, Any], name: str) -> bool:
    """Whether export writes ``name`` itself (a tied output layer is written as the embedding)."""
    tied = not flags["untie_embeddings_and_output_weights"]
    return not (tied and family.tensors.tied_output and name == family.tensors.tied_output[0])


def mcore_to_hf(
    mcore_dir: str,
    out_dir: str,
    force: bool = False,
    model_type: Optional[str] = None,
    max_shard_size: Any = hf_io.DEFAULT_MAX_SHARD_BYTES,
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """Convert a Megatron checkpoint (release/iteration dir named by the tracker; model flags from
    ``model_args.json`` or the iteration's ``run.json``) into a Hugging Face directory (``config.json``
    + safetensors, sharded above ``max_shard_size``).
    Loads and writes one decoder layer at a time. Returns the HF config values."""
    log = log or (lambda s: None)
    check_output(out_dir, force)
    ckpt_dir = mcore_io.resolve_checkpoint_dir(mcore_dir)
    flags = mcore_io.read_checkpoint_flags(mcore_dir)
    md = mcore_io.read_tensor_metadata(ckpt_dir)
    if flags["padded_vocab_size"] is None and "embedding.word_embeddings.weight" in md:
        # a training run's padding depends on its TP size: take the stored embedding's rows
        flags = dict(flags, padded_vocab_size=int(md["embedding.word_embeddings.weight"].size[0]))
    meta = mcore_io.read_hf_metadata(mcore_dir)
    if model_type is None and meta is not None:
        model_type = meta.get("model_type")
    family = get_family(model_type) if model_type else infer_family(flags)
    log(f"{family.model_type}: exporting {mcore_dir}")  # names the family its refusals are about
    hf_values = flags_to_hf_config(family, flags, meta)

    mcore_io.ensure_single_process()
    model = mcore_io.build_model(flags, device="meta")
    plan = family.tensors.plan(mcore_io.tensor_shapes(model), flags)
    regions = _regions(plan, model.sharded_state_dict(), md)
    del model
    if "dtype" not in hf_values and "torch_dtype" not in hf_values:
        hf_values["dtype"] = str(regions["embedding.word_embeddings.weight"][3]).replace("torch.", "")

    copies: Dict[str, list] = {}
    for name, src in family.tensors.copy_names(flags).items():
        copies.setdefault(src if tied_written(family, flags, src) else family.tensors.tied_output[1], []).append(name)
    max_bytes = hf_io.parse_size(max_shard_size)
    with staged_output(out_dir, force) as tmp:
        writer = hf_io.ShardWriter(tmp, max_bytes)
        for group in iter_layer_groups(plan):
            loaded = mcore_io.read_regions(ckpt_dir, {p.mcore_key: regions[p.mcore_key] for p in group})
            for p in group:
                tensor = loaded.pop(p.mcore_key).reshape(p.mcore_shape)
                parts = p.rule.transform.to_hf(tensor, len(p.hf_names), flags)
                for name, t, shape in zip(p.hf_names, parts, p.hf_shapes):
                    if tuple(t.shape) != tuple(shape):
                        raise ConversionError(f"{name}: built shape {list(t.shape)}, expected {list(shape)}")
                    writer.add(name, t)
                    for copy in copies.get(name, ()):  # an MTP layer's copy of a shared tensor
                        writer.add(copy, t.clone())
        files = writer.finish()
        hf_io.write_hf_config(tmp, family.model_type, hf_values)
    log(f"wrote {out_dir} ({family.model_type}, {len(files)} safetensors file(s))")
    return hf_values
