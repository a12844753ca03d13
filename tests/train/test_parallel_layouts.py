"""Every Megatron parallel layout reproduces the single-process OrdMoE run (C = 3, fp32, CPU).

Each layout runs ``torchrun --no-python ... ordmoe-pretrain`` exactly as a user would, from the
same starting weights, for two optimizer steps; its ``--metrics-out`` must match the
single-process run and its first-step gradients (``--save-grads``, saved in the model's sharded
layout and loaded back into one process) must match every parameter's gradient.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ordmoe_megatron.runtime.distributed import find_free_port
from ordmoe_megatron.testing import run_on_ranks
from tests.helpers import cpu_env

MODEL = ["--num-layers", "4", "--hidden-size", "32", "--ffn-hidden-size", "64", "--moe-ffn-hidden-size", "32",
         "--seq-length", "32", "--max-position-embeddings", "32", "--lr-warmup-iters", "1",
         "--micro-batch-size", "2", "--global-batch-size", "8", "--log-interval", "1", "--ordmoe", "--mock-data"]

LAYOUTS = {
    "dp2": (2, []),
    "tp2-sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "ep2": (2, ["--expert-model-parallel-size", "2"]),
    "pp2-1f1b": (2, ["--pipeline-model-parallel-size", "2"]),
    "pp2-vpp2": (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
    "ep2-pp2": (4, ["--expert-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    "tp2-sp-ep2": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size", "2"]),
}


def run(nproc, *args):
    if nproc == 1:
        cmd = [sys.executable, "-m", "ordmoe_megatron.train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--no-python", f"--nproc-per-node={nproc}",
               "--master-addr=127.0.0.1", f"--master-port={find_free_port()}", "ordmoe-pretrain"]
    env = cpu_env(OMP_NUM_THREADS="1")  # gloo on the CPU by design, on a GPU machine too
    proc = subprocess.run(cmd + MODEL + list(args), capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd + list(args))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    run(1, "--train-iters", "2", "--save", str(root / "init"))  # some trained weights to start from
    # Every layout starts from these weights only (--finetune): a fresh optimizer at iteration 0.
    return root


def reference(start, per_token):
    out = start / f"reference{'-per-token' if per_token else ''}"
    if not (out / "metrics.jsonl").exists():
        out.mkdir(exist_ok=True)
        extra = ["--calculate-per-token-loss"] if per_token else []
        run(1, "--train-iters", "2", "--load", str(start / "init"), "--metrics-out", str(out / "metrics.jsonl"),
            "--save-grads", str(out / "grads"), "--finetune", *extra)
    return out


def load_grads(rank, world_size, grad_dirs):
    """In one process: the gradient checkpoints, as {parameter name: tensor}."""
    from ordmoe_megatron.runtime import checkpointing
    from ordmoe_megatron.runtime.distributed import init_model_parallel
    from ordmoe_megatron.train import build, cli

    config = cli.run_config_from_args(cli.parse_args(MODEL))
    init_model_parallel(config.layout, config.seed)
    tconfig = build.transformer_config(config)
    out = []
    for path in grad_dirs:
        chunks = build.model_chunks(config, tconfig)
        checkpointing.load_checkpoint(path, chunks, load_rng=False)
        out.append({name: p.detach().clone() for name, p in chunks[0].named_parameters()})
    return out


def assert_metrics_match(ref, got):
    assert len(ref) == len(got) == 2
    for r, g in zip(ref, got):
        # The rank loss is a difference of nearly equal log-likelihoods: an absolute floor far
        # below the LM-loss scale keeps float32 reduction order from failing a relative check.
        for key, abs_tol in (("lm_loss", 0), ("rank_loss", 1e-7), ("aux_loss", 0), ("tier_order_acc", 0)):
            assert g[key] == pytest.approx(r[key], rel=1e-5, abs=abs_tol), key
        assert g["path_logprob"] == pytest.approx(r["path_logprob"], rel=1e-5)


# Per-token loss normalisation matters where the token count is reduced: pipeline schedules, DP.
CASES = [(layout, False) for layout in sorted(LAYOUTS)] + [(l, True) for l in ("dp2", "pp2-1f1b", "pp2-vpp2")]


@pytest.mark.parametrize("layout,per_token", CASES, ids=[f"{l}{'-per-token' if t else ''}" for l, t in CASES])
def test_layout_reproduces_single_process(start, layout, per_token):
    ref = reference(start, per_token)
    nproc, flags = LAYOUTS[layout]
    out = start / f"{layout}{'-per-token' if per_token else ''}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    extra = ["--calculate-per-token-loss"] if per_token else []
    run(nproc, "--train-iters", "2", "--load", str(start / "init"), "--metrics-out", str(out / "metrics.jsonl"),
        "--save-grads", str(out / "grads"), "--finetune", *flags, *extra)
    read = lambda p: [json.loads(line) for line in open(p)]
    assert_metrics_match(read(ref / "metrics.jsonl"), read(out / "metrics.jsonl"))

    ref_grads, grads = run_on_ranks(load_grads, 1, [str(ref / "grads"), str(out / "grads")])[0]
    assert ref_grads.keys() == grads.keys()
    for name, ref_grad in ref_grads.items():
        scale = ref_grad.abs().max().item()
        assert scale > 0, f"{name} has no gradient"
        assert torch.allclose(grads[name], ref_grad, rtol=1e-4, atol=1e-4 * scale), name
