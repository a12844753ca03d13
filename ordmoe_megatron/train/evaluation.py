"""Held-out task skill: ``exact_match_accuracy`` greedily completes held-out task prompts with
path 1, the plain top-K model (one process, no model parallelism); ``format_eval_table`` prints
the preset's closing table. (Perplexities come from ``trainer.evaluate_paths``.)
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ordmoe_megatron.data import exact_match
from ordmoe_megatron.mcore.model import OrdMoEGPTModel


@torch.no_grad()
def greedy_complete(
    model, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int], vocab_size: int
) -> list[list[int]]:
    """Greedy continuation of equal-length token prompts with the model's path 1, over the
    tokenizer's ``vocab_size`` ids only (the output layer's padding to a multiple of
    ``--make-vocab-size-divisible-by`` is no token: detokenizing one fails)."""
    device = next(model.parameters()).device
    tokens = torch.tensor(prompts, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated = []
    for _ in range(max_new_tokens):
        positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
        logits = model(tokens, positions, None)
        next_ids = logits[:, -1, :vocab_size].argmax(-1)
        generated.append(next_ids)
        done |= torch.isin(next_ids, torch.tensor(sorted(stop_ids), device=device))
        tokens = torch.cat([tokens, next_ids.unsqueeze(1)], dim=1)
        if done.all():
            break
    return torch.stack(generated, dim=1).tolist()


def exact_match_accuracy(model, tokenizer, tasks: list[dict], max_new_tokens: int = 16) -> dict:
    """Per task kind (each record's ``task``, as the corpus names it: ``add``, ``reverse``, ...),
    the share of held-out problems whose greedy path-1 completion up to the end of the line equals
    the answer."""
    was_training = model.training
    model.eval()
    single_path = isinstance(model, OrdMoEGPTModel)
    saved_tiers = model.path_tiers if single_path else None
    if single_path:
        model.set_path_tiers([0])
    newline_ids = {i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.detokenize([i])} | {tokenizer.eod}
    by_length: dict[int, list] = defaultdict(list)
    for task in tasks:
        ids = tokenizer.tokenize(task["prompt"])
        by_length[len(ids)].append((task, ids))
    correct, total = defaultdict(int), defaultdict(int)
    try:
        for _, group in sorted(by_length.items()):
            for start in range(0, len(group), 64):
                chunk = group[start : start + 64]
                outputs = greedy_complete(
                    model, [ids for _, ids in chunk], max_new_tokens, newline_ids, tokenizer.vocab_size
                )
                for (task, _), out in zip(chunk, outputs):
                    kind = task["task"]  # the corpus's name of the task (data.corpus.DEFAULT_TASKS)
                    total[kind] += 1
                    correct[kind] += int(exact_match(tokenizer.detokenize(out), task["answer"]))
    finally:
        if single_path:
            model.set_path_tiers(saved_tiers)
        model.train(was_training)
    return {kind: correct[kind] / total[kind] for kind in sorted(total)}


def format_eval_table(rows: dict[str, dict]) -> str:
    """Rows keyed by model name, each from ``evaluate_paths`` plus ``exact_match`` (or, for
    ``--preset tiny-vl``, ``answer_accuracy``)."""
    first = next(iter(rows.values()))
    paths = len(first["path_perplexity"])
    kinds = sorted(first.get("exact_match", {}))
    answers = sorted(first.get("answer_accuracy", {}))  # --preset tiny-vl
    header = ["model"] + [f"path {j + 1} ppl" for j in range(paths)] + ["tier order acc"] + [f"{k} EM" for k in kinds]
    header += [f"{k} acc" for k in answers]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for name, r in rows.items():
        acc = r.get("tier_order_acc")
        cells = [name] + [f"{p:.4g}" for p in r["path_perplexity"]] + ["-" if acc is None else f"{acc:.3f}"]
        cells += [f"{r['exact_match'][k]:.3f}" for k in kinds]
        cells += [f"{r['answer_accuracy'][k]:.3f}" for k in answers]
        lines.append(" | ".join(cells))
    return "\n".join(lines)
