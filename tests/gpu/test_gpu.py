"""On one CUDA GPU: C = 1 equals plain GPTModel, the fused paths equal separate passes, and the
tiny preset trains in bf16 end to end, resumes, and gets its tier report.

Skipped, with the reason, on a machine without CUDA (CI has none). Run them where a GPU is:
``python -m pytest -q tests/gpu``.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from ordmoe_megatron import OrdMoEConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"),
]


def _python(code: str, **env):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **env},
    )


def test_single_tier_equals_plain_gpt_model_with_deterministic_algorithms():
    # A process of its own: cuBLAS reads its workspace setting when CUDA starts.
    proc = _python(
        """
        import torch
        torch.use_deterministic_algorithms(True)
        from ordmoe_megatron.runtime.distributed import init_process_group
        from tests.support import single_tier_and_plain_training
        init_process_group()
        for extra in ({}, {"moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True}):
            (pl, pg), (sl, sg) = single_tier_and_plain_training(0, 1, extra)
            assert pg[0][0].is_cuda
            assert all(torch.equal(a, b) for a, b in zip(pl, sl)), (pl, sl)
            assert all(torch.equal(a, b) for step_a, step_b in zip(pg, sg) for a, b in zip(step_a, step_b))
        print("OK")
    """,
        CUBLAS_WORKSPACE_CONFIG=":4096:8",
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_paths_equal_separate_tier_passes(megatron_single_process, dtype, rtol):
    from tests.support import BATCH, tiny_batch, tiny_model

    model = tiny_model(OrdMoEConfig(num_tiers=3)).to(dtype)
    assert next(model.parameters()).is_cuda
    b = tiny_batch()
    with torch.no_grad():
        fused = model(b["tokens"], b["position_ids"], None, labels=b["labels"]).float()
        for j in range(3):
            model.set_path_tiers([j])
            alone = model(b["tokens"], b["position_ids"], None, labels=b["labels"]).float()
            torch.testing.assert_close(fused[j * BATCH : (j + 1) * BATCH], alone, rtol=rtol, atol=rtol * 1e-2)
    assert not torch.allclose(fused[:BATCH], fused[2 * BATCH :])


def test_tiny_preset_in_bf16_trains_resumes_and_reports(tmp_path):
    work = tmp_path / "tiny"
    common = [
        sys.executable,
        "-m",
        "ordmoe_megatron.train",
        "--preset",
        "tiny",
        "--work-dir",
        str(work),
        "--bf16",
        "--eval-iters",
        "1",
        "--log-interval",
        "5",
    ]
    first = subprocess.run(
        common + ["--train-iters", "20", "--save-interval", "10"], capture_output=True, text=True, timeout=900
    )
    assert first.returncode == 0, first.stderr[-4000:]
    # As if the run had died after iteration 10: the resumed run trains 11-20 again.
    shutil.rmtree(work / "checkpoints" / "iter_0000020")
    (work / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("10")
    resumed = subprocess.run(
        common + ["--train-iters", "20", "--save-interval", "10"], capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming at iteration 10" in resumed.stdout
    records = [json.loads(line) for line in open(work / "metrics.jsonl")]
    assert [r["iteration"] for r in records] == list(range(1, 21))
    assert all(r["lm_loss"] > 0 and len(r["path_logprob"]) == 3 for r in records)

    report = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ordmoe_megatron.report",
            "--load",
            str(work / "checkpoints"),
            "--data-path",
            str(work / "data" / "megatron" / "valid"),
            "--tokenizer-model",
            str(work / "data" / "tokenizer" / "tiny_sp.model"),
            "--max-sequences",
            "16",
            "--out-json",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.load(open(report))
    assert len(result["paths"]) == 3 and result["paths"][0]["perplexity"] > 1


def test_sequential_schedule_matches_fused_and_holds_one_path_of_activations(megatron_single_process):
    """On the GPU: the sequential schedule's gradients equal the fused ones (fp32), and its peak
    memory during the step stays well under the fused step's (one path's activations at a time)."""
    from tests.support import ordmoe_schedule_step, tiny_batches, tiny_model

    model = tiny_model(OrdMoEConfig(num_tiers=3))
    batches = tiny_batches(2)
    peaks, grads = {}, {}
    for schedule in ("fused", "sequential"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _, grads[schedule] = ordmoe_schedule_step(model, OrdMoEConfig(num_tiers=3, path_schedule=schedule), batches)
        torch.cuda.synchronize()
        peaks[schedule] = torch.cuda.max_memory_allocated() - before
    for name, grad in grads["fused"].items():
        assert grads["sequential"][name].is_cuda
        torch.testing.assert_close(grads["sequential"][name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())
    assert peaks["sequential"] < 0.8 * peaks["fused"], peaks


def test_path_benchmark_runs_on_the_gpu(tmp_path):
    """tools/bench_paths.py puts the model and the data on the GPU (bf16) and measures there."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "tools/bench_paths.py", "--rounds", "1", "--shapes", "8x-top2", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.load(open(out))["8x-top2"]
    assert "bf16" in proc.stdout and torch.cuda.get_device_name() in result["device"]
    rows = {r["variant"]: r for r in result["steps"]}
    assert rows["plain GPTModel"]["peak_bytes"] > 1e9  # the full-size layer, on the device
