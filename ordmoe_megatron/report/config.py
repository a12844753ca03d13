"""The tier report's typed configuration and its cheap checks (no Megatron import)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.method import OrdMoEConfig

DEFAULT_MAX_SEQ_LENGTH = 1024


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """What the report evaluates: the checkpoint, exactly one data source (none for a
    vision-language checkpoint: its run's held-out scenes), the tier paths."""

    load: str
    ordmoe: OrdMoEConfig
    token_ids: Optional[str] = None
    text_file: Optional[str] = None
    data_path: Optional[str] = None
    tokenizer_model: Optional[str] = None
    documents: str = "paragraphs"
    append_eod: bool = True
    seq_length: Optional[int] = None  # None: the checkpoint's, at most DEFAULT_MAX_SEQ_LENGTH
    max_sequences: int = 256
    micro_batch_size: int = 4
    seed: int = 1234
    model_args: Optional[str] = None  # a JSON file of model flags, for a checkpoint that records none


def given_sources(config: ReportConfig) -> list[str]:
    """The evaluation data flags given (``token_ids``, ``text_file``, ``data_path``)."""
    return [name for name in ("token_ids", "text_file", "data_path") if getattr(config, name)]


def check_sources(config: ReportConfig, vision_language: bool = False) -> None:
    """Flag combinations (cheap, before anything is read); a vision-language checkpoint takes no
    data source (its held-out scenes are drawn from its run's seed)."""
    sources = given_sources(config)
    if vision_language and (sources or config.tokenizer_model):
        flag = sources[0] if sources else "tokenizer_model"
        raise OrdMoEError(
            f"--load {config.load}: a vision-language checkpoint (--preset tiny-vl) is evaluated on its run's own "
            f"held-out scenes; drop --{flag.replace('_', '-')}"
        )
    if not vision_language and len(sources) != 1:
        raise OrdMoEError(
            "give exactly one evaluation data source: --token-ids F, --text-file F --tokenizer-model M, "
            f"or --data-path PREFIX --tokenizer-model M (got {len(sources)})"
        )
    if sources and sources[0] in ("text_file", "data_path") and not config.tokenizer_model:
        raise OrdMoEError(f"--{sources[0].replace('_', '-')} needs --tokenizer-model (the checkpoint's tokenizer)")
    for name in ("max_sequences", "micro_batch_size"):
        if getattr(config, name) < 1:
            raise OrdMoEError(f"--{name.replace('_', '-')}={getattr(config, name)} must be at least 1")
    if config.seq_length is not None and config.seq_length < 1:
        raise OrdMoEError(f"--seq-length={config.seq_length} must be at least 1")
