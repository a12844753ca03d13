"""``data.vision``: the tiny-vl scenes, their images, captions and questions, and the stream."""

import torch

from ordmoe_megatron.data import vision


def _drawn(image: torch.Tensor):
    """Read a rendered image back: the occupied cells, and per cell its mean colour and the mask
    of its lit pixels."""
    cells = {}
    for cell in range(vision.GRID * vision.GRID):
        r, c = divmod(cell, vision.GRID)
        patch = image[:, r * vision.CELL : (r + 1) * vision.CELL, c * vision.CELL : (c + 1) * vision.CELL]
        lit = patch.max(0).values > 0.5
        if lit.any():
            cells[cell] = (patch[:, lit].mean(1), lit)
    return cells


def test_every_answer_and_caption_matches_the_drawn_image():
    data = vision.prepare_tiny_vl_data(seed=3, sizes=(96, 48))
    masks = {s: vision._shape_mask(s) for s in vision.SHAPES}
    for split in ("train", "valid"):
        for scene, image in zip(data.scenes[split], data.images[split]):
            cells = _drawn(image)
            assert sorted(cells) == list(scene.cells)  # the count (and where)
            for colour_mean, lit in cells.values():
                nearest = min(vision.COLOURS, key=lambda k: (torch.tensor(vision.COLOURS[k]) - colour_mean).abs().sum())
                assert nearest == scene.colour
                assert torch.equal(lit, masks[scene.shape])
    # Question i of image k has the answer the scene gives; the caption says the same.
    tok = data.tokenizer
    for task in data.tasks:
        scene = data.scenes["valid"][task["image"]]
        assert (
            task["answer"]
            == dict(zip(vision.QUESTIONS, (f(scene) for _, f in vision.QUESTIONS.values())))[task["task"]]
        )
    image, ids, in_loss = data.captions["valid"][0]
    words = tok.detokenize([i for i, m in zip(ids, in_loss) if m]).split()
    scene = data.scenes["valid"][image]
    assert words == vision.caption(scene).split()
    assert words[0] == vision.NUMBERS[scene.count - 1] and words[1] == scene.colour
    for _, ids, in_loss in data.questions["valid"][:6]:  # answer-only: the answer word and its newline
        assert [tok.vocab[i] for i, m in zip(ids, in_loss) if m][1] == "\n"


def test_shapes_are_told_apart_by_their_pixels():
    masks = [vision._shape_mask(s) for s in vision.SHAPES]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert (masks[i] ^ masks[j]).sum() >= 8


def test_heldout_scenes_are_distinct_and_not_in_training_and_balanced():
    data = vision.prepare_tiny_vl_data(seed=5, sizes=(480, 96))
    train, heldout = data.scenes["train"], data.scenes["valid"]
    assert len(set(heldout)) == len(heldout) == 96
    assert not set(train) & set(heldout)
    for split in (train, heldout):
        for counter in (lambda s: s.count, lambda s: s.colour, lambda s: s.shape):
            values = [counter(s) for s in split]
            assert max(values.count(v) for v in set(values)) == min(values.count(v) for v in set(values))


def test_the_data_are_the_same_for_a_seed_and_differ_across_seeds():
    a, b, c = (vision.prepare_tiny_vl_data(seed=s, sizes=(48, 48)) for s in (1, 1, 2))
    assert a.scenes == b.scenes and torch.equal(a.images["train"], b.images["train"])
    assert a.questions == b.questions and a.tasks == b.tasks
    assert a.scenes != c.scenes


def test_the_stream_switches_from_captions_to_questions_and_resumes_anywhere():
    data = vision.prepare_tiny_vl_data(seed=1, sizes=(48, 48))
    args = (data.images["train"], data.captions["train"], data.questions["train"], 16, 4, 7)
    stream = vision.vl_micro_batches(*args, switch_at=3)
    batches = [next(stream) for _ in range(6)]
    caption_id, user_id = data.tokenizer.tokenize("Caption User")
    for k, b in enumerate(batches):
        assert (b["tokens"][:, 0] == vision.IMAGE_TOKEN).all()
        assert (b["tokens"][:, 1] == (caption_id if k < 3 else user_id)).all()
        assert b["images"].shape == (4, 3, vision.IMAGE_SIZE, vision.IMAGE_SIZE)
        assert b["loss_mask"][:, 0].sum() == 0  # the token LLaVA can never predict is out of the loss
    resumed = vision.vl_micro_batches(*args, switch_at=3, start=2)
    for b in batches[2:]:
        again = next(resumed)
        assert all(torch.equal(b[k], again[k]) for k in b)
