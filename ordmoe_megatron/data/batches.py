"""Micro-batch streams for the trainer: deterministic, resumable, split over data-parallel ranks.

A stream is indexed by global micro-batch number ``k``; data-parallel rank ``r`` of ``d`` takes
``k = r, r + d, ...``, so every layout averages the same micro-batches as one process, and a run
resumed at micro-batch ``k`` sees exactly what the uninterrupted run saw.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import torch


def dataset_micro_batches(dataset, micro_batch_size: int, start: int = 0) -> Iterator[dict]:
    """Collated micro-batches of a megatron-core ``GPTDataset`` from micro-batch ``start`` on."""
    for k in itertools.count(start):
        samples = [dataset[(k * micro_batch_size + i) % len(dataset)] for i in range(micro_batch_size)]
        batch = {
            key: torch.stack([torch.as_tensor(s[key]) for s in samples])
            for key in ("tokens", "labels", "loss_mask", "position_ids")
        }
        batch["loss_mask"] = batch["loss_mask"].float()
        yield batch


def synthetic_micro_batches(seed: int, vocab: int, seq: int, micro_batch_size: int, start: int = 0) -> Iterator[dict]:
    """``--mock-data``: three learnable patterns, no files needed: counting with a small stride,
    a short repeated motif, and copy-after-separator (an induction task)."""
    positions = torch.arange(seq + 1)
    for k in itertools.count(start):
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        rows = []
        for _ in range(micro_batch_size):
            kind = int(torch.randint(3, (1,), generator=g))
            if kind == 0:
                start_token, step = torch.randint(vocab, (1,), generator=g), torch.randint(1, 3, (1,), generator=g)
                row = (start_token + step * positions) % vocab
            elif kind == 1:
                motif = torch.randint(vocab, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
                row = motif.repeat(seq // len(motif) + 2)[: seq + 1]
            else:
                segment = torch.randint(1, vocab, (seq // 2,), generator=g)
                row = torch.cat([segment, torch.zeros(1, dtype=torch.long), segment])[: seq + 1]
            rows.append(row.long())
        tokens = torch.stack(rows)
        yield dict(
            tokens=tokens[:, :-1].contiguous(),
            labels=tokens[:, 1:].contiguous(),
            loss_mask=torch.ones(micro_batch_size, seq),
            position_ids=positions[:seq].unsqueeze(0).expand(micro_batch_size, -1).contiguous(),
        )


def shard_micro_batches(stream: Iterator[dict], rank: int, size: int) -> Iterator[dict]:
    """Data-parallel rank ``rank`` of ``size`` takes every ``size``-th micro-batch from its own."""
    return itertools.islice(stream, rank, None, size)
