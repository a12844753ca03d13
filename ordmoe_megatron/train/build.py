"""From a ``RunConfig`` to what a run needs: data sources, the ``TransformerConfig``, the model.

``prepare_data`` resolves the data (the preset's corpus, Megatron files or mock data) and returns
the configuration with the data paths and the tokenizer's vocabulary filled in; nothing is
changed in place.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator, Optional

import torch
from megatron.core.models.gpt import GPTModel

from ordmoe_megatron.data import (
    batches,
    build_gpt_datasets,
    check_data_files,
    check_tokenizer_matches_data,
    load_tokenizer,
    prepare_tiny_data,
    sft,
    vision,
)
from ordmoe_megatron.data.documents import load_any_tokenizer
from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.mcore import tiny_vl
from ordmoe_megatron.mcore.model import OrdMoEGPTModel
from ordmoe_megatron.runtime import bridges
from ordmoe_megatron.runtime.model_flags import gpt_model_from_flags, transformer_config_from_flags
from ordmoe_megatron.train import vision_language
from ordmoe_megatron.train.config import RunConfig

MicroBatchStream = Callable[[str, int], Iterator[dict]]  # (split, first micro-batch) -> micro-batches


@dataclasses.dataclass
class DataSources:
    tokenizer: object = None  # None with --mock-data
    heldout_tasks: Optional[str] = None  # the preset's held-out task file
    # --sft-data: the encoded conversations per split; the held-out tasks (prompt, answer, kind)
    sft_examples: Optional[dict] = None
    sft_tasks: Optional[list] = None
    vl: Optional[object] = None  # --preset tiny-vl: data.vision.TinyVLData


def prepare_data(config: RunConfig) -> tuple[RunConfig, DataSources]:
    """The data the run reads, checked; the config with the data paths and vocabulary resolved."""
    if config.mock_data:
        return config, DataSources()
    sources = DataSources()
    if config.preset == "tiny-vl":  # images and text made in memory, from the seed
        sources.vl = vision.prepare_tiny_vl_data(config.seed)
        sources.tokenizer = sources.vl.tokenizer
        return config.with_model_flags(vocab_size=sources.tokenizer.vocab_size), sources
    if config.preset == "tiny-sft" or config.sft_data:
        return _prepare_sft(config, sources)
    if config.preset:
        paths = prepare_tiny_data(config.preset_data_dir or os.path.join(config.work_dir, "data"), seed=config.seed)
        config = config.replace(
            data_path=paths["train_prefix"],
            valid_data_path=paths["valid_prefix"],
            tokenizer_model=paths["tokenizer_model"],
        )
        sources.heldout_tasks = paths["heldout_tasks"]
    if not os.path.isfile(config.tokenizer_model):
        raise OrdMoEError(f"--tokenizer-model {config.tokenizer_model} does not exist")
    sources.tokenizer = load_tokenizer(config.tokenizer_model)
    for flag, prefix in (("--data-path", config.data_path), ("--valid-data-path", config.valid_data_path)):
        if prefix:
            check_data_files(prefix, flag)
            check_tokenizer_matches_data(sources.tokenizer, prefix)
    return config.with_model_flags(vocab_size=sources.tokenizer.vocab_size), sources


def _prepare_sft(config: RunConfig, sources: DataSources) -> tuple[RunConfig, DataSources]:
    """Chat data: the preset's tasks (built here) or --sft-data; any tokenizer; encoded once."""
    heldout = None
    if config.preset == "tiny-sft":
        paths = sft.prepare_tiny_sft_data(config.preset_data_dir or os.path.join(config.work_dir, "data"), config.seed)
        config = config.replace(
            sft_data=paths["train"], sft_valid_data=paths["valid"], tokenizer_model=paths["tokenizer_model"]
        )
        heldout = sft.read_conversations(paths["heldout"], "the preset's held-out split")
    sources.tokenizer = load_any_tokenizer(config.tokenizer_model)
    train = sft.read_conversations(config.sft_data, "--sft-data")
    if config.sft_valid_data:
        valid = sft.read_conversations(config.sft_valid_data, "--sft-valid-data")
    else:
        cut = max(1, len(train) // 20)
        if len(train) <= cut:
            raise OrdMoEError(f"--sft-data {config.sft_data}: too few conversations to keep 5% for validation")
        train, valid = train[:-cut], train[-cut:]
    sources.sft_examples = {
        "train": sft.encode_all(sources.tokenizer, train),
        "valid": sft.encode_all(sources.tokenizer, valid),
    }
    sources.sft_tasks = sft.heldout_tasks(heldout if heldout is not None else valid)
    return config.with_model_flags(vocab_size=sources.tokenizer.vocab_size), sources


def transformer_config(config: RunConfig):
    """The model's ``TransformerConfig``; refuses OrdMoE settings the model cannot honour."""
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    layout = config.layout
    tconfig = transformer_config_from_flags(
        config.model_flags,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        moe_aux_loss_coeff=config.moe_aux_loss_coeff,
        moe_router_load_balancing_type=config.moe_router_load_balancing_type,
        moe_token_dispatcher_type=config.moe_token_dispatcher_type,
        calculate_per_token_loss=config.calculate_per_token_loss,
        tensor_model_parallel_size=layout.tensor,
        sequence_parallel=layout.sequence_parallel,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
        expert_model_parallel_size=layout.expert,
        expert_tensor_parallel_size=layout.expert_tensor,
        bf16=config.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        fp8=config.fp8_format,
        **bridges.config_overrides(),
    )
    if config.ordmoe is not None:
        config.ordmoe.validate_for_model(tconfig)
    return tconfig


def model_chunks(config: RunConfig, tconfig) -> list[GPTModel]:
    """One model per virtual pipeline stage on this rank (one without virtual stages)."""
    if config.preset == "tiny-vl":
        return [tiny_vl.vl_model(config.model_flags, tconfig, config.ordmoe)]
    extra = {} if config.ordmoe is None else dict(model_class=OrdMoEGPTModel, ordmoe=config.ordmoe)
    extra["packed_sequences"] = config.sft_pack
    stages = config.layout.virtual_pipeline
    if not stages:
        return [gpt_model_from_flags(config.model_flags, tconfig, **extra)]
    return [gpt_model_from_flags(config.model_flags, tconfig, vp_stage=stage, **extra) for stage in range(stages)]


def stream_factory(config: RunConfig, sources: DataSources) -> MicroBatchStream:
    """``(split, first micro-batch) -> micro-batch stream`` for the trainer."""
    if sources.vl is not None:
        return lambda split, start: vision_language.vl_stream(config, sources.vl, split, start)
    if sources.sft_examples is not None:
        pad = getattr(sources.tokenizer, "eod", 0)
        return lambda split, start: sft.sft_micro_batches(
            sources.sft_examples[split],
            config.seq_length,
            config.micro_batch_size,
            config.sft_pack,
            config.seed + (0 if split == "train" else 1),
            start,
            pad_id=pad,
        )
    if config.mock_data:
        return lambda split, start: batches.synthetic_micro_batches(
            config.seed + (0 if split == "train" else 1),
            config.vocab_size,
            config.seq_length,
            config.micro_batch_size,
            start,
        )
    per_eval = config.eval_iters * config.global_batch_size
    evals = config.train_iters // config.eval_interval + 2 if config.eval_interval else 2
    train_ds, valid_ds, _ = build_gpt_datasets(
        config.data_path,
        sources.tokenizer,
        config.seq_length,
        num_samples=(max(config.train_iters, 1) * config.global_batch_size, evals * per_eval, None),
        seed=config.seed,
        valid_prefix=config.valid_data_path,
        split=config.split,
        create_attention_mask=False,
    )
    datasets = {"train": train_ds, "valid": valid_ds or train_ds}
    return lambda split, start: batches.dataset_micro_batches(datasets[split], config.micro_batch_size, start)
