"""The tier report (tools/tier_report.py, ordmoe_megatron/report/) on a tiny random
Hugging Face Qwen2-MoE model converted with ``hf_to_mcore`` and on a checkpoint trained by
``ordmoe-pretrain``.

Log-likelihood convention checked against Hugging Face: every document is cut into windows of
at most ``SEQ + 1`` tokens (consecutive windows share one token); a window's log-likelihood is
the mean of ``log p(y_t | y_<t)`` over its targets; the reported value is the plain mean over
windows. Path 1 of an OrdMoE model is the standard top-K model, so its value must equal the
Hugging Face model's.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ordmoe_megatron.convert import hf_to_mcore  # noqa: E402
from ordmoe_megatron.data.documents import load_any_tokenizer  # noqa: E402
from ordmoe_megatron.report import cli as report_cli  # noqa: E402
from ordmoe_megatron.report import report as report_module  # noqa: E402
from tests.support import run_pretrain  # noqa: E402

VOCAB, SEQ, NUM_EXPERTS = 96, 16, 8
# Windows: 17 -> 1; 5 -> 1; 2 -> 1; 40 -> 3 (17, 17, 8 tokens); 1 -> none (no target); 12 -> 1.
DOC_LENGTHS = [SEQ + 1, 5, 2, 40, 1, 12]
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "and", "then", "slept"]


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory, megatron_single_process):
    """A tiny random Qwen2-MoE (shared expert with gate, q/k/v bias, a dense middle layer,
    softmax-then-top-2 of 8 experts), its Megatron conversion and an evaluation token file."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    root = tmp_path_factory.mktemp("tier_report")
    config = Qwen2MoeConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_experts_per_tok=2,
        intermediate_size=40,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_hidden_layers=3,
        num_experts=NUM_EXPERTS,
        mlp_only_layers=[1],
        norm_topk_prob=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)
    hf_dir = str(root / "hf")
    model.save_pretrained(hf_dir)
    mcore = str(root / "mcore")
    hf_to_mcore(hf_dir, mcore)
    docs = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in DOC_LENGTHS]
    # both accepted line forms
    ids = _write_jsonl(root / "ids.jsonl", [{"tokens": d} if i % 2 else d for i, d in enumerate(docs)])
    return {"root": root, "hf": hf_dir, "mcore": mcore, "ids": ids, "docs": docs, "hf_model": model.eval()}


def hf_mean_logprob(model, docs, seq):
    """The convention above, computed from the Hugging Face model's logits."""
    per_window = []
    with torch.no_grad():
        for doc in docs:
            for start in range(0, len(doc) - 1, seq):
                window = torch.tensor(doc[start : start + seq + 1])
                logits = model(window[None, :-1]).logits[0].double()
                logprobs = torch.log_softmax(logits, -1).gather(-1, window[1:, None])[:, 0]
                per_window.append(logprobs.mean())
    return torch.stack(per_window).mean().item(), len(per_window), sum(len(d) - 1 for d in docs if len(d) > 1)


def run_report(*argv):
    """``main`` in this process; returns (exit code, report or None)."""
    argv = list(argv)
    code = report_cli.main(argv)
    out = argv[argv.index("--out-json") + 1] if "--out-json" in argv else None
    return code, (json.load(open(out)) if code == 0 and out else None)


@pytest.fixture(scope="module")
def report_c3(work):
    out = work["root"] / "c3"
    code, report = run_report(
        "--load",
        work["mcore"],
        "--token-ids",
        work["ids"],
        "--seq-length",
        str(SEQ),
        "--micro-batch-size",
        "3",
        "--out-json",
        str(out) + ".json",
        "--out-png",
        str(out) + ".png",
    )
    assert code == 0
    return report


def test_path1_equals_hugging_face_loglikelihood(work, report_c3):
    ref, windows, targets = hf_mean_logprob(work["hf_model"], work["docs"], SEQ)
    assert report_c3["data"]["sequences"] == windows == 7
    assert report_c3["data"]["target_tokens"] == targets
    path1 = report_c3["paths"][0]
    assert path1["mean_logprob"] == pytest.approx(ref, abs=1e-4)
    assert path1["perplexity"] == pytest.approx(torch.tensor(-ref).exp().item(), rel=1e-4)
    # the test has teeth: the pooled-token mean differs from the per-window mean here
    assert abs(path1["token_mean_logprob"] - ref) > 1e-3


def test_three_tier_report(work, report_c3):
    r = report_c3
    assert [p["path"] for p in r["paths"]] == [1, 2, 3]
    assert r["ordmoe"]["tier_ranks"] == [[1, 2], [3, 4], [7, 8]]
    assert 0.0 <= r["tier_order_acc"] <= 1.0
    assert all(p["perplexity"] > 1 and p["mean_logprob"] < 0 for p in r["paths"])
    layers = r["expert_load"]["layers"]
    assert [entry["layer"] for entry in layers] == [1, 3]  # layer 2 is dense
    for layer in layers:
        assert layer["tier_routed"]
        assert len(layer["tokens_per_expert"]) == 3 and all(
            len(row) == NUM_EXPERTS for row in layer["tokens_per_expert"]
        )
        # every real token goes to two experts on every path; padding is not counted
        assert all(sum(row) == 2 * r["data"]["target_tokens"] for row in layer["tokens_per_expert"])
        assert len(layer["max_over_mean"]) == 3 and all(m >= 1.0 for m in layer["max_over_mean"])
    assert len(r["expert_load"]["max_over_mean"]) == 3
    png = str(work["root"] / "c3.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000


def test_single_tier_and_layer_scope(work, report_c3):
    ref, _, _ = hf_mean_logprob(work["hf_model"], work["docs"], SEQ)
    code, one = run_report(
        "--load",
        work["mcore"],
        "--token-ids",
        work["ids"],
        "--seq-length",
        str(SEQ),
        "--ordmoe-num-tiers",
        "1",
        "--out-json",
        str(work["root"] / "c1.json"),
    )
    assert code == 0
    assert len(one["paths"]) == 1 and one["tier_order_acc"] is None
    assert one["paths"][0]["mean_logprob"] == pytest.approx(ref, abs=1e-4)
    assert one["paths"][0]["mean_logprob"] == pytest.approx(report_c3["paths"][0]["mean_logprob"], abs=1e-5)
    assert all(len(entry["tokens_per_expert"]) == 1 for entry in one["expert_load"]["layers"])
    # Only layer 3 tier-routed: layer 1 runs once before the fan-out, the same for every path.
    code, scoped = run_report(
        "--load",
        work["mcore"],
        "--token-ids",
        work["ids"],
        "--seq-length",
        str(SEQ),
        "--ordmoe-layer-scope",
        "3",
        "--out-json",
        str(work["root"] / "scoped.json"),
    )
    assert code == 0
    first, third = scoped["expert_load"]["layers"]
    assert not first["tier_routed"] and third["tier_routed"]
    assert first["tokens_per_expert"][0] == first["tokens_per_expert"][1] == first["tokens_per_expert"][2]
    assert first["tokens_per_expert"][0] == one["expert_load"]["layers"][0]["tokens_per_expert"][0]
    assert scoped["paths"][0]["mean_logprob"] == pytest.approx(ref, abs=1e-4)


def _word_tokenizer(path):
    """A Hugging Face word-level tokenizer of the model's vocabulary size, saved to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(path)
    return vocab


@pytest.mark.parametrize("documents", ["paragraphs", "lines"])
def test_text_file_equals_its_token_ids(work, documents):
    """--text-file through a Hugging Face tokenizer directory gives the same report as the
    same token ids given with --token-ids (documents, then the end-of-document token)."""
    root = work["root"]
    tok_dir = str(root / "tokenizer")
    if not os.path.exists(tok_dir):
        _word_tokenizer(tok_dir)
    vocab = json.load(open(os.path.join(tok_dir, "tokenizer.json")))["model"]["vocab"]
    text = "the cat sat on a mat\nand then slept\n\n\nthe dog ran far\n  \nthe cat ran\n"
    (root / "eval.txt").write_text(text)
    if documents == "paragraphs":
        docs = ["the cat sat on a mat\nand then slept", "the dog ran far", "the cat ran"]
    else:
        docs = ["the cat sat on a mat", "and then slept", "the dog ran far", "the cat ran"]
    ids = _write_jsonl(
        root / f"text-{documents}.jsonl", [[vocab[w] for w in d.split()] + [vocab["</s>"]] for d in docs]
    )
    common = ["--load", work["mcore"], "--seq-length", str(SEQ)]
    code, from_text = run_report(
        *common,
        "--text-file",
        str(root / "eval.txt"),
        "--tokenizer-model",
        tok_dir,
        "--documents",
        documents,
        "--out-json",
        str(root / f"text-{documents}.json"),
    )
    assert code == 0
    code, from_ids = run_report(*common, "--token-ids", ids, "--out-json", str(root / f"ids-{documents}.json"))
    assert code == 0
    assert from_text["data"]["num_documents"] == len(docs)
    assert from_text["data"]["target_tokens"] == sum(len(d.split()) for d in docs)
    assert [p["mean_logprob"] for p in from_text["paths"]] == [p["mean_logprob"] for p in from_ids["paths"]]
    assert from_text["expert_load"] == from_ids["expert_load"]


def test_megatron_data_path(work):
    from ordmoe_megatron.data import write_indexed_dataset

    root = work["root"]
    tok_dir = str(root / "tokenizer")
    if not os.path.exists(tok_dir):
        _word_tokenizer(tok_dir)
    corpus = _write_jsonl(
        root / "corpus.jsonl", [{"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(9))} for i in range(30)]
    )
    prefix = write_indexed_dataset(corpus, load_any_tokenizer(tok_dir), str(root / "megatron" / "eval"))
    before = sorted(os.listdir(root / "megatron"))
    code, report = run_report(
        "--load",
        work["mcore"],
        "--data-path",
        prefix,
        "--tokenizer-model",
        tok_dir,
        "--seq-length",
        str(SEQ),
        "--max-sequences",
        "6",
        "--out-json",
        str(root / "bin.json"),
    )
    assert code == 0
    assert report["data"]["sequences"] == 6 and report["data"]["target_tokens"] == 6 * SEQ
    assert len(report["paths"]) == 3 and 0.0 <= report["tier_order_acc"] <= 1.0
    assert sorted(os.listdir(root / "megatron")) == before  # no index cache written next to the data


def _truncate_a_shard(path):
    release = os.path.join(path, "release")
    shard = next(os.path.join(release, f) for f in sorted(os.listdir(release)) if f.endswith(".distcp"))
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)


def _corrupt_tracker(path):
    with open(os.path.join(path, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("garbage")


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing checkpoint", "no such checkpoint directory"),
        ("no data source", "give exactly one evaluation data source"),
        ("truncated checkpoint", "truncated checkpoint file"),
        ("corrupt tracker", "is corrupt"),
        ("missing token file", "no such file"),
        ("missing data prefix", "Megatron data file missing"),
        ("token outside the vocabulary", "outside the model's vocabulary of 96"),
        ("too many tiers", "--ordmoe-num-tiers=5 needs 5x2=10 experts"),
        ("layer scope outside the model", "the model has layers 1-3"),
        ("layer scope on the dense layer", "contains no MoE layer"),
        ("average ranking without running means", "use --ordmoe-ranking token"),
    ],
)
def test_bad_inputs_fail_clearly_before_work(work, case, message, monkeypatch, capsys):
    root = work["root"] / case.replace(" ", "_")
    root.mkdir()
    load, data = work["mcore"], ["--token-ids", work["ids"]]
    if case == "missing checkpoint":
        load = str(root / "nowhere")
    elif case == "no data source":
        data = []
    elif case in ("truncated checkpoint", "corrupt tracker"):
        load = str(root / "mcore")
        shutil.copytree(work["mcore"], load)
        (_truncate_a_shard if case == "truncated checkpoint" else _corrupt_tracker)(load)
    elif case == "missing token file":
        data = ["--token-ids", str(root / "missing.jsonl")]
    elif case == "missing data prefix":
        tok_dir = str(work["root"] / "tokenizer")
        if not os.path.exists(tok_dir):
            _word_tokenizer(tok_dir)
        data = ["--data-path", str(root / "missing"), "--tokenizer-model", tok_dir]
    elif case == "token outside the vocabulary":
        data = ["--token-ids", _write_jsonl(root / "big.jsonl", [[1, 2, VOCAB]])]
    extra = {
        "too many tiers": ["--ordmoe-num-tiers", "5"],
        "layer scope outside the model": ["--ordmoe-layer-scope", "9"],
        "layer scope on the dense layer": ["--ordmoe-layer-scope", "2"],
        "average ranking without running means": ["--ordmoe-ranking", "average"],
    }.get(case, [])

    def no_model(*_a, **_k):
        raise AssertionError("the model was built before the inputs were checked")

    monkeypatch.setattr(report_module, "build_report_model", no_model)
    kept, png = root / "kept.json", root / "new.png"
    kept.write_text("precious\n")
    code = report_cli.main(["--load", load, *data, *extra, "--out-json", str(kept), "--out-png", str(png), "--force"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert kept.read_text() == "precious\n" and not png.exists()


def test_existing_output_needs_force(work, capsys):
    out = work["root"] / "exists.json"
    out.write_text("precious\n")
    code = report_cli.main(["--load", work["mcore"], "--token-ids", work["ids"], "--out-json", str(out)])
    assert code == 2 and "already exists; pass --force" in capsys.readouterr().err
    assert out.read_text() == "precious\n"
    code, report = run_report(
        "--load",
        work["mcore"],
        "--token-ids",
        work["ids"],
        "--seq-length",
        str(SEQ),
        "--ordmoe-num-tiers",
        "1",
        "--out-json",
        str(out),
        "--force",
    )
    assert code == 0 and len(report["paths"]) == 1


# The tiny-deepseek preset (group-limited sigmoid routing with expert bias, a shared expert, a
# first dense layer, one MTP layer) at two layers: its preset validates, trains 2 steps, and reports.
DEEPSEEK_PRESET = ["--preset", "tiny-deepseek", "--moe-layer-freq", "[0]+[1]"]


@pytest.mark.parametrize("preset", [[], DEEPSEEK_PRESET], ids=["plain", "tiny-deepseek"])
def test_trained_checkpoint(work, tmp_path, preset):
    """A checkpoint saved by ``ordmoe-pretrain`` (flags in run.json): the report reads it, and
    path 1 of C=3 equals the C=1 report (the standard top-K model) on the same tokens."""
    save = tmp_path / "ckpt"
    small = [
        "--num-layers",
        "2",
        "--hidden-size",
        "32",
        "--ffn-hidden-size",
        "64",
        "--moe-ffn-hidden-size",
        "32",
        "--seq-length",
        "32",
        "--max-position-embeddings",
        "32",
        "--train-iters",
        "2",
        "--lr-warmup-iters",
        "1",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "2",
        "--mock-data",
        "--ordmoe",
        "--save",
        str(save),
    ]
    if preset:  # the preset saves in its work directory
        save = tmp_path / "work" / "checkpoints"
        small = small[: small.index("--save")] + [*preset, "--work-dir", str(tmp_path / "work"), "--eval-iters", "1"]
    proc = run_pretrain(*small)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gen = torch.Generator().manual_seed(1)
    ids = _write_jsonl(
        tmp_path / "ids.jsonl", [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (33, 20, 9)]
    )
    code, c3 = run_report(
        "--load",
        str(save),
        "--token-ids",
        ids,
        "--out-json",
        str(tmp_path / "c3.json"),
        "--out-png",
        str(tmp_path / "c3.png"),
    )
    assert code == 0
    assert c3["checkpoint"]["kind"] == "trained" and c3["checkpoint"]["iteration"] == 2
    assert c3["data"]["seq_length"] == 32 and c3["data"]["sequences"] == 3
    assert len(c3["paths"]) == 3 and 0.0 <= c3["tier_order_acc"] <= 1.0
    moe_layers = 1 if preset else 2
    assert [len(entry["tokens_per_expert"]) for entry in c3["expert_load"]["layers"]] == [3] * moe_layers
    if preset:
        assert c3["checkpoint"]["num_experts"] == 16
    code, c1 = run_report(
        "--load", str(save), "--token-ids", ids, "--ordmoe-num-tiers", "1", "--out-json", str(tmp_path / "c1.json")
    )
    assert code == 0
    assert c1["paths"][0]["mean_logprob"] == pytest.approx(c3["paths"][0]["mean_logprob"], abs=1e-5)


def test_cli_tool(work, tmp_path):
    """tools/tier_report.py as a user runs it (a fresh process)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "cli.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "tools", "tier_report.py"),
            "--load",
            work["mcore"],
            "--token-ids",
            work["ids"],
            "--seq-length",
            str(SEQ),
            "--ordmoe-num-tiers",
            "2",
            "--out-json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tier-ordering accuracy" in proc.stdout and len(json.load(open(out))["paths"]) == 2


def test_model_flags_can_be_supplied_and_an_unwritable_output_is_refused_early(work, tmp_path, capsys, monkeypatch):
    """A checkpoint that records no model flags (one saved by Megatron-LM) takes --model-args;
    an --out-json that cannot be written is refused before the model is built."""
    load = tmp_path / "mcore"
    shutil.copytree(work["mcore"], load)
    flags = tmp_path / "flags.json"
    shutil.move(load / "model_args.json", flags)
    base = ["--load", str(load), "--token-ids", work["ids"], "--seq-length", str(SEQ)]
    assert report_cli.main(base) == 2 and "pass --model-args FILE" in capsys.readouterr().err
    with monkeypatch.context() as patch:  # a directory this user cannot write (root writes anywhere)

        def denied(*_a, **_k):
            raise PermissionError(13, "Permission denied")

        def no_model(*_a, **_k):
            raise AssertionError("the model was built before the outputs were checked")

        patch.setattr(tempfile, "mkstemp", denied)
        patch.setattr(report_module, "build_report_model", no_model)
        out = tmp_path / "locked" / "r.json"
        code = report_cli.main([*base, "--model-args", str(flags), "--out-json", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"--out-json {out} cannot be written" in err and "Permission denied" in err, err
    code, result = run_report(*base, "--model-args", str(flags), "--out-json", str(tmp_path / "r.json"))
    assert code == 0 and len(result["paths"]) == 3


def test_non_finite_weights_are_refused(megatron_single_process):
    from tests.support import tiny_model

    model = tiny_model()
    report_module.check_finite(model, "ckpt/iter_0000004")
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(report_module.OrdMoEError, match="weights are not finite .*diverged"):
        report_module.check_finite(model, "ckpt/iter_0000004")
