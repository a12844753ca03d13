"""Megatron-LM's ``pretrain_vlm.py`` with ``--ordmoe`` (``ordmoe_megatron.megatron_lm.vlm``, its patches, the example).

- always run: the vision-language refusals end the parse naming the flag; the vision projector of
  an MoE language model gets the dense MLP spec.
- ``MEGATRON_LM_PATH`` set (a Megatron-LM checkout at core_v0.16.1 or core_v0.19.0; triton, pybind11
  and six importable): the patch applies to a clean clone; the patched ``pretrain_vlm.py`` refuses
  pipeline parallelism before it builds anything; and two iterations of a tiny LLaVA (one ViT
  layer, two MoE language layers) on Megatron's mock multimodal data on the CPU: with
  ``--ordmoe`` the rank loss and every path's log-likelihood are on the training lines and the
  loss is finite; with ``--ordmoe-num-tiers 1`` the losses are those of ``--no-ordmoe``.
"""

import argparse
import functools
import glob
import importlib.util
import math
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PATCHES = os.path.join(ROOT, "patches")
EXAMPLE = os.path.join(ROOT, "examples", "pretrain_vlm_ordmoe.py")
MEGATRON_LM_PATH = os.environ.get("MEGATRON_LM_PATH")
needs_megatron_lm = pytest.mark.skipif(
    not MEGATRON_LM_PATH,
    reason="set MEGATRON_LM_PATH to a Megatron-LM checkout (core_v0.16.1 or core_v0.19.0; triton, pybind11 and "
    "six importable) to run the Megatron-LM vision-language tests (docs/multimodal.md)",
)


# ============================================================================================
# always run
# ============================================================================================
from ordmoe_megatron.megatron_lm import hooks, vlm  # noqa: E402


def _parser():
    parser = argparse.ArgumentParser(prog="pretrain_vlm.py")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--context-parallel-size", type=int, default=1)
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--load", default=None)
    return parser


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--pipeline-model-parallel-size", "2"], "--pipeline-model-parallel-size > 1 is not supported"),
        (["--context-parallel-size", "2"], "--context-parallel-size > 1 is not supported"),
        (["--sequence-parallel"], "--sequence-parallel (and so --tensor-model-parallel-size > 1"),
    ],
)
def test_vlm_refusals_end_the_parse_naming_the_flag(monkeypatch, capsys, argv, message):
    installed = []
    monkeypatch.setattr(hooks, "install", installed.append)
    parser = vlm.vlm_extra_args_provider(check_now=False)(_parser())
    args = parser.parse_args(argv)  # without --ordmoe: Megatron-LM's to judge
    assert args.ordmoe is False and not installed
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args([*argv, "--ordmoe"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("pretrain_vlm.py: error: OrdMoE: a vision-language model with") and message in err
    assert len(err.strip().splitlines()) == 1 and not installed  # refused before anything


def test_vlm_projector_of_an_moe_language_model_gets_the_dense_mlp():
    from megatron.core.models.multimodal.llava_spec import decoder_model_with_local_default_spec
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules

    def mlp_submodules(spec):  # a ModuleSpec up to megatron-core 0.17, a partial from 0.18
        mlp = spec.submodules.mlp
        return mlp.keywords["submodules"] if isinstance(mlp, functools.partial) else mlp.submodules

    moe = mlp_submodules(decoder_model_with_local_default_spec(8, False))
    dense = vlm.dense_projection_spec(moe, "local")
    assert isinstance(dense, MLPSubmodules)
    assert (dense.linear_fc1, dense.linear_fc2) == (ColumnParallelLinear, RowParallelLinear)
    given = mlp_submodules(decoder_model_with_local_default_spec(None, False))
    assert vlm.dense_projection_spec(given, "local") is given  # a dense model's: untouched


# ============================================================================================
# MEGATRON_LM_PATH: the patch and a few CPU iterations of pretrain_vlm.py
# ============================================================================================
TINY = (
    "--encoder-num-layers 1 --decoder-num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 128 "
    "--num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 64 --seq-length 64 --max-position-embeddings 128 "
    "--position-embedding-type rope --normalization RMSNorm --swiglu --untie-embeddings-and-output-weights "
    "--micro-batch-size 2 --global-batch-size 4 --train-iters 2 --lr 1e-3 --log-interval 1 --mock-data "
    "--tokenizer-type NullTokenizer --vocab-size 256 --disable-bias-linear --moe-token-dispatcher-type alltoall "
    "--moe-aux-loss-coeff 1e-2 --eval-iters 1 --eval-interval 1000 --hidden-dropout 0 --attention-dropout 0 "
    "--img-h 32 --img-w 32 --patch-dim 16 --dataloader-seq-length 32 --ckpt-format torch"
).split()


def _tag(checkout):
    return (
        "core_v0.19.0"
        if "parse_and_validate_args" in open(os.path.join(checkout, "pretrain_vlm.py")).read()
        else ("core_v0.16.1")
    )


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A clean clone of MEGATRON_LM_PATH with the patch applied to pretrain_vlm.py (a checkout
    the user patched works too); the interpreter is the one running the tests."""
    if not MEGATRON_LM_PATH:
        pytest.skip("MEGATRON_LM_PATH not set")
    for package in ("triton", "six"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"megatron.training imports {package}: pip install -e '.[megatron-lm]'")
    clean = str(tmp_path_factory.mktemp("megatron-lm-vlm") / "Megatron-LM")
    proc = subprocess.run(["git", "clone", "-q", "--shared", MEGATRON_LM_PATH, clean], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"MEGATRON_LM_PATH={MEGATRON_LM_PATH} must be a git checkout of Megatron-LM: {proc.stderr}")
    for built in glob.glob(os.path.join(MEGATRON_LM_PATH, "megatron", "core", "datasets", "helpers_cpp*.so")):
        shutil.copy(built, os.path.join(clean, "megatron", "core", "datasets"))
    patch = os.path.join(PATCHES, f"megatron-lm-{_tag(clean)}-pretrain-vlm-ordmoe.patch")
    proc = subprocess.run(["git", "apply", "--verbose", patch], cwd=clean, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[-1] for line in open(patch) if line.startswith("+++ ")] == ["b/pretrain_vlm.py"]
    return clean


def _env(clean, **extra):
    from ordmoe_megatron.runtime.distributed import find_free_port
    from tests.support import cpu_env

    env = cpu_env()
    python311 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "python311")
    first = [python311] if sys.version_info < (3, 12) else []
    env["PYTHONPATH"] = os.pathsep.join([*first, clean, ROOT, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYENV_VERSION"] = platform.python_version()
    env.update(PYTHONWARNINGS="ignore", CUDA_DEVICE_MAX_CONNECTIONS="1", MASTER_PORT=str(find_free_port()))
    env.update(MASTER_ADDR="127.0.0.1", WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    env.update(extra)
    return env


def _losses(stdout):
    """{iteration: {metric: value}} from Megatron-LM's training lines."""
    out = {}
    for line in stdout.splitlines():
        match = re.search(r"\] iteration\s+(\d+)/\s*\d+ \|", line)
        if match:
            fields = [f.split(":", 1) for f in line.split("|")[1:] if ":" in f]
            out[int(match.group(1))] = {k.strip(): float(v) for k, v in fields if re.fullmatch(r"\s*[-+.\dE]+\s*", v)}
    return out


def _train(clean, script, tmp_path, *extra):
    launcher = [sys.executable, "-m", "ordmoe_megatron.megatron_lm.cpu_launch", "--megatron-lm", clean]
    proc = subprocess.run(
        [*launcher, script, *TINY, *extra],
        cwd=tmp_path,
        env=_env(clean),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return _losses(proc.stdout)


@needs_megatron_lm
def test_vlm_patched_refuses_pipeline_parallelism_before_building(checkout, tmp_path):
    from ordmoe_megatron.megatron_lm.cpu_launch import with_cpu_flags

    script = os.path.join(checkout, "pretrain_vlm.py")
    argv = [sys.executable, script, *with_cpu_flags(TINY), "--pipeline-model-parallel-size", "2", "--ordmoe"]
    proc = subprocess.run(argv, cwd=tmp_path, env=_env(checkout, WORLD_SIZE="2"), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "pretrain_vlm.py: error: OrdMoE: a vision-language model with --pipeline-model-parallel-size > 1" in (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr and "building a multimodal model" not in proc.stdout


@needs_megatron_lm
def test_vlm_layer_scope_and_dry_run_read_the_language_models_depth(checkout, tmp_path):
    """--num-layers is the vision encoder's depth (1 here, from --encoder-num-layers); the layer
    scope names the language model's layers (2 of them): layer 2 is accepted, layer 3 refused."""
    launcher = [sys.executable, "-m", "ordmoe_megatron.megatron_lm.cpu_launch", "--megatron-lm", checkout]
    script = os.path.join(checkout, "pretrain_vlm.py")

    def dry_run(scope):
        argv = [*launcher, script, *TINY, "--ordmoe", "--ordmoe-layer-scope", scope, "--ordmoe-dry-run"]
        return subprocess.run(argv, cwd=tmp_path, env=_env(checkout), capture_output=True, text=True, timeout=300)

    proc = dry_run("2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "model: 2 layers" in proc.stdout and "tier-routed MoE layers: 2" in proc.stdout
    assert "fan-out before layer 2 (layer 1 runs once)" in proc.stdout
    proc = dry_run("3")
    assert proc.returncode != 0
    assert "--ordmoe-layer-scope names layers [3]; the model has layers 1-2" in proc.stdout + proc.stderr


@needs_megatron_lm
def test_vlm_cpu_training_logs_the_ordmoe_metrics(checkout, tmp_path):
    """The patched pretrain_vlm.py, C = 3: rank loss (with either sign), the three paths'
    log-likelihoods, path 1's equal to the LM loss, all finite."""
    losses = _train(checkout, os.path.join(checkout, "pretrain_vlm.py"), tmp_path, "--ordmoe")
    assert sorted(losses) == [1, 2]
    for it in (1, 2):
        line = losses[it]
        assert {"lm loss", "path1 nll", "path2 nll", "path3 nll", "load_balancing_loss"} <= line.keys()
        assert len({"rank loss", "-rank loss"} & line.keys()) == 1
        assert all(math.isfinite(v) for v in line.values())
        assert 0 < line["lm loss"] < 2 * math.log(256)
        assert line["path1 nll"] == pytest.approx(line["lm loss"], rel=1e-5)


@needs_megatron_lm
def test_vlm_cpu_training_one_tier_equals_no_ordmoe(checkout, tmp_path):
    """The unpatched route (examples/pretrain_vlm_ordmoe.py): one tier is the plain LLaVA model."""
    plain = _train(checkout, EXAMPLE, tmp_path)
    one = _train(checkout, EXAMPLE, tmp_path, "--ordmoe", "--ordmoe-num-tiers", "1")
    assert sorted(plain) == sorted(one) == [1, 2]
    for it in (1, 2):
        for key in ("lm loss", "load_balancing_loss", "grad norm"):
            assert one[it][key] == pytest.approx(plain[it][key], rel=1e-6), (it, key)
