"""Hugging Face side I/O: validated, lazy safetensors reading and sharded writing.

``transformers`` and ``safetensors`` are optional (the ``convert`` extra): they are imported where
conversion uses them, so the rest of the package works without them.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Dict, List, Tuple

import torch

from ordmoe_megatron.runtime import outputs

from .engine import ConversionError
from .families import get_family

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors_header(path: str) -> Dict[str, Dict[str, Any]]:
    """Parse a safetensors header without reading tensor data, and check the file is complete
    (its size matches the header), so a truncated download fails here, naming the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            raw = fh.read(8)
            hlen = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
            text = fh.read(hlen) if hlen is not None and hlen <= size - 8 else None
    except OSError as e:
        raise ConversionError(f"{path}: unreadable safetensors file: {e}") from None
    if hlen is None:
        raise ConversionError(f"{path}: truncated safetensors file ({size} bytes)")
    if text is None:
        raise ConversionError(f"{path}: truncated safetensors file (header says {hlen} header bytes, file has {size})")
    try:
        header = json.loads(text)
    except ValueError as e:
        raise ConversionError(f"{path}: unreadable safetensors file: {e}") from None
    if not isinstance(header, dict):
        raise ConversionError(
            f"{path}: corrupt safetensors file: its header is a {type(header).__name__}, not an object"
        )
    header.pop("__metadata__", None)
    ranges = []
    for name, t in header.items():
        try:
            begin, stop = (int(x) for x in t["data_offsets"])
            t["dtype"], t["shape"] = str(t["dtype"]), [int(d) for d in t["shape"]]
        except (TypeError, KeyError, ValueError):
            raise ConversionError(
                f"{path}: corrupt safetensors file: tensor {name} lacks a valid dtype, shape or data_offsets"
            ) from None
        if not 0 <= begin <= stop:
            raise ConversionError(f"{path}: corrupt safetensors file: tensor {name} has data_offsets {begin}-{stop}")
        ranges.append((begin, stop, name))
    ranges.sort()
    for (_, stop, first), (begin, _, second) in zip(ranges, ranges[1:]):
        if begin < stop:
            raise ConversionError(
                f"{path}: corrupt safetensors file: tensors {first} and {second} share bytes (overlapping data_offsets)"
            )
    end = max((stop for _, stop, _ in ranges), default=0)
    if size != 8 + hlen + end:
        raise ConversionError(
            f"{path}: truncated or corrupt safetensors file: the header describes "
            f"{8 + hlen + end} bytes, the file has {size}"
        )
    for name, t in header.items():
        begin, stop = (int(x) for x in t["data_offsets"])
        dtype = _ST_DTYPES.get(t["dtype"])
        if dtype is None:
            raise ConversionError(f"{path}: tensor {name} has unsupported dtype {t['dtype']}")
        numel = 1
        for d in t["shape"]:
            numel *= int(d)
        if stop - begin != numel * torch.empty((), dtype=dtype).element_size():
            raise ConversionError(
                f"{path}: tensor {name} has a byte size that does not match its "
                f"shape {t['shape']} and dtype {t['dtype']}"
            )
    return header


class HFCheckpoint:
    """Lazy view of a Hugging Face safetensors checkpoint (single file or index + shards).
    ``tensors`` maps name -> (shape, dtype); ``get(name)`` reads one tensor."""

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        index = os.path.join(hf_dir, INDEX_NAME)
        single = os.path.join(hf_dir, SINGLE_NAME)
        if os.path.exists(index):
            try:
                with open(index) as fh:
                    weight_map: Dict[str, str] = json.load(fh)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ConversionError(f"{index}: unreadable index: {e}") from None
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index}: unreadable index: weight_map is not an object")
            files = sorted(set(weight_map.values()))
            for fname in files:
                parts = str(fname).replace("\\", "/").split("/")
                if not isinstance(fname, str) or os.path.isabs(fname) or ".." in parts:
                    raise ConversionError(
                        f"{index}: weight_map names {fname!r}, outside {hf_dir}; shards must be files in the "
                        "checkpoint directory"
                    )
        elif os.path.exists(single):
            weight_map, files = None, [SINGLE_NAME]
        else:
            others = [f for f in os.listdir(hf_dir) if f.endswith((".bin", ".pt", ".pth"))]
            hint = f" (found {', '.join(others)}: only safetensors is supported)" if others else ""
            raise ConversionError(f"{hf_dir}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")
        self.tensors: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
        self._file_of: Dict[str, str] = {}
        for fname in files:
            path = os.path.join(hf_dir, fname)
            if not os.path.exists(path):
                raise ConversionError(f"{path}: shard listed in {INDEX_NAME} is missing")
            for name, t in read_safetensors_header(path).items():
                if weight_map is not None and weight_map.get(name) != fname:
                    if name not in weight_map:
                        raise ConversionError(f"{path}: tensor {name} is not listed in {INDEX_NAME}")
                    continue
                self.tensors[name] = (tuple(int(d) for d in t["shape"]), _ST_DTYPES[t["dtype"]])
                self._file_of[name] = path
        if weight_map is not None:
            absent = [n for n in weight_map if n not in self.tensors]
            if absent:
                raise ConversionError(
                    f"tensor {absent[0]} is listed in {INDEX_NAME} but missing from "
                    f"{weight_map[absent[0]]}" + (f" (+{len(absent) - 1} more)" if len(absent) > 1 else "")
                )
        self._handles: Dict[str, Any] = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self._file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt", device="cpu")
        return self._handles[path].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def parse_size(text: Any) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper()
    units = [("GIB", 1024**3), ("MIB", 1024**2), ("KIB", 1024), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)]
    for suffix, mult in units:
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * mult)
    return int(s)


class ShardWriter:
    """Writes tensors to safetensors shards of at most ``max_shard_bytes`` (a single tensor larger
    than that gets a shard of its own), then names them like ``save_pretrained`` does."""

    def __init__(self, out_dir: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.out_dir = out_dir
        self.max = max_shard_bytes
        self._pending: Dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: List[Tuple[str, List[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        tmp_name = f"shard-{len(self._shards):05d}.tmp.safetensors"
        save_file(self._pending, os.path.join(self.out_dir, tmp_name), metadata={"format": "pt"})
        outputs.plain_mode(os.path.join(self.out_dir, tmp_name))  # safetensors writes it 0600
        self._shards.append((tmp_name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> List[str]:
        self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(os.path.join(self.out_dir, self._shards[0][0]), os.path.join(self.out_dir, SINGLE_NAME))
            return [SINGLE_NAME]
        weight_map, names = {}, []
        for i, (tmp_name, tensors) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, tmp_name), os.path.join(self.out_dir, final))
            names.append(final)
            weight_map.update({t: final for t in tensors})
        with open(os.path.join(self.out_dir, INDEX_NAME), "w") as fh:
            json.dump(
                {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
                fh,
                indent=2,
            )
        return names


def load_hf_config(hf_dir: str) -> Tuple[str, Dict[str, Any], Dict[str, Any], Any]:
    """Read ``config.json``: returns (model_type, saved fields normalized by transformers, all
    fields with the config class defaults, the config object). The model type is checked against
    the tables *before* transformers parses the file."""
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as fh:
            raw = json.load(fh)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: unreadable config: {e}") from None
    model_type = raw.get("model_type")
    if not model_type:
        raise ConversionError(f"{path}: no model_type field")
    get_family(model_type)  # refuse unknown / unsupported families first
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise ConversionError(f"{path}: transformers cannot parse this config: {e}") from None
    return model_type, cfg.to_diff_dict(), cfg.to_dict(), cfg


def write_hf_config(out_dir: str, model_type: str, values: Dict[str, Any]) -> None:
    """Write ``config.json`` through the transformers config class (so it loads back)."""
    from transformers import AutoConfig

    values = {k: v for k, v in values.items() if k != "model_type"}
    cfg = AutoConfig.for_model(model_type, **values)
    cfg.save_pretrained(out_dir)
