"""The ``tiny-vl`` preset's images, captions and questions: made here, from a seed, in plain torch.

An image (``IMAGE_SIZE`` square, 3 channels, values in [0, 1]) is a black 4 x 4 grid of
``CELL``-pixel cells; ``count`` of them (1 to 4, distinct cells) hold one shape (a square, a
circle or a diagonal cross) in one colour (red, green, blue or yellow), with a little Gaussian noise over
the whole image. A cell is a ViT patch when the patch size is ``CELL``.

- the caption says what is there: ``"two red squares"``;
- three questions whose prompts are the same for every image, so only the image tells the answer
  (``QUESTIONS``): ``"how many shapes?"`` -> ``"two"``, ``"what colour are the shapes?"`` ->
  ``"red"``, ``"what shape are they?"`` -> ``"square"``. A model that ignores the image gets at
  best the most frequent answer (1/4, 1/4, 1/3 of the time).
- the first text token after the image is ``CAPTION_PREFIX`` or the chat's ``User`` (LLaVA
  masks every image position, so that token is never predicted).

Questions are chats in ``data.sft``'s template (``User: ...\\nAssistant: two\\n``), encoded with
its answer-only loss mask; captions are plain text, every token in the loss. The vocabulary is
closed, so the tokenizer is a word-level one (``WordTokenizer``), built in memory from it.

``prepare_tiny_vl_data`` makes the training images and held-out images (no scene of one is in the
other); ``vl_micro_batches`` feeds LLaVA's inputs: the image token first, then the text, the
first ``switch_at`` micro-batches from captions (continued pretraining) and the rest from the
questions (fine-tuning), deterministic and resumable like ``data.sft``.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
from typing import Iterator, Optional

import torch

from ordmoe_megatron.data import sft

IMAGE_SIZE, CELL = 32, 8
GRID = IMAGE_SIZE // CELL
SHAPES = ("square", "circle", "cross")
PLURALS = {"square": "squares", "circle": "circles", "cross": "crosses"}
COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 1.0, 0.1), "blue": (0.1, 0.2, 1.0), "yellow": (1.0, 1.0, 0.1)}
NUMBERS = ("one", "two", "three", "four")
NOISE = 0.05
CAPTION_PREFIX = "Caption:"
IMAGE_TOKEN = -200  # megatron-core LLaVAModel's default image token index


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    cells: tuple  # the occupied cells (row-major indices into the 4 x 4 grid), sorted

    @property
    def count(self) -> int:
        return len(self.cells)


def caption(scene: Scene) -> str:
    """``"two red squares"``, ``"one blue circle"``."""
    noun = scene.shape if scene.count == 1 else PLURALS[scene.shape]
    return f"{NUMBERS[scene.count - 1]} {scene.colour} {noun}"


# question kind -> (the question, the answer from the scene)
QUESTIONS = {
    "count": ("how many shapes?", lambda s: NUMBERS[s.count - 1]),
    "colour": ("what colour are the shapes?", lambda s: s.colour),
    "shape": ("what shape are they?", lambda s: s.shape),
}


def _shape_mask(shape: str) -> torch.Tensor:
    """The ``CELL x CELL`` pixels a shape covers, inside a one-pixel margin: a filled square, a
    disc (an octagon at this size) and a diagonal cross (an X, one pixel thick), each at least
    8 pixels from the others."""
    y, x = torch.meshgrid(torch.arange(CELL), torch.arange(CELL), indexing="ij")
    inside = (y >= 1) & (y < CELL - 1) & (x >= 1) & (x < CELL - 1)
    if shape == "square":
        return inside
    centre = (CELL - 1) / 2
    if shape == "circle":
        return ((y - centre) ** 2 + (x - centre) ** 2) <= (centre - 0.5) ** 2 - 2
    return inside & ((y == x) | (y + x == CELL - 1))


def render(scene: Scene, generator: torch.Generator) -> torch.Tensor:
    """The scene's image ``[3, IMAGE_SIZE, IMAGE_SIZE]``; the noise is drawn from ``generator``."""
    image = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE)
    mask = _shape_mask(scene.shape)
    colour = torch.tensor(COLOURS[scene.colour]).view(3, 1, 1)
    for cell in scene.cells:
        r, c = divmod(cell, GRID)
        patch = image[:, r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]
        patch[:] = torch.where(mask, colour, patch)
    noise = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * NOISE
    return (image + noise).clamp(0.0, 1.0)


def _slots() -> list[tuple[str, str, int]]:
    """Every (shape, colour, count), in a fixed order."""
    return [(s, c, n) for n in range(1, len(NUMBERS) + 1) for c in COLOURS for s in SHAPES]


def make_scenes(count: int, seed: int, exclude: Optional[set] = None, distinct: bool = True) -> list[Scene]:
    """``count`` scenes, none of ``exclude``, every (shape, colour, count) equally often (in turn).
    ``distinct``: no scene twice (the held-out split); else a scene may repeat (the training
    split: a new image each time, its noise differs). A (shape, colour, count) with no scene left
    (16 one-object scenes each) is an error."""
    rng = random.Random(seed)
    excluded = set(exclude or ())
    slots = _slots()
    out = []
    for n in range(count):
        shape, colour, objects = slots[n % len(slots)]
        for _ in range(1000):
            scene = Scene(shape, colour, tuple(sorted(rng.sample(range(GRID * GRID), objects))))
            if scene not in excluded:
                break
        else:
            raise ValueError(f"no {objects}-object {colour} {shape} scene left to draw; ask for fewer scenes")
        if distinct:
            excluded.add(scene)
        out.append(scene)
    rng.shuffle(out)
    return out


def render_all(scenes: list[Scene], seed: int) -> torch.Tensor:
    """``[len(scenes), 3, IMAGE_SIZE, IMAGE_SIZE]``, the same for the same scenes and seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([render(s, generator) for s in scenes]) if scenes else torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)


# ----------------------------------------------------------------------------------------------
# the closed vocabulary
# ----------------------------------------------------------------------------------------------
_WORD = re.compile(r"\n|[A-Za-z]+|[^\sA-Za-z]")


class WordTokenizer:
    """Word-level tokenizer of the preset's closed vocabulary: ``tokenize``, ``detokenize``,
    ``eod``, ``pad`` and ``vocab_size``, as the trainer's other tokenizers."""

    def __init__(self, words: list[str]):
        self.vocab = ["<pad>", "<eod>", "<unk>"] + sorted(set(words))
        self._ids = {w: i for i, w in enumerate(self.vocab)}
        self.pad, self.eod, self.unk = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[int]:
        return [self._ids.get(w, self.unk) for w in _WORD.findall(text)]

    def detokenize(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids if i not in (self.pad, self.eod)).replace(" \n ", "\n")


def tiny_vl_tokenizer() -> WordTokenizer:
    """Every word a caption, a question, an answer or the chat template can hold."""
    scenes = [Scene(s, c, tuple(range(n))) for s in SHAPES for c in COLOURS for n in range(1, len(NUMBERS) + 1)]
    texts = [CAPTION_PREFIX + caption(s) + "\n" for s in scenes]
    texts += [
        "".join(t for t, _ in sft.template_segments(_chat(q, a(s)))) for s in scenes for q, a in QUESTIONS.values()
    ]
    return WordTokenizer([w for t in texts for w in _WORD.findall(t)])


def _chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# ----------------------------------------------------------------------------------------------
# examples and micro-batches
# ----------------------------------------------------------------------------------------------
def caption_examples(tokenizer, scenes: list[Scene]) -> list[tuple[int, list[int], list[bool]]]:
    """``(image index, token ids, in the loss)`` per scene: ``CAPTION_PREFIX``, then the caption,
    the newline and the end of document, which are in the loss. (LLaVA masks every image
    position, the last one too, so the first token after the image is never predicted: the
    prefix is that token, for captions as ``User`` is for questions.)"""
    prefix = tokenizer.tokenize(CAPTION_PREFIX)
    out = []
    for i, s in enumerate(scenes):
        text = tokenizer.tokenize(caption(s) + "\n") + [tokenizer.eod]
        out.append((i, prefix + text, [False] * len(prefix) + [True] * len(text)))
    return out


def question_examples(tokenizer, scenes: list[Scene]) -> list[tuple[int, list[int], list[bool]]]:
    """Every question of every scene, in ``data.sft``'s template with its answer-only mask."""
    out = []
    for i, s in enumerate(scenes):
        for question, answer in QUESTIONS.values():
            ids, answer_mask = sft.encode_conversation(tokenizer, _chat(question, answer(s)))
            out.append((i, ids, answer_mask))
    return out


def question_tasks(scenes: list[Scene]) -> list[dict]:
    """``{"image", "prompt", "answer", "task"}`` for exact match: ``image`` indexes ``scenes``."""
    return [
        {"image": i, "prompt": sft.prompt_text(_chat(q, answer(s))), "answer": answer(s), "task": kind}
        for i, s in enumerate(scenes)
        for kind, (q, answer) in QUESTIONS.items()
    ]


def _row(example: tuple, seq_length: int, pad_id: int) -> dict:
    """LLaVA's inputs for one example: the image token, then the text; targets are the text."""
    _, ids, in_loss = example
    ids, in_loss = ids[:seq_length], in_loss[:seq_length]
    fill = seq_length - len(ids)
    tokens = [IMAGE_TOKEN] + ids[:-1] + [pad_id] * fill
    return dict(
        tokens=torch.tensor(tokens, dtype=torch.long),
        labels=torch.tensor(ids + [pad_id] * fill, dtype=torch.long),
        loss_mask=torch.tensor([float(m) for m in in_loss] + [0.0] * fill),
    )


def vl_micro_batches(
    images: torch.Tensor,
    captions: list,
    questions: list,
    seq_length: int,
    micro_batch_size: int,
    seed: int,
    switch_at: Optional[int],
    start: int = 0,
    pad_id: int = 0,
) -> Iterator[dict]:
    """Micro-batches ``start``, ``start + 1``, ...: micro-batch ``k < switch_at`` from ``captions``,
    the others from ``questions`` (``switch_at`` None: captions only). Each stage goes through its
    examples in a seeded per-epoch order (``data.sft``'s)."""
    orders: dict = {}
    for k in itertools.count(start):
        on_captions = switch_at is None or k < switch_at
        examples = captions if on_captions else questions
        first = k if on_captions else k - switch_at
        rows = []
        for i in range(micro_batch_size):
            epoch, index = divmod(first * micro_batch_size + i, len(examples))
            key = (on_captions, epoch)
            if key not in orders:
                orders = {key: sft.shuffled_order(len(examples), seed + (0 if on_captions else 7), epoch)}
            rows.append(examples[orders[key][index]])
        batch = {
            name: torch.stack([_row(r, seq_length, pad_id)[name] for r in rows])
            for name in ("tokens", "labels", "loss_mask")
        }
        batch["images"] = images[[r[0] for r in rows]]
        batch["position_ids"] = torch.arange(seq_length).unsqueeze(0).expand(micro_batch_size, -1).contiguous()
        yield batch


def held_out_captions(
    data: "TinyVLData", seq_length: int, micro_batch_size: int, seed: int, start: int = 0
) -> Iterator[dict]:
    """The held-out stream of a run with ``seed``, from micro-batch ``start``: the held-out images'
    captions (the trainer's evaluation and the tier report's)."""
    return vl_micro_batches(
        data.images["valid"],
        data.captions["valid"],
        data.questions["valid"],
        seq_length,
        micro_batch_size,
        seed + 1,
        None,
        start,
        pad_id=data.tokenizer.pad,
    )


@dataclasses.dataclass
class TinyVLData:
    tokenizer: WordTokenizer
    scenes: dict  # split -> scenes
    images: dict  # split -> [n, 3, H, W]
    captions: dict  # split -> caption examples
    questions: dict  # split -> question examples
    tasks: list  # the held-out questions, for exact match


def prepare_tiny_vl_data(seed: int = 1234, sizes: tuple = (1440, 192)) -> TinyVLData:
    """Training and held-out scenes (no scene in both), rendered, captioned and asked about; in
    memory. The held-out scenes are distinct and drawn first (``sizes[1] / 48`` per (shape,
    colour, count): at most 16 one-object ones each); the training scenes are the others."""
    tokenizer = tiny_vl_tokenizer()
    heldout = make_scenes(sizes[1], seed + 1)
    train = make_scenes(sizes[0], seed, exclude=set(heldout), distinct=False)
    scenes = {"train": train, "valid": heldout}
    return TinyVLData(
        tokenizer=tokenizer,
        scenes=scenes,
        images={split: render_all(s, seed + 2 + n) for n, (split, s) in enumerate(scenes.items())},
        captions={split: caption_examples(tokenizer, s) for split, s in scenes.items()},
        questions={split: question_examples(tokenizer, s) for split, s in scenes.items()},
        tasks=question_tasks(heldout),
    )
