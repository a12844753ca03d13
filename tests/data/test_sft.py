"""Chat data for fine-tuning (``data.sft``): the template masks the prompt, packed and padded
micro-batches hold the same conversations, Hugging Face tokenizers are accepted, the tiny-sft
tasks are right and their splits disjoint."""

import json

import pytest

from ordmoe_megatron.data import sft
from ordmoe_megatron.data.documents import load_any_tokenizer
from tests.support import hf_char_tokenizer


class CharTokenizer:
    """One id per character; 0 ends a document."""

    eod = 0
    vocab_size = 128

    def tokenize(self, text):
        return [ord(c) for c in text]

    def detokenize(self, ids):
        return "".join(chr(i) for i in ids)


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "add 1 2"},
    {"role": "assistant", "content": "3"},
    {"role": "user", "content": "copy 45"},
    {"role": "assistant", "content": "45"},
]


def test_the_template_counts_the_answers_only():
    tok = CharTokenizer()
    ids, answer = sft.encode_conversation(tok, CHAT)
    assert tok.detokenize(ids[:-1]) == "Be brief.\nUser: add 1 2\nAssistant: 3\nUser: copy 45\nAssistant: 45\n"
    assert ids[-1] == tok.eod and not answer[-1]
    assert "".join(chr(i) for i, a in zip(ids, answer) if a) == " 3\n 45\n"
    example = sft._example(ids, answer, seq_length=200)
    # A target counts where it is an answer token: the mask is on the labels.
    assert "".join(chr(t) for t, m in zip(example["labels"].tolist(), example["loss_mask"].tolist()) if m) == (
        " 3\n 45\n"
    )
    assert sft.prompt_text(CHAT[:3]) == "Be brief.\nUser: add 1 2\nAssistant:"


def test_packed_and_padded_micro_batches_hold_the_same_conversations():
    tok = CharTokenizer()
    chats = [[{"role": "user", "content": "x" * n}, {"role": "assistant", "content": "y" * n}] for n in range(1, 6)]
    examples = [sft.encode_conversation(tok, c) for c in chats]
    packed = list(zip(range(3), sft.sft_micro_batches(examples, 32, 2, True, seed=4)))
    padded = list(zip(range(3), sft.sft_micro_batches(examples, 32, 2, False, seed=4)))
    for (_, p), (_, q) in zip(packed, padded):
        cu = p["cu_seqlens"].tolist()
        assert p["tokens"].shape == (1, cu[-1]) and q["tokens"].shape == (2, 32)
        for row, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
            n = b - a
            for key in ("tokens", "labels", "loss_mask"):
                assert p[key][0, a:b].tolist() == q[key][row, :n].tolist()
            assert p["position_ids"][0, a:b].tolist() == list(range(n))
            assert q["loss_mask"][row, n:].sum() == 0
    # Resumable: micro-batch 2 on its own is the stream's third.
    again = next(sft.sft_micro_batches(examples, 32, 2, True, seed=4, start=2))
    assert again["tokens"].tolist() == packed[2][1]["tokens"].tolist()


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"messages": [{"role": "bot", "content": "hi"}]}', "each message needs 'role'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
        ('{"text": "plain"}', "needs a non-empty 'messages' list"),
        ("not json", "not JSON"),
    ],
)
def test_bad_chat_files_are_refused_naming_the_line(tmp_path, line, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + line + "\n")
    with pytest.raises(sft.ChatDataError, match=f"line 2: .*{message}"):
        sft.read_conversations(str(path))


def test_hugging_face_tokenizers_are_accepted(tmp_path):
    pytest.importorskip("transformers")
    tok = load_any_tokenizer(hf_char_tokenizer(tmp_path / "hf"))
    ids, answer = sft.encode_conversation(tok, CHAT[1:3])
    assert tok.detokenize([i for i, a in zip(ids, answer) if a]) == " 3\n"
    assert ids[-1] == tok.eod == 0


def test_tiny_sft_tasks_are_right_and_the_splits_disjoint():
    train = sft.tiny_sft_conversations(30, seed=1, max_digits=5)
    held = sft.tiny_sft_conversations(30, seed=2, max_digits=5, exclude={c["messages"][1]["content"] for c in train})
    assert {c["kind"] for c in train} == set(sft.TINY_SFT_TASKS) and len(train) == 30 * len(sft.TINY_SFT_TASKS)
    assert not {c["messages"][1]["content"] for c in train} & {c["messages"][1]["content"] for c in held}
    for c in train + held:
        kind, *operands = c["messages"][1]["content"].split()
        answer = c["messages"][2]["content"]
        first = operands[0]
        expected = {
            "copy": first,
            "reverse": first[::-1],
            "sort": "".join(sorted(first)),
        }[kind]
        assert answer == expected, c
    tasks = sft.heldout_tasks(held[:3])
    assert all(t["prompt"].endswith("Assistant:") and t["task"] == c["kind"] for t, c in zip(tasks, held))
