"""Supervised fine-tuning data: chat conversations, a chat template that masks the prompt, packed
or padded micro-batches, and the ``tiny-sft`` preset's checkable tasks.

A conversation is a JSONL line ``{"messages": [{"role": "system"|"user"|"assistant", "content":
...}, ...]}`` (optionally ``"kind"``: its task, for exact match per task). The template
(``CHAT_TEMPLATE``, plain text, so any tokenizer takes it)::

    {system}\\n              (optional, first)
    User: {user}\\n
    Assistant: {assistant}\\n
    ...

Only the assistant turns' `` {content}\\n`` count in the loss (answer-only loss); everything
before each answer, ``Assistant:`` included, is prompt. The prompt text up to an answer is
tokenized as one piece and the answer as another, so an evaluation prompt (``prompt_text``)
tokenizes exactly as in training.

Micro-batches (``sft_micro_batches``): unpacked, each conversation is a row of ``seq_length``
(cut, or padded with loss mask 0); packed, the micro-batch's conversations are concatenated into
one row (the THD layout Megatron-LM's ``--sft`` uses) with ``cu_seqlens`` and position ids
restarting per conversation. Conversation ``k * micro_batch_size + i`` of a per-epoch shuffle
(seeded) fills micro-batch ``k``: deterministic and resumable like ``data.batches``.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from typing import Iterator, Optional

import torch

from ordmoe_megatron.data.tokenizer import train_sentencepiece
from ordmoe_megatron.errors import OrdMoEError

ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = {"system": "{content}\n", "user": "User: {content}\n", "assistant_prefix": "Assistant:"}


class ChatDataError(OrdMoEError):
    """A chat file that cannot be read; the message names the file and line."""


def read_conversations(path: str, flag: str = "--sft-data") -> list[dict]:
    """The conversations of a JSONL file, checked: roles known, an assistant turn present."""
    if not os.path.isfile(path):
        raise ChatDataError(f"{flag} {path}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ChatDataError(f"{flag} {path}, line {lineno}: not JSON ({err.msg})") from None
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list) or not messages:
                raise ChatDataError(f"{flag} {path}, line {lineno}: needs a non-empty 'messages' list")
            for m in messages:
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise ChatDataError(
                        f"{flag} {path}, line {lineno}: each message needs 'role' ({', '.join(ROLES)}) and "
                        "'content' (a string)"
                    )
            if not any(m["role"] == "assistant" for m in messages):
                raise ChatDataError(f"{flag} {path}, line {lineno}: no assistant turn (nothing to learn)")
            out.append(record)
    if not out:
        raise ChatDataError(f"{flag} {path}: no conversations")
    return out


def template_segments(messages: list[dict]) -> list[tuple[str, bool]]:
    """``(text, is_answer)`` pieces of the template, prompt and answers alternating."""
    segments, prompt = [], ""
    for m in messages:
        if m["role"] == "assistant":
            segments.append((prompt + CHAT_TEMPLATE["assistant_prefix"], False))
            segments.append((" " + m["content"] + "\n", True))
            prompt = ""
        else:
            prompt += CHAT_TEMPLATE[m["role"]].format(content=m["content"])
    return segments


def prompt_text(messages: list[dict]) -> str:
    """Everything before the last assistant answer, for evaluation (for a single-turn
    conversation exactly the prompt piece training tokenizes)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return "".join(text for text, _ in template_segments(messages[: last + 1])[:-1])


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids (ending with the end-of-document id) and, per id, whether it is an answer token."""
    ids, answer = [], []
    for text, is_answer in template_segments(messages):
        piece = tokenizer.tokenize(text)
        ids += piece
        answer += [is_answer] * len(piece)
    return ids + [tokenizer.eod], answer + [False]


def encode_all(tokenizer, conversations: list[dict]) -> list[tuple[list[int], list[bool]]]:
    return [encode_conversation(tokenizer, c["messages"]) for c in conversations]


def _example(ids: list[int], answer: list[bool], seq_length: int) -> dict:
    """Inputs, targets and the answer-only loss mask of one conversation, cut to ``seq_length``."""
    ids, answer = ids[: seq_length + 1], answer[: seq_length + 1]
    return dict(
        tokens=torch.tensor(ids[:-1], dtype=torch.long),
        labels=torch.tensor(ids[1:], dtype=torch.long),
        loss_mask=torch.tensor(answer[1:], dtype=torch.float32),  # a target counts if it is an answer token
    )


def shuffled_order(count: int, seed: int, epoch: int) -> list[int]:
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def sft_micro_batches(
    examples: list[tuple[list[int], list[bool]]],
    seq_length: int,
    micro_batch_size: int,
    pack: bool,
    seed: int,
    start: int = 0,
    pad_id: int = 0,
) -> Iterator[dict]:
    """Micro-batches from micro-batch ``start`` on (see the module docstring); packed ones carry
    ``cu_seqlens`` ``[n + 1]`` (int32)."""
    count = len(examples)
    orders: dict[int, list[int]] = {}
    for k in itertools.count(start):
        items = []
        for i in range(micro_batch_size):
            epoch, index = divmod(k * micro_batch_size + i, count)
            if epoch not in orders:
                orders = {epoch: shuffled_order(count, seed, epoch)}
            items.append(_example(*examples[orders[epoch][index]], seq_length))
        if pack:
            lengths = [len(item["tokens"]) for item in items]
            batch = {key: torch.cat([item[key] for item in items]).unsqueeze(0) for key in items[0]}
            batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
            batch["cu_seqlens"] = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
        else:
            batch = {}
            for key in items[0]:
                rows = []
                for item in items:
                    row = item[key]
                    fill = 0.0 if key == "loss_mask" else pad_id
                    rows.append(torch.cat([row, torch.full((seq_length - len(row),), fill, dtype=row.dtype)]))
                batch[key] = torch.stack(rows)
            batch["position_ids"] = torch.arange(seq_length).unsqueeze(0).expand(micro_batch_size, -1).contiguous()
        yield batch


# ----------------------------------------------------------------------------------------------
# the tiny-sft preset: instruction / answer pairs whose answers can be checked
# ----------------------------------------------------------------------------------------------
def _digits(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(low, high)))


def _task(kind: str, rng: random.Random, max_digits: int) -> tuple[str, str]:
    s = _digits(rng, 2, max_digits)
    return f"{kind} {s}", {"copy": s, "reverse": s[::-1], "sort": "".join(sorted(s))}[kind]


# No addition: the most significant digit first needs the carry from the last, and no model the
# CPU trains in minutes learned it (held-out exact match 0.00-0.11 with 1-3 digit operands).
TINY_SFT_TASKS = ("copy", "reverse", "sort")
TINY_SFT_SYSTEM = "Answer with digits only."


def tiny_sft_conversations(
    count: int, seed: int, max_digits: int, exclude: Optional[set] = None, system: Optional[str] = TINY_SFT_SYSTEM
) -> list[dict]:
    """``count`` conversations per task with distinct instructions (none of ``exclude``), each
    with the system prompt ``system`` (None: none)."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out = []
    for kind in TINY_SFT_TASKS:
        made = 0
        for _ in range(count * 100):
            instruction, answer = _task(kind, rng, max_digits)
            if instruction in seen:
                continue
            seen.add(instruction)
            messages = [{"role": "system", "content": system}] if system else []
            messages += [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}]
            out.append({"messages": messages, "kind": kind})
            made += 1
            if made == count:
                break
    random.Random(seed + 1).shuffle(out)
    return out


def prepare_tiny_sft_data(out_dir: str, seed: int = 1234, sizes=(2000, 100, 100), max_digits: int = 4) -> dict:
    """Train / valid / held-out conversations of the tiny-sft tasks (disjoint instructions) and a
    SentencePiece tokenizer on them, in ``out_dir`` (reused when its manifest matches)."""
    os.makedirs(out_dir, exist_ok=True)
    # No system prompt: it would double the rows' length (the template's system turn is tested).
    params = {"seed": seed, "sizes": list(sizes), "max_digits": max_digits, "tasks": list(TINY_SFT_TASKS), "v": 3}
    paths = {name: os.path.join(out_dir, f"{name}.jsonl") for name in ("train", "valid", "heldout")}
    paths["tokenizer_model"] = os.path.join(out_dir, "tokenizer.model")
    manifest = os.path.join(out_dir, "manifest.json")
    if os.path.isfile(manifest) and all(os.path.isfile(p) for p in paths.values()):
        with open(manifest, encoding="utf-8") as f:
            if json.load(f) == params:
                return paths
    seen: set = set()
    for offset, (name, size) in enumerate(zip(("train", "valid", "heldout"), sizes)):
        conversations = tiny_sft_conversations(size, seed + 17 * offset, max_digits, exclude=seen, system=None)
        seen |= {c["messages"][0]["content"] for c in conversations}
        tmp = paths[name] + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for c in conversations:
                f.write(json.dumps(c, sort_keys=True) + "\n")
        os.replace(tmp, paths[name])
    text = os.path.join(out_dir, "tokenizer_text.txt")
    with open(text, "w", encoding="utf-8") as f:
        for c in read_conversations(paths["train"]):
            f.write("".join(t for t, _ in template_segments(c["messages"])))
    train_sentencepiece([text], os.path.join(out_dir, "tokenizer"), vocab_size=300, seed=seed)
    with open(manifest, "w", encoding="utf-8") as f:
        json.dump(params, f)
    return paths


def heldout_tasks(conversations: list[dict]) -> list[dict]:
    """``{"prompt", "answer", "task"}`` of each conversation's last answer, for exact match."""
    tasks = []
    for c in conversations:
        messages = c["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        tasks.append(
            {"prompt": prompt_text(messages), "answer": messages[last]["content"], "task": c.get("kind", "all")}
        )
    return tasks
