"""Tier report: how each OrdMoE tier path of a checkpoint does on evaluation data.

For any Megatron checkpoint (converted from Hugging Face by ``ordmoe-convert hf-to-mcore``, or saved by
``ordmoe-pretrain``; trained with any number of tiers, or none), the report builds an
``OrdMoEGPTModel`` with ``C`` tier paths on top of the checkpoint's plain weights (OrdMoE adds no
parameters), runs the evaluation data through all paths at once and reports, per path:

- the mean target log-likelihood and the perplexity,
- the tier-ordering accuracy: the fraction of sequences with ``L_1 > L_2 > ... > L_C``,
- the per-tier expert load: tokens per expert per path in every MoE layer, and max/mean.

A vision-language checkpoint (``--preset tiny-vl``) is rebuilt as its LLaVA model
(``mcore.tiny_vl``) and evaluated on its run's held-out scenes, drawn again from the run's seed,
with each path's answer accuracy besides.

Conventions (also written into the JSON): see ``CONVENTION``. Runs in one process (gloo on CPU
through the CPU emulation, or one GPU). The checkpoint, the data and the flags are checked
before the model is built.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Callable, Iterable, Optional

import torch

from ordmoe_megatron.data import vision
from ordmoe_megatron.data.documents import load_samples, micro_batches
from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.mcore import tiny_vl
from ordmoe_megatron.mcore.metrics import pop_tier_load_by_layer, tier_routers
from ordmoe_megatron.mcore.model import OrdMoEGPTModel
from ordmoe_megatron.mcore.multimodal import language_model_of
from ordmoe_megatron.method import OrdMoEConfig, format_tiers, sequence_logprobs, tier_order_correct
from ordmoe_megatron.report.config import DEFAULT_MAX_SEQ_LENGTH, ReportConfig, check_sources
from ordmoe_megatron.runtime import bridges, distributed
from ordmoe_megatron.runtime.checkpointing import (
    CheckpointInfo,
    inspect_checkpoint,
    load_checkpoint,
    non_finite_parameters,
)
from ordmoe_megatron.runtime.model_flags import (
    gpt_model_from_flags,
    normalize_flags,
    padded_vocab_size,
    transformer_config_from_flags,
)

VL_EMBEDDING = "language_model.embedding.word_embeddings.weight"
CONVENTION = (
    "mean_logprob: per sequence (one evaluation window), the mean log-likelihood of its target "
    "tokens; then the plain mean over sequences. perplexity = exp(-mean_logprob). "
    "token_mean_logprob pools all target tokens; token_perplexity = exp(-token_mean_logprob). "
    "tier_order_acc: fraction of sequences whose per-sequence log-likelihoods satisfy "
    "L1 > L2 > ... > LC (null for one path). expert_load.tokens_per_expert[path][expert]: real "
    "tokens routed to the expert on that path (a token counts once per expert it uses); for a "
    "vision-language checkpoint every language position, see data.load_counts."
)


# ----------------------------------------------------------------------------------------------
# checkpoint
# ----------------------------------------------------------------------------------------------
def inspect(root: str, model_args: Optional[str] = None) -> CheckpointInfo:
    """The checkpoint check every front end runs, plus what a tier report needs: a MoE GPT model
    whose embedding matches its model flags (``model_args``: a JSON file of them, for a checkpoint
    that records none, e.g. one saved by Megatron-LM). The flags get the padded vocabulary size."""
    info = inspect_checkpoint(root, "--load")
    if model_args:
        info.flags = read_model_args(model_args)
    flags = info.flags
    if flags is None:
        raise OrdMoEError(
            f"--load {root}: the checkpoint records no model flags (model_args.json next to a "
            "converted checkpoint, or model_flags in the run.json that ordmoe-pretrain writes); "
            'pass --model-args FILE, a JSON object of them ({"num_layers": 4, "hidden_size": 64, ...})'
        )
    if not flags.get("num_experts"):
        raise OrdMoEError(
            f"--load {root}: not a MoE model (no num_experts in its model flags); a tier report needs routed experts"
        )
    if is_vision_language(info) and "seed" not in info.run.get("run", {}):
        raise OrdMoEError(
            f"--load {root}: a vision-language checkpoint whose run.json records no seed: its held-out "
            "scenes cannot be drawn again; load a checkpoint that ordmoe-pretrain --preset tiny-vl saved"
        )
    embedding = info.tensors.get(VL_EMBEDDING if is_vision_language(info) else "embedding.word_embeddings.weight")
    if embedding is None:
        raise OrdMoEError(f"--load {root}: {info.path} holds no embedding.word_embeddings.weight: not a GPT checkpoint")
    try:
        rows = padded_vocab_size(flags)
    except OrdMoEError:  # no vocabulary size recorded: the embedding's rows below
        rows = None
    if flags["padded_vocab_size"] is None:
        rows = int(embedding.size[0])  # a training run's padding depends on its TP size
        info.flags = dict(flags, padded_vocab_size=rows)
    if int(embedding.size[0]) != rows:
        raise OrdMoEError(
            f"--load {root}: the embedding has {embedding.size[0]} rows but the model flags imply "
            f"{rows}: the model flags do not describe this checkpoint"
        )
    return info


def is_vision_language(info: CheckpointInfo) -> bool:
    """A ``--preset tiny-vl`` checkpoint: the language model inside megatron-core's LLaVAModel."""
    return VL_EMBEDDING in info.tensors


def read_model_args(path: str) -> dict:
    """``--model-args``: a JSON object of model flags (the names ``model_args.json`` uses)."""
    try:
        with open(path, encoding="utf-8") as f:
            flags = json.load(f)
    except (OSError, ValueError) as err:
        raise OrdMoEError(f"--model-args {path}: cannot be read as JSON ({err})") from None
    if not isinstance(flags, dict):
        raise OrdMoEError(f"--model-args {path}: holds a {type(flags).__name__}, not a JSON object of model flags")
    return normalize_flags(flags, where=f"--model-args {path}: ")


def resolve_seq_length(requested: Optional[int], flags: dict) -> int:
    max_pos = flags.get("max_position_embeddings") or flags.get("seq_length")
    seq = requested or min(flags.get("seq_length") or max_pos or DEFAULT_MAX_SEQ_LENGTH, DEFAULT_MAX_SEQ_LENGTH)
    if flags.get("position_embedding_type") == "learned_absolute" and max_pos and seq > max_pos:
        raise OrdMoEError(
            f"--seq-length={seq} exceeds the model's {max_pos} learned positions "
            "(max_position_embeddings); use at most that"
        )
    return seq


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
def report_config(flags: dict, ordmoe: OrdMoEConfig):
    """The model's ``TransformerConfig`` (fp32, no dropout); refuses tier settings the model
    cannot honour (a layer scope without MoE layers, ...). Cheap: builds no weights."""
    config = transformer_config_from_flags(
        flags,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=torch.float32,
        moe_token_dispatcher_type="alltoall",
        **bridges.config_overrides(),
    )
    ordmoe.validate_for_model(config)
    return config


def build_report_model(flags: dict, config, ordmoe: OrdMoEConfig, vision_language: bool = False):
    """``OrdMoEGPTModel`` for the checkpoint's flags (the tiny-vl LLaVA model holding one, for a
    vision-language checkpoint), in eval mode, weights not loaded yet."""
    if vision_language:
        model = tiny_vl.vl_model(flags, config, ordmoe)
    else:
        model = gpt_model_from_flags(
            flags, config, model_class=OrdMoEGPTModel, ordmoe=ordmoe, pre_process=True, post_process=True
        )
    return model.to(distributed.device()).eval()


def load_weights(model, info: CheckpointInfo) -> None:
    load_checkpoint(info.root, [model], optimizer=None, load_rng=False, flag="--load")
    check_finite(model, info.path)


def check_finite(model, path: str) -> None:
    """Refuse weights that hold a NaN or an infinity (a run that diverged): every path's numbers
    would be NaN."""
    bad = non_finite_parameters([model])
    if bad:
        raise OrdMoEError(
            f"--load {path}: the checkpoint's weights are not finite ({', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}): it was saved by a run that diverged; load an earlier checkpoint"
        )


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
def gpt_forward(model, batch: dict):
    """The per-token NLL of every path ``[C * b, s]`` and the loss mask ``[b, s]``; the padding
    mask goes to the routers, which count only real tokens in the load."""
    mask = batch["loss_mask"]
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], padding_mask=mask == 0), mask


@torch.no_grad()
def evaluate_tiers(model, batches: Iterable[dict], forward: Callable = gpt_forward) -> dict:
    """Run every micro-batch through all of ``model``'s paths (in eval mode, one process); return
    per-path sums and the per-layer expert load (``forward`` says which positions it counts).

    Returns ``{"sequences", "tokens", "logprob_sum" [C], "nll_sum" [C], "order_correct",
    "load": {layer: [C, n] tensor}, "tier_routed": {layer: bool}}``.
    """
    paths = (language_model_of(model) or model).num_paths
    device = next(model.parameters()).device
    pop_tier_load_by_layer([model])  # start from zero
    load: dict = {}
    sums = {
        "sequences": 0,
        "tokens": 0.0,
        "logprob_sum": torch.zeros(paths, dtype=torch.float64),
        "nll_sum": torch.zeros(paths, dtype=torch.float64),
        "order_correct": 0.0,
    }
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        nll, mask = forward(model, batch)
        b, s = mask.shape
        nll = nll.float().view(paths, b, s)
        per_seq = sequence_logprobs(nll, mask).double()  # [C, b]
        sums["sequences"] += b
        sums["tokens"] += float(mask.sum())
        sums["logprob_sum"] += per_seq.sum(1).cpu()
        sums["nll_sum"] += (nll.double() * mask.double()).sum((1, 2)).cpu()
        sums["order_correct"] += float(tier_order_correct(per_seq).sum())
        for layer, counts in pop_tier_load_by_layer([model]).items():
            counts = counts.double().cpu().expand(paths, -1)  # a layer before the fan-out counts once
            load[layer] = counts if layer not in load else load[layer] + counts
    sums["load"] = load
    sums["tier_routed"] = {r.layer_number: r.tier_routing_active for r in tier_routers([model])}
    return sums


def summarize(sums: dict, ordmoe: OrdMoEConfig, num_experts: int, topk: int) -> dict:
    """Per-path log-likelihoods, perplexities, tier-ordering accuracy and load statistics."""
    paths = len(sums["logprob_sum"])
    tiers = ordmoe.tiers(num_experts, topk)
    rows = []
    for j in range(paths):
        mean_lp = float(sums["logprob_sum"][j]) / sums["sequences"]
        token_lp = -float(sums["nll_sum"][j]) / sums["tokens"]
        rows.append(
            {
                "path": j + 1,
                "tier_ranks": format_tiers([tiers[j]]),
                "mean_logprob": mean_lp,
                "perplexity": _exp(-mean_lp),
                "token_mean_logprob": token_lp,
                "token_perplexity": _exp(-token_lp),
            }
        )
    layers = []
    for layer in sorted(sums["load"]):
        counts = sums["load"][layer]
        mean = counts.mean(-1).clamp(min=1e-12)
        layers.append(
            {
                "layer": layer,
                "tier_routed": bool(sums["tier_routed"][layer]),
                "tokens_per_expert": [[int(round(v)) for v in row.tolist()] for row in counts],
                "max_over_mean": (counts.max(-1).values / mean).tolist(),
                "min_over_mean": (counts.min(-1).values / mean).tolist(),
            }
        )
    per_path = (
        [sum(entry["max_over_mean"][j] for entry in layers) / len(layers) for j in range(paths)] if layers else []
    )
    for j, row in enumerate(rows):
        row["load_max_over_mean"] = per_path[j] if per_path else None
    return {
        "paths": rows,
        "tier_order_acc": sums["order_correct"] / sums["sequences"] if paths > 1 else None,
        "expert_load": {"num_experts": num_experts, "max_over_mean": per_path, "layers": layers},
    }


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


def make_report(config: ReportConfig, log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Check everything, build and load the model, evaluate; the report as a dict."""
    start = time.perf_counter()
    ordmoe = config.ordmoe
    info = inspect(config.load, config.model_args)  # cheap (no weights): it says which data to take
    vl = is_vision_language(info)
    check_sources(config, vision_language=vl)
    flags = info.flags
    tconfig = report_config(flags, ordmoe)  # C x K > n, layer scope, ...: before any work
    if ordmoe.ranking == "average" and not any(k.endswith("router.score_sum") for k in info.tensors):
        raise OrdMoEError(
            f"--ordmoe-ranking average ranks by the running mean scores a checkpoint trained with "
            f"--ordmoe-ranking average saves; {config.load} has none: use --ordmoe-ranking token"
        )
    if vl:
        scenes, batches, data = _held_out_scenes(config, info)
        seq_length = flags["seq_length"]
    else:
        seq_length = resolve_seq_length(config.seq_length, flags)
        samples, data = load_samples(
            seq_length,
            flags["vocab_size"] or flags["padded_vocab_size"],
            config.max_sequences,
            config.seed,
            token_ids=config.token_ids,
            text_file=config.text_file,
            data_path=config.data_path,
            tokenizer_model=config.tokenizer_model,
            documents=config.documents,
            append_eod=config.append_eod,
        )
        batches = micro_batches(samples, config.micro_batch_size)
    distributed.init_single_process(config.seed)
    model = build_report_model(flags, tconfig, ordmoe, vision_language=vl)
    load_weights(model, info)
    tag = "release" if info.iteration is None else f"iteration {info.iteration}"
    log(
        f"tier report: {config.load} ({info.kind}, {tag}{', vision-language' if vl else ''}); "
        f"{sum(len(b['tokens']) for b in batches) if vl else len(samples)} sequences of at most {seq_length} "
        f"{'text ' if vl else ''}targets; {ordmoe.describe(flags['num_experts'], flags['moe_router_topk'])}"
    )
    # Random grouping draws from the default generator: the same draws for the same seed.
    torch.manual_seed(config.seed)
    sums = evaluate_tiers(model, batches, tiny_vl.vl_forward if vl else gpt_forward)
    report = {
        "checkpoint": {
            "load": os.path.abspath(config.load),
            "kind": info.kind,
            "iteration": info.iteration if info.iteration is not None else "release",
            "hf_model_type": (info.hf_metadata or {}).get("model_type"),
            "trained_ordmoe": info.run.get("run", {}).get("ordmoe") if info.kind == "trained" else None,
            "num_experts": flags["num_experts"],
            "moe_router_topk": flags["moe_router_topk"],
            "num_layers": flags["num_layers"],
        },
        "data": {
            **data,
            "seq_length": seq_length,
            "sequences": sums["sequences"],
            "target_tokens": int(sums["tokens"]),
        },
        "ordmoe": {
            "num_tiers": ordmoe.num_tiers,
            "grouping": ordmoe.grouping,
            "tier_ranks": ordmoe.tiers(flags["num_experts"], flags["moe_router_topk"]),
            "layer_scope": ordmoe.layer_scope or "all",
            "ranking": ordmoe.ranking,
        },
        "convention": CONVENTION,
        **summarize(sums, ordmoe, flags["num_experts"], flags["moe_router_topk"]),
    }
    if vl:  # each path's held-out answers (count, colour, shape), as ordmoe-pretrain's eval.json gives path 1's
        for j, row in enumerate(report["paths"]):
            row["answer_accuracy"] = tiny_vl.answer_accuracy(model, scenes, path=j)
    report["seconds"] = time.perf_counter() - start
    return report


def _held_out_scenes(config: ReportConfig, info: CheckpointInfo):
    """A tiny-vl run's held-out scenes, drawn again from its seed, and their caption micro-batches
    (the trainer's held-out stream, at most ``--max-sequences`` captions)."""
    flags, seed = info.flags, info.run["run"]["seed"]
    if config.seq_length not in (None, flags["seq_length"]):
        raise OrdMoEError(
            f"--seq-length={config.seq_length}: a vision-language checkpoint is evaluated at its run's text "
            f"length ({flags['seq_length']}); drop --seq-length"
        )
    scenes = vision.prepare_tiny_vl_data(seed)
    rows = min(config.max_sequences, len(scenes.captions["valid"]))
    stream = vision.held_out_captions(scenes, flags["seq_length"], config.micro_batch_size, seed)
    batches = []
    while rows > 0:  # the last micro-batch keeps only the rows left
        batch = next(stream)
        batches.append({k: v[:rows] for k, v in batch.items()})
        rows -= config.micro_batch_size
    data = {
        "source": "tiny-vl held-out scenes",
        "seed": seed,
        "documents": "one caption per image",
        "load_counts": "every language position, image positions and padding included",
    }
    return scenes, batches, data
