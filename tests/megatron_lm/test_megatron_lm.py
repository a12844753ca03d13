"""Megatron-LM integration (``ordmoe_megatron.megatron_lm``, the patch, the example, the launch scripts).

Two groups:

- always run: every ``examples/*.sh`` passes ``bash -n``; the scripts' ``--dry-run`` plumbing
  (with stand-in programs); a real ``ordmoe-pretrain`` script dry run; the ``megatron_lm`` pieces
  (argument provider, validation errors, builder, install/uninstall, FLOPs accounting) with
  argparse namespaces and stand-in modules -- no Megatron-LM needed.
- ``MEGATRON_LM_PATH`` set (a Megatron-LM checkout at tag ``core_v0.16.1``): the patch applies
  with ``git apply --check``; the patched ``pretrain_gpt.py --help`` works without ``--ordmoe``;
  bad OrdMoE settings fail with a message naming the flag; ``--ordmoe-dry-run`` through the patched
  script and the launch scripts; and a few iterations of ``pretrain_gpt.py`` on CPU with
  ``--mock-data``: unpatched vs patched without ``--ordmoe`` (identical), ``--ordmoe`` (same
  first-step LM loss, OrdMoE metrics logged), and the unpatched example under torchrun with
  pipeline parallelism. Megatron-LM's ``megatron.training`` imports ``triton``, and its dataset
  helpers are compiled at start-up with ``pybind11`` (``pip install triton pybind11``; neither
  pulls torch).

CPU runs of Megatron-LM's training loop go through the installed launcher,
``python -m ordmoe_megatron.megatron_lm.cpu_launch`` (``ordmoe-megatron-lm-cpu``), on a clean clone
of MEGATRON_LM_PATH that the tests make themselves (a checkout the user patched works too).
"""

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import types

import pytest

from ordmoe_megatron.megatron_lm import cpu_launch
from ordmoe_megatron.runtime import compat

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")
PATCHES = os.path.join(ROOT, "patches")
EXAMPLE = os.path.join(EXAMPLES, "pretrain_gpt_ordmoe.py")
SCRIPTS = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".sh"))
LAUNCHERS = [s for s in SCRIPTS if s != "ordmoe_common.sh"]
MEGATRON_LM_PATH = os.environ.get("MEGATRON_LM_PATH")
needs_megatron_lm = pytest.mark.skipif(
    not MEGATRON_LM_PATH,
    reason=f"set MEGATRON_LM_PATH to a Megatron-LM checkout ({compat.supported_megatron_lm_tags()}; triton, pybind11 "
    "and six importable) to run the Megatron-LM integration tests (docs/megatron_lm.md)",
)


def patch_for(checkout):
    """The patch for the checkout's pretrain_gpt.py, told by how it calls pretrain (the tags
    differ there): core_v0.19 builds a GPTModelConfig, core_v0.18 parses before pretrain, and
    core_v0.16 and core_v0.17 pass everything to pretrain."""
    script = open(os.path.join(checkout, "pretrain_gpt.py")).read()
    tag = (
        "core_v0.19.0"
        if "gpt_config_from_args" in script
        else "core_v0.18.2"
        if "parse_and_validate_args" in script
        else "core_v0.16.1"
    )
    return os.path.join(PATCHES, f"megatron-lm-{tag}-ordmoe.patch")


# ============================================================================================
# always run: launch scripts
# ============================================================================================
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_passes_bash_n(script):
    proc = subprocess.run(["bash", "-n", os.path.join(EXAMPLES, script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_launch_scripts_are_there():
    assert set(LAUNCHERS) == {
        "megatron_lm_torchrun.sh",
        "megatron_lm_slurm.sh",
        "ordmoe_pretrain_torchrun.sh",
        "ordmoe_pretrain_slurm.sh",
    }
    for script in LAUNCHERS:
        assert os.access(os.path.join(EXAMPLES, script), os.X_OK), f"{script} is not executable"


def _stand_in(path, help_text=""):
    """A program that prints its environment's WORLD_SIZE and its arguments, one a line."""
    with open(path, "w") as f:
        f.write(
            textwrap.dedent(f"""\
            #!/usr/bin/env bash
            if [[ "${{1:-}}" == --help ]]; then echo "{help_text}"; exit 0; fi
            echo "WORLD_SIZE=$WORLD_SIZE RANK=$RANK"
            printf 'ARG %s\\n' "$@"
            """)
        )
    os.chmod(path, 0o755)
    return path


def _run_script(script, *args, env=None):
    full_env = {**os.environ, "TORCHRUN": "false", **(env or {})}
    return subprocess.run(
        ["bash", os.path.join(EXAMPLES, script), *args], capture_output=True, text=True, env=full_env, timeout=120
    )


def _argv(stdout):
    return [line[4:] for line in stdout.splitlines() if line.startswith("ARG ")]


@pytest.mark.parametrize("script,world", [("ordmoe_pretrain_torchrun.sh", 8), ("ordmoe_pretrain_slurm.sh", 32)])
def test_ordmoe_pretrain_script_dry_run_plumbing(tmp_path, script, world):
    fake = _stand_in(tmp_path / "ordmoe-pretrain", help_text="--bf16")
    proc = _run_script(script, "--dry-run", "--train-iters", "7", env={"ORDMOE_PRETRAIN": str(fake)})
    assert proc.returncode == 0, proc.stderr
    argv = _argv(proc.stdout)
    assert f"WORLD_SIZE={world} RANK=0" in proc.stdout
    assert argv[-1] == "--dry-run" and argv[-3:-1] == ["--train-iters", "7"]  # extra flags come last
    assert "--bf16" in argv and "--fp8-format" not in argv
    assert argv[argv.index("--num-experts") + 1] == "64" and argv[argv.index("--moe-router-topk") + 1] == "6"
    assert argv[argv.index("--num-layers") + 1] == "28" and argv[argv.index("--hidden-size") + 1] == "2048"
    launch = next(line for line in proc.stdout.splitlines() if line.startswith("would launch: "))
    assert "--no-python" in launch and ("srun" in launch) == script.endswith("slurm.sh")


def test_ordmoe_pretrain_script_refuses_fp8_with_the_reason(tmp_path):
    fake = _stand_in(tmp_path / "ordmoe-pretrain")
    proc = _run_script(
        "ordmoe_pretrain_torchrun.sh", "--dry-run", env={"ORDMOE_PRETRAIN": str(fake), "PRECISION": "fp8"}
    )
    assert proc.returncode == 2 and "builds no Transformer Engine layers" in proc.stderr
    assert "ARG " not in proc.stdout  # nothing was run


@pytest.mark.parametrize("script,world", [("megatron_lm_torchrun.sh", 8), ("megatron_lm_slurm.sh", 32)])
def test_megatron_lm_script_dry_run_plumbing(tmp_path, script, world):
    checkout = tmp_path / "Megatron-LM"
    checkout.mkdir()
    (checkout / "pretrain_gpt.py").write_text("from ordmoe_megatron import megatron_lm as ordmoe_megatron_lm\n")
    python = _stand_in(tmp_path / "python")
    env = {"MEGATRON_LM_PATH": str(checkout), "PYTHON": str(python), "DRY_RUN": "1"}
    proc = _run_script(script, "--log-interval", "1", env=env)
    assert proc.returncode == 0, proc.stderr
    argv = _argv(proc.stdout)
    assert f"WORLD_SIZE={world} RANK=0" in proc.stdout
    assert argv[0] == str(checkout / "pretrain_gpt.py")  # patched checkout: its own script
    assert argv[-1] == "--ordmoe-dry-run" and argv[-3:-1] == ["--log-interval", "1"]
    assert "--ordmoe" in argv and argv[argv.index("--ordmoe-num-tiers") + 1] == "3"
    assert "--bf16" in argv and "--fp8-format" not in argv

    proc = _run_script(script, env={**env, "ORDMOE_ENTRY": "example", "PRECISION": "fp8"})
    argv = _argv(proc.stdout)
    assert argv[0] == EXAMPLE and argv[argv.index("--fp8-format") + 1] == "hybrid"

    (checkout / "pretrain_gpt.py").write_text("# not patched\n")
    proc = _run_script(script, env={**env, "ORDMOE_ENTRY": "patched"})
    assert proc.returncode == 2 and "is not patched" in proc.stderr and "git -C" in proc.stderr
    proc = _run_script(script, env=env)  # unpatched checkout: the example is the default
    assert _argv(proc.stdout)[0] == EXAMPLE


def test_ordmoe_pretrain_script_real_dry_run():
    """The real built-in trainer prints its layout for the script's configuration and exits."""
    if shutil.which("ordmoe-pretrain") is None:
        pytest.skip("ordmoe-pretrain is not on PATH (pip install -e .)")
    proc = _run_script("ordmoe_pretrain_torchrun.sh", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 8 = TP 2 x PP 2 x DP 2" in proc.stdout
    assert "3 tiers (uniform: 1-6, 25-30, 59-64)" in proc.stdout


# ============================================================================================
# always run: megatron_lm pieces (no Megatron-LM needed)
# ============================================================================================
from ordmoe_megatron import megatron_lm  # noqa: E402
from ordmoe_megatron.errors import OrdMoEError  # noqa: E402
from ordmoe_megatron.flags import ordmoe_config_from_args  # noqa: E402
from ordmoe_megatron.megatron_lm import arguments, hooks  # noqa: E402


def _parser():
    parser = argparse.ArgumentParser(prog="pretrain_gpt.py")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--load", default=None)
    return parser


def test_args_provider_adds_the_flags_and_composes(monkeypatch):
    installed = []
    monkeypatch.setattr(hooks, "install", installed.append)

    def existing(parser):
        parser.add_argument("--modelopt-thing", type=int, default=5)
        return parser

    parser = megatron_lm.extra_args_provider(existing, check_now=False)(_parser())
    args = parser.parse_args([])
    assert args.ordmoe is False and args.ordmoe_num_tiers == 3 and args.ordmoe_dry_run is False
    assert args.modelopt_thing == 5 and installed == []  # --no-ordmoe: untouched, nothing installed
    args = parser.parse_args(["--ordmoe", "--ordmoe-num-tiers", "2", "--ordmoe-rewards", "1", "0"])
    assert args.ordmoe_num_tiers == 2 and installed == [args]
    known, rest = parser.parse_known_args(["--no-ordmoe", "--something-else"])
    assert known.ordmoe is False and rest == ["--something-else"]


def test_bad_flag_ends_the_parse_with_a_message_naming_it(capsys):
    parser = megatron_lm.extra_args_provider(check_now=False)(_parser())
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--ordmoe", "--ordmoe-rewards", "0", "0.5", "1"])
    assert exit_info.value.code == 2
    assert (
        "pretrain_gpt.py: error: --ordmoe-rewards [0.0, 0.5, 1.0] must be strictly decreasing"
        in capsys.readouterr().err
    )


def test_rewards_that_are_not_finite_end_the_parse(capsys):
    parser = megatron_lm.extra_args_provider(check_now=False)(_parser())
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--ordmoe", "--ordmoe-rewards", "nan", "0.5", "0"])
    assert exit_info.value.code == 2 and "must be finite numbers" in capsys.readouterr().err


@pytest.mark.parametrize("scope", ["projection", "head"])
def test_a_checkpoint_with_projection_qk_norms_ends_the_parse(tmp_path, capsys, monkeypatch, scope):
    """An imported OLMoE (model_args.json: qk_layernorm_scope='projection') cannot be built by
    pretrain_gpt.py's per-head layer spec: refused by name, after the checkpoint check."""
    checked = []
    monkeypatch.setattr(arguments, "inspect_checkpoint", lambda root, flag: checked.append(root))
    monkeypatch.setattr(hooks, "install", lambda args: None)
    load = tmp_path / "olmoe-mcore"
    (load / "release").mkdir(parents=True)
    (load / "latest_checkpointed_iteration.txt").write_text("release")
    (load / "model_args.json").write_text(json.dumps({"qk_layernorm": True, "qk_layernorm_scope": scope}))
    parser = megatron_lm.extra_args_provider(check_now=False)(_parser())
    if scope == "head":
        assert parser.parse_args(["--ordmoe", "--load", str(load)]).load == str(load)
        return
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--ordmoe", "--load", str(load)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and checked == [str(load)]
    assert f"pretrain_gpt.py: error: --load {load}: its model normalises q and k over the whole projection" in err
    assert "train it with ordmoe-pretrain --load" in err


def test_a_damaged_checkpoint_to_load_ends_the_parse_naming_the_file(tmp_path, capsys):
    """The checkpoint check every front end makes, before Megatron-LM builds anything."""
    load = tmp_path / "ckpt"
    (load / "iter_0000003").mkdir(parents=True)
    (load / "latest_checkpointed_iteration.txt").write_text("3")
    (load / "iter_0000003" / "metadata.json").write_text(
        '{"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch"}'
    )
    parser = megatron_lm.extra_args_provider(check_now=False)(_parser())
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--ordmoe", "--load", str(load)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "common.pt is missing" in err and str(load) in err


def _ordmoe_args(*argv, **extra):
    parser = argparse.ArgumentParser()
    from ordmoe_megatron.flags import add_ordmoe_args

    add_ordmoe_args(parser)
    args = parser.parse_args(list(argv))
    for key, value in extra.items():
        setattr(args, key, value)
    return args


@pytest.mark.parametrize(
    "argv,extra,message",
    [
        (["--ordmoe", "--ordmoe-num-tiers", "0"], {}, "--ordmoe-num-tiers=0 must be an integer >= 1"),
        (["--ordmoe", "--ordmoe-grouping", "explicit"], {}, "--ordmoe-grouping=explicit needs --ordmoe-tier-ranks"),
        (["--ordmoe"], {"use_legacy_models": True}, "--use-legacy-models"),
        (["--ordmoe"], {"overlap_moe_expert_parallel_comm": True}, "--overlap-moe-expert-parallel-comm"),
        (["--ordmoe"], {"yaml_cfg": "model.yaml"}, "--yaml-cfg"),
        (["--ordmoe"], {"sft": True, "sft_tokenizer_prompt_format": "default"}, "--sft-tokenizer-prompt-format"),
        (["--ordmoe", "--ordmoe-lower-path-fraction", "0.5"], {"sft": True}, "--sft with --ordmoe-lower-path"),
        (
            ["--ordmoe", "--ordmoe-path-schedule", "sequential"],
            {"sft": True, "context_parallel_size": 2},
            "--sft with --ordmoe and --context-parallel",
        ),
        (
            ["--ordmoe"],
            {"sft": True, "pipeline_model_parallel_size": 2},
            "--sft with the fused path schedule and --pipe",
        ),
        (["--ordmoe"], {"sft": True, "sequence_parallel": True}, "--sft with the fused path schedule and --sequence-p"),
        (["--ordmoe"], {"sft": True, "mtp_num_layers": 1}, "--sft with the fused path schedule and --mtp-num-layers"),
        (["--ordmoe"], {"dataloader_inter_document_masking": True}, "--dataloader-inter-document-masking packs"),
        (["--ordmoe"], {"tp_comm_overlap": True}, "--tp-comm-overlap sizes"),
        (["--ordmoe"], {"cuda_graph_impl": "local"}, "--cuda-graph-impl / --enable-cuda-graph"),
        (["--ordmoe"], {"enable_cuda_graph": True}, "--cuda-graph-impl / --enable-cuda-graph"),
        (["--ordmoe", "--ordmoe-beta", "nan"], {}, "--ordmoe-beta=nan must be a finite number"),
        pytest.param(
            ["--ordmoe"],
            {"fp8": "hybrid"},
            "--fp8-format hybrid needs Transformer Engine, which is not installed here",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("transformer_engine") is not None, reason="Transformer Engine is installed"
            ),
        ),
    ],
)
def test_validation_errors_name_the_flag(argv, extra, message):
    with pytest.raises(OrdMoEError, match="^" + message.replace("[", r"\[").replace("+", r"\+")):
        megatron_lm.validate_ordmoe_args(_ordmoe_args(*argv, **extra))


@pytest.mark.parametrize("schedule", ["fused", "sequential"])
def test_sft_with_a_masking_prompt_format_is_accepted_with_either_schedule(schedule, monkeypatch):
    monkeypatch.setattr(compat, "sft_flattens_micro_batches", lambda: True)  # core_v0.19's --sft
    args = _ordmoe_args("--ordmoe", "--ordmoe-path-schedule", schedule)
    args.sft, args.sft_tokenizer_prompt_format = True, "nemotron-h-aligned"
    assert megatron_lm.validate_ordmoe_args(args).path_schedule == schedule
    if schedule == "sequential":  # runs each path alone: pipeline parallelism as Megatron runs it
        args.pipeline_model_parallel_size = 2
        assert megatron_lm.validate_ordmoe_args(args).path_schedule == schedule


def test_sft_needs_core_v0_19(monkeypatch):
    args = _ordmoe_args("--ordmoe", "--ordmoe-path-schedule", "sequential")
    args.sft, args.micro_batch_size = True, 4
    monkeypatch.setattr(compat, "sft_flattens_micro_batches", lambda: False)
    with pytest.raises(OrdMoEError, match="^--sft with --ordmoe needs Megatron-LM core_v0.19.0 or later"):
        megatron_lm.validate_ordmoe_args(args)
    monkeypatch.setattr(compat, "sft_flattens_micro_batches", lambda: True)
    assert megatron_lm.validate_ordmoe_args(args) is not None


def test_sft_builds_attention_that_runs_packed_rows(megatron_single_process):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from ordmoe_megatron import OrdMoEConfig
    from ordmoe_megatron.megatron_lm import hooks
    from ordmoe_megatron.runtime.packed_attention import PackedDotProductAttention
    from tests.support import tiny_config

    module = types.SimpleNamespace(GPTModel=None)
    spec = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False, normalization="RMSNorm")
    with hooks.gpt_model_bound_to_ordmoe(module, OrdMoEConfig(num_tiers=3), packed=True):
        model = module.GPTModel(tiny_config(), transformer_layer_spec=spec, vocab_size=64, max_sequence_length=12)
    assert all(
        isinstance(layer.self_attention.core_attention, PackedDotProductAttention) for layer in model.decoder.layers
    )


def test_the_module_checks_the_ordmoe_flags_it_is_given(capsys):
    with pytest.raises(SystemExit) as stop:
        arguments.main(["--ordmoe", "--ordmoe-beta", "nan", "--ordmoe-dry-run"])
    assert stop.value.code == 2 and "--ordmoe-beta=nan must be a finite number" in capsys.readouterr().err
    assert arguments.main(["--ordmoe", "--ordmoe-num-tiers", "2"]) == 0
    assert "OrdMoE flags valid: 2 tiers" in capsys.readouterr().out


def _model_config(**overrides):
    config = dict(
        num_moe_experts=64,
        moe_router_topk=6,
        num_layers=28,
        moe_layer_freq=[0] + [1] * 27,
        moe_expert_capacity_factor=None,
        moe_router_num_groups=None,
        moe_router_group_topk=None,
        moe_router_load_balancing_type="aux_loss",
        moe_enable_routing_replay=False,
        mtp_num_layers=None,
        moe_token_dispatcher_type="alltoall",
        context_parallel_size=1,
    )
    config.update(overrides)
    return types.SimpleNamespace(**config)


@pytest.mark.parametrize(
    "argv,config,message",
    [
        (["--ordmoe", "--ordmoe-num-tiers", "11"], {}, "--ordmoe-num-tiers=11 needs 11x6=66 experts"),
        (["--ordmoe", "--ordmoe-layer-scope", "29-30"], {}, "--ordmoe-layer-scope names layers [29, 30]"),
        (["--ordmoe", "--ordmoe-layer-scope", "1"], {}, "--ordmoe-layer-scope 1 contains no MoE layer"),
        (["--ordmoe"], {"moe_expert_capacity_factor": 1.0}, "--moe-expert-capacity-factor"),
        (["--ordmoe"], {"context_parallel_size": 2}, "--context-parallel-size > 1"),
        (["--ordmoe"], {"num_moe_experts": None}, "--ordmoe needs a MoE model"),
    ],
)
def test_model_level_validation_uses_megatron_lm_config(monkeypatch, argv, config, message):
    """The model checks run on the TransformerConfig Megatron-LM makes (here a stand-in)."""
    monkeypatch.setattr(arguments, "megatron_validated_args", lambda args: args)
    monkeypatch.setattr(arguments, "transformer_config", lambda args: _model_config(**config))
    with pytest.raises(OrdMoEError) as err:
        megatron_lm.validate_ordmoe_args(_ordmoe_args(*argv))
    assert str(err.value).startswith(message)
    assert megatron_lm.validate_ordmoe_args(_ordmoe_args("--no-ordmoe", "--ordmoe-num-tiers", "11")) is None


def test_validation_leaves_megatron_lm_errors_to_megatron_lm(monkeypatch):
    def reject(args):
        raise AssertionError("world size (3) is not divisible by total_model_size")

    monkeypatch.setattr(arguments, "megatron_validated_args", reject)
    assert megatron_lm.validate_ordmoe_args(_ordmoe_args("--ordmoe")).num_tiers == 3
    with pytest.raises(OrdMoEError, match="Megatron-LM rejects these arguments"):
        arguments.validate(_ordmoe_args("--ordmoe"), need_model_config=True)  # a dry run says so


# ---- FLOPs ---------------------------------------------------------------------------------
LAYER_FLOPS = {0: 10.0, 1: 7.0}  # dense, MoE layer (per sample)
OUTPUT_FLOPS = 100.0
MTP_LAYER_FLOPS = 40.0  # a layer, its projection and its own output layer


def _linear_flops(args, batch_size):
    """Stand-in for Megatron-LM's formula: a sum over layers plus the output layer and the MTP
    layers."""
    pattern = args.moe_layer_freq if isinstance(args.moe_layer_freq, list) else [1] * args.num_layers
    assert len(pattern) == args.num_layers
    mtp = MTP_LAYER_FLOPS * (args.mtp_num_layers or 0)
    return batch_size * (sum(LAYER_FLOPS[p] for p in pattern) + OUTPUT_FLOPS + mtp)


def _flops_args(*argv, pp=1, freq=None, recompute=None, micro_batch_size=2, mtp=None):
    return _ordmoe_args(
        *argv,
        num_layers=6,
        moe_layer_freq=freq if freq is not None else [0, 1, 1, 1, 1, 1],
        num_experts=8,
        pipeline_model_parallel_size=pp,
        recompute_granularity=recompute,
        mtp_num_layers=mtp,
        micro_batch_size=micro_batch_size,
    )


def test_flops_count_every_path():
    plain = _linear_flops(_flops_args(), 4)
    # Pipelining fans out at the embedding: every path runs every layer and the output layer.
    assert megatron_lm.ordmoe_num_floating_point_operations(
        _flops_args("--ordmoe", pp=2), 4, _linear_flops
    ) == pytest.approx(3 * plain)
    assert megatron_lm.ordmoe_num_floating_point_operations(
        _flops_args("--ordmoe", "--ordmoe-num-tiers", "4", recompute="full"), 4, _linear_flops
    ) == pytest.approx(4 * plain)
    assert megatron_lm.ordmoe_num_floating_point_operations(
        _flops_args("--ordmoe", "--no-ordmoe-lazy-fanout"), 4, _linear_flops
    ) == pytest.approx(3 * plain)
    # Lower paths on half of each micro-batch's sequences: one plain step plus two half paths.
    assert megatron_lm.ordmoe_num_floating_point_operations(
        _flops_args("--ordmoe", "--ordmoe-lower-path-fraction", "0.5", pp=2, micro_batch_size=4), 4, _linear_flops
    ) == pytest.approx(2 * plain)
    # The path schedule runs the same paths: the same count.
    assert megatron_lm.ordmoe_num_floating_point_operations(
        _flops_args("--ordmoe", "--ordmoe-path-schedule", "sequential", pp=2), 4, _linear_flops
    ) == pytest.approx(3 * plain)
    # --no-ordmoe and one tier: Megatron-LM's count unchanged.
    assert megatron_lm.ordmoe_num_floating_point_operations(_flops_args(), 4, _linear_flops) == plain
    assert (
        megatron_lm.ordmoe_num_floating_point_operations(
            _flops_args("--ordmoe", "--ordmoe-num-tiers", "1"), 4, _linear_flops
        )
        == plain
    )


def test_flops_subtract_the_layers_run_once():
    # Lazy fan-out: layer 1 is dense, so it runs once; with scope 4-6 layers 1-3 run once.
    plain = _linear_flops(_flops_args(), 2)
    assert megatron_lm.ordmoe_num_floating_point_operations(_flops_args("--ordmoe"), 2, _linear_flops) == pytest.approx(
        3 * plain - 2 * 2 * LAYER_FLOPS[0]
    )
    scoped = _flops_args("--ordmoe", "--ordmoe-layer-scope", "4-6")
    assert megatron_lm.shared_prefix_layers(scoped, ordmoe_config_from_args(scoped)) == 3
    expected = 3 * plain - 2 * 2 * (LAYER_FLOPS[0] + 2 * LAYER_FLOPS[1])
    assert megatron_lm.ordmoe_num_floating_point_operations(scoped, 2, _linear_flops) == pytest.approx(expected)
    assert megatron_lm.flops_factor(scoped, ordmoe_config_from_args(scoped), _linear_flops) == pytest.approx(
        expected / plain
    )


def test_vlm_arguments_count_the_language_models_layers():
    # pretrain_vlm.py: --num-layers is the vision encoder's depth (1), the language model has
    # --decoder-num-layers (6, all MoE). The layer scope, the shared prefix and the FLOPs factor are
    # the language model's; the count scales Megatron-LM's own.
    args = _flops_args("--ordmoe", "--ordmoe-layer-scope", "4-6", freq=1)
    args.num_layers, args.decoder_num_layers, args.ordmoe_vlm = 1, 6, True
    language = megatron_lm.hooks.language_model_args(args)
    assert (language.num_layers, args.num_layers) == (6, 1)
    assert megatron_lm.shared_prefix_layers(args, ordmoe_config_from_args(args)) == 3
    language_plain = 2 * (6 * LAYER_FLOPS[1] + OUTPUT_FLOPS)
    language_ordmoe = 3 * language_plain - 2 * 2 * 3 * LAYER_FLOPS[1]
    factor = language_ordmoe / language_plain
    assert megatron_lm.flops_factor(args, ordmoe_config_from_args(args), _linear_flops) == pytest.approx(factor)
    megatron_count = _linear_flops(args, 2)
    assert megatron_lm.ordmoe_num_floating_point_operations(args, 2, _linear_flops) == pytest.approx(
        factor * megatron_count
    )
    # pretrain_gpt.py's arguments (no ordmoe_vlm mark) are the language model's as they are.
    args.ordmoe_vlm = False
    assert megatron_lm.hooks.language_model_args(args) is args


def test_flops_count_mtp_on_path_1_only():
    # The MTP block runs on path 1 only: the lower paths cost the plain step without it.
    args = _flops_args("--ordmoe", "--no-ordmoe-lazy-fanout", mtp=1)
    plain = _linear_flops(_flops_args(mtp=1), 2)
    expected = plain + 2 * (plain - 2 * MTP_LAYER_FLOPS)
    assert megatron_lm.ordmoe_num_floating_point_operations(args, 2, _linear_flops) == pytest.approx(expected)
    assert megatron_lm.flops_factor(args, ordmoe_config_from_args(args), _linear_flops) == pytest.approx(
        expected / plain
    )
    # With the lazy fan-out as well (layer 1 is dense and runs once).
    lazy = _flops_args("--ordmoe", mtp=1)
    assert megatron_lm.ordmoe_num_floating_point_operations(lazy, 2, _linear_flops) == pytest.approx(
        expected - 2 * 2 * LAYER_FLOPS[0]
    )


# ---- install / uninstall and the forward-backward hook -------------------------------------
@pytest.fixture
def fake_training(monkeypatch):
    """Stand-ins for megatron.training and megatron.training.training (Megatron-LM's, absent here)."""
    package = types.ModuleType("megatron.training")
    training = types.ModuleType("megatron.training.training")
    global_vars = types.ModuleType("megatron.training.global_vars")
    training.get_forward_backward_func = lambda: "megatron's forward_backward"
    training.num_floating_point_operations = _linear_flops
    package.training, package.global_vars = training, global_vars
    for name, module in (
        ("megatron.training", package),
        ("megatron.training.training", training),
        ("megatron.training.global_vars", global_vars),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    # ``import megatron.training.training`` reads the parent package's attribute first: where a real
    # megatron.training was imported earlier (the megatron-core 0.19 wheel ships one), replace it too.
    import megatron

    monkeypatch.setattr(megatron, "training", package, raising=False)
    yield training, global_vars
    megatron_lm.uninstall()


def test_install_needs_ordmoe_and_uninstall_restores(fake_training):
    training, global_vars = fake_training
    originals = (training.get_forward_backward_func, training.num_floating_point_operations)
    assert megatron_lm.install(_ordmoe_args("--no-ordmoe")) is False
    assert (training.get_forward_backward_func, training.num_floating_point_operations) == originals
    args = _flops_args("--ordmoe", pp=2)
    assert megatron_lm.install(args) and megatron_lm.install(args)  # idempotent
    assert training.num_floating_point_operations(args, 4) == pytest.approx(3 * _linear_flops(args, 4))
    global_vars.get_args = lambda: _flops_args("--ordmoe", "--ordmoe-num-tiers", "1")
    assert training.get_forward_backward_func() == "megatron's forward_backward"  # one tier: Megatron's own
    megatron_lm.uninstall()
    assert (training.get_forward_backward_func, training.num_floating_point_operations) == originals
    assert not megatron_lm.is_installed()


def test_reports_show_path_nll_for_megatron_lm_log():
    import torch

    reports = [
        {
            "lm loss": torch.tensor([6.0, 2.0]),
            "rank loss": torch.tensor([-0.5, 2.0]),
            "path1 logprob": torch.tensor([-6.0, 2.0]),
            "path2 logprob": torch.tensor([-7.0, 2.0]),
        }
    ]
    out = hooks._loggable(reports)[0]
    assert list(out) == ["lm loss", "rank loss", "-rank loss", "path1 nll", "path2 nll"]
    assert out["path2 nll"].tolist() == [7.0, 2.0] and out["rank loss"].tolist() == [-0.5, 2.0]
    assert out["-rank loss"].tolist() == [0.5, 2.0]  # what Megatron-LM's training line shows
    evaluation = hooks._loggable(reports, training=False)[0]
    assert list(evaluation) == ["lm loss", "rank loss", "path1 nll", "path2 nll"]  # signs printed there


# ---- the model builder --------------------------------------------------------------------
def test_builder_builds_ordmoe_model_with_megatron_lms_spec(megatron_single_process, monkeypatch):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from ordmoe_megatron.mcore.model import OrdMoEGPTModel
    from ordmoe_megatron.mcore.router import TierRouter

    builders = types.ModuleType("fake_gpt_builders")  # like Megatron-LM's gpt_builders module
    builders.GPTModel = GPTModel

    def gpt_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
        config = TransformerConfig(
            num_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_moe_experts=8,
            moe_router_topk=2,
            moe_ffn_hidden_size=32,
            use_cpu_initialization=True,
        )
        return builders.GPTModel(
            config=config,
            transformer_layer_spec=get_gpt_layer_local_spec(num_experts=8),
            vocab_size=128,
            max_sequence_length=16,
            pre_process=pre_process,
            post_process=post_process,
        )

    gpt_builder.__module__ = builders.__name__
    monkeypatch.setitem(sys.modules, builders.__name__, builders)
    build = megatron_lm.ordmoe_builder(gpt_builder)
    plain = build(_ordmoe_args("--no-ordmoe"), True, True)
    assert type(plain) is GPTModel
    model = build(
        _ordmoe_args("--ordmoe", "--ordmoe-num-tiers", "2", "--ordmoe-rewards", "1", "0"),
        True,
        True,
        None,
        config=None,
        pg_collection=None,
    )
    assert isinstance(model, OrdMoEGPTModel) and model.num_paths == 2
    assert len(model.tier_routers()) == 2 and all(isinstance(r, TierRouter) for r in model.tier_routers())
    assert builders.GPTModel is GPTModel  # the name is restored
    assert sorted(model.state_dict()) == sorted(plain.state_dict())  # no new parameters

    def legacy_builder(args, *rest, **kwargs):
        return plain

    legacy_builder.__module__ = builders.__name__
    with pytest.raises(OrdMoEError, match="not a GPTModel built through"):
        megatron_lm.ordmoe_builder(legacy_builder)(_ordmoe_args("--ordmoe"), True, True)
    assert builders.GPTModel is GPTModel


def test_cpu_launcher_environment_and_command(tmp_path, monkeypatch):
    """The installed CPU launcher: torchrun --standalone on this module, the checkout first on
    PYTHONPATH, the pyenv version pinned to this interpreter, no CUDA device, and the CPU flags
    added only where the command line does not set them."""
    import platform

    checkout = tmp_path / "Megatron-LM"
    (checkout / "megatron" / "training").mkdir(parents=True)
    (checkout / "megatron" / "training" / "__init__.py").write_text("")
    (checkout / "pretrain_gpt.py").write_text("")
    monkeypatch.delenv("MEGATRON_LM_PATH", raising=False)
    assert cpu_launch.megatron_lm_checkout(str(checkout / "pretrain_gpt.py"), None) == str(checkout)
    with pytest.raises(SystemExit, match="is not a Megatron-LM checkout .*pass --megatron-lm DIR"):
        cpu_launch.megatron_lm_checkout(str(tmp_path / "pretrain_gpt.py"), None)

    env = cpu_launch.launch_env(str(checkout), {"PYTHONPATH": "/mine", "PATH": "/bin"})
    first = [cpu_launch.python311.DIRECTORY] if sys.version_info < (3, 12) else []
    assert env["PYTHONPATH"] == os.pathsep.join([*first, str(checkout), "/mine"])
    assert env["PYENV_VERSION"] == platform.python_version() and env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    assert env[cpu_launch.RANK_MODE] == "1"

    cmd = cpu_launch.launch_command("pretrain_gpt.py", ["--transformer-impl=local", "--lr", "1e-3"], 2)
    assert cmd[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    assert cmd[7:9] == ["ordmoe_megatron.megatron_lm.cpu_launch", os.path.abspath("pretrain_gpt.py")]
    argv = cmd[9:]
    assert argv[:3] == ["--transformer-impl=local", "--lr", "1e-3"]  # the user's first, kept
    assert "--transformer-impl" not in argv and argv[argv.index("--distributed-backend") + 1] == "gloo"
    assert {"--no-rope-fusion", "--no-gradient-accumulation-fusion", "--use-cpu-initialization"} <= set(argv)


# ============================================================================================
# MEGATRON_LM_PATH: the patch, the patched script and the example, on CPU
# ============================================================================================
# A model a Hugging Face family (Mixtral) expresses, so the trained checkpoint converts.
SMALL = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 128 --num-experts 8 "
    "--moe-router-topk 2 --moe-ffn-hidden-size 64 --seq-length 64 --max-position-embeddings 64 "
    "--position-embedding-type rope --normalization RMSNorm --swiglu --untie-embeddings-and-output-weights "
    "--micro-batch-size 2 --global-batch-size 4 --train-iters 2 --lr 1e-3 --log-interval 1 "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 256 --disable-bias-linear "
    "--moe-token-dispatcher-type alltoall --moe-aux-loss-coeff 1e-2 --eval-iters 1 --eval-interval 1000 "
    "--hidden-dropout 0 --attention-dropout 0"
).split()
CPU = cpu_launch.with_cpu_flags([])  # what the launcher adds; given here to scripts run without it
# The clean checkout the tests make of MEGATRON_LM_PATH (fixture megatron_lm_ready).
CHECKOUT = {}


def _megatron_env(**extra):
    from ordmoe_megatron.runtime.distributed import find_free_port
    from tests.support import cpu_env

    env = cpu_env()  # on the CPU by design, on a GPU machine too
    python311 = cpu_launch.python311.DIRECTORY if sys.version_info < (3, 12) else None
    checkout = CHECKOUT.get("path", MEGATRON_LM_PATH)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (python311, checkout, ROOT, env.get("PYTHONPATH")) if p)
    env["MEGATRON_LM_PATH"] = checkout or ""  # the launch scripts read it
    # The dataset helpers are built with `make`, which calls python3 and python3-config: this
    # interpreter, not the 3.12 that the checkout's .python-version makes pyenv pick.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYENV_VERSION"] = platform.python_version()
    env.update(
        PYTHONWARNINGS="ignore",
        CUDA_DEVICE_MAX_CONNECTIONS="1",
        WORLD_SIZE="1",
        RANK="0",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(find_free_port()),
    )
    env.update(extra)
    return env


def _run(argv, cwd, timeout=300, **env):
    return subprocess.run(argv, cwd=cwd, env=_megatron_env(**env), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def megatron_lm_ready(tmp_path_factory):
    """A clean clone of the checkout MEGATRON_LM_PATH names, at its commit: the tests patch and
    run their own copy, so a checkout the user patched (docs/megatron_lm.md, step 1) works too.
    Dataset helpers already built there are copied in (Megatron-LM builds them at start-up)."""
    if not MEGATRON_LM_PATH:
        pytest.skip("MEGATRON_LM_PATH not set")
    import glob
    import importlib.util

    if not os.path.isfile(os.path.join(MEGATRON_LM_PATH, "pretrain_gpt.py")):
        pytest.fail(f"MEGATRON_LM_PATH={MEGATRON_LM_PATH} has no pretrain_gpt.py")
    clean = str(tmp_path_factory.mktemp("megatron-lm") / "Megatron-LM")
    proc = subprocess.run(["git", "clone", "-q", "--shared", MEGATRON_LM_PATH, clean], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"MEGATRON_LM_PATH={MEGATRON_LM_PATH} must be a git checkout of Megatron-LM: {proc.stderr}")
    for built in glob.glob(os.path.join(MEGATRON_LM_PATH, "megatron", "core", "datasets", "helpers_cpp*.so")):
        shutil.copy(built, os.path.join(clean, "megatron", "core", "datasets"))
    CHECKOUT["path"] = clean
    for package, why in (
        ("triton", "megatron.training imports it"),
        ("six", "core_v0.16's megatron.training imports it"),
    ):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{why}: pip install -e '.[megatron-lm]' (triton, pybind11, six; none pulls torch)")
    yield clean
    CHECKOUT.clear()


@pytest.fixture(scope="module")
def patched(megatron_lm_ready, tmp_path_factory):
    """A patched copy of pretrain_gpt.py; it imports the rest from the clean checkout."""
    where = tmp_path_factory.mktemp("patched")
    shutil.copy(os.path.join(megatron_lm_ready, "pretrain_gpt.py"), where / "pretrain_gpt.py")
    proc = subprocess.run(["git", "apply", patch_for(megatron_lm_ready)], cwd=where, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return str(where / "pretrain_gpt.py")


@pytest.fixture(scope="module")
def can_train(megatron_lm_ready):
    import glob

    built = glob.glob(os.path.join(megatron_lm_ready, "megatron", "core", "datasets", "helpers_cpp*.so"))
    probe = subprocess.run([sys.executable, "-m", "pybind11", "--includes"], capture_output=True, env=_megatron_env())
    if not built and (probe.returncode != 0 or shutil.which("make") is None):
        pytest.skip(
            "Megatron-LM compiles its dataset helpers at start-up: needs pybind11 (pip install pybind11), "
            "make and a C++ compiler"
        )


@needs_megatron_lm
def test_patch_applies_to_a_clean_checkout(megatron_lm_ready):
    patch = patch_for(megatron_lm_ready)
    proc = subprocess.run(
        ["git", "apply", "--check", "--verbose", patch], cwd=megatron_lm_ready, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    touched = [line.split()[-1] for line in open(patch) if line.startswith("+++ ")]
    assert touched == ["b/pretrain_gpt.py"]


@needs_megatron_lm
def test_patched_help_is_the_unpatched_help(patched, tmp_path):
    """Without --ordmoe the patch changes nothing, --help included. (core_v0.19.0's own --help
    fails: one of its help strings has a bare '%', which argparse rejects; patched or not.)"""
    unpatched = _run([sys.executable, os.path.join(CHECKOUT["path"], "pretrain_gpt.py"), "--help"], cwd=tmp_path)
    proc = _run([sys.executable, patched, "--help"], cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (unpatched.returncode, unpatched.stdout), proc.stderr[-3000:]
    if proc.returncode == 0:
        assert "--micro-batch-size" in proc.stdout and "--tensor-model-parallel-size" in proc.stdout
    else:
        assert "unsupported format character" in unpatched.stderr, unpatched.stderr[-3000:]


@needs_megatron_lm
@pytest.mark.parametrize(
    "bad,message",
    [
        (
            ["--ordmoe-num-tiers", "5"],
            "pretrain_gpt.py: error: --ordmoe-num-tiers=5 needs 5x2=10 experts but the layer has 8",
        ),
        (
            ["--moe-expert-capacity-factor", "1.0"],
            "pretrain_gpt.py: error: --moe-expert-capacity-factor (token dropping)",
        ),
        (["--ordmoe-beta", "nan", "--ordmoe-dry-run"], "pretrain_gpt.py: error: --ordmoe-beta=nan must be a finite"),
        pytest.param(
            ["--bf16", "--fp8-format", "hybrid", "--ordmoe-dry-run"],
            "pretrain_gpt.py: error: --fp8-format hybrid needs Transformer Engine",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("transformer_engine") is not None, reason="Transformer Engine is installed"
            ),
        ),
    ],
)
def test_patched_ordmoe_with_a_bad_flag_fails_clearly(patched, tmp_path, bad, message):
    proc = _run([sys.executable, patched, *SMALL, *CPU, "--ordmoe", *bad], cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@needs_megatron_lm
def test_patched_dry_run_prints_layouts_and_builds_nothing(patched, tmp_path):
    proc = _run(
        [
            sys.executable,
            patched,
            *SMALL,
            *CPU,
            "--tensor-model-parallel-size",
            "2",
            "--sequence-parallel",
            "--expert-model-parallel-size",
            "2",
            "--ordmoe",
            "--ordmoe-dry-run",
        ],
        cwd=tmp_path,
        WORLD_SIZE="4",
        CUDA_DEVICE_MAX_CONNECTIONS="1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "world size 4 = TP 2 x PP 1 x CP 1 x DP 2" in out
    assert "EP 2 x expert TP 2" in out
    assert (
        "tiers (routing ranks): 1-2, 3-4, 7-8" in out and "activations between pipeline stages: [32, 3 x 2, 64]" in out
    )
    assert "building GPT model" not in out and "initializing torch distributed" not in out


@needs_megatron_lm
@pytest.mark.parametrize(
    "script,precision,expect",
    [
        ("megatron_lm_torchrun.sh", "bf16", ["world size 8 = TP 2 x PP 2 x CP 1 x DP 2", "precision bfloat16"]),
        ("megatron_lm_slurm.sh", "fp8", ["world size 32 = TP 2 x PP 4 x CP 1 x DP 4", "precision fp8 hybrid"]),
    ],
)
def test_megatron_lm_script_dry_run(megatron_lm_ready, script, precision, expect):
    proc = subprocess.run(
        ["bash", os.path.join(EXAMPLES, script), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_megatron_env(PRECISION=precision, PYTHON=sys.executable),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in expect + ["tiers (routing ranks): 1-6, 25-30, 59-64", "experts: EP", "tier-routed MoE layers: 2-28"]:
        assert line in proc.stdout, proc.stdout


FLOPS_CHECK = """
import copy, sys
from megatron.training.arguments import parse_args
from megatron.training.training import num_floating_point_operations as base
from ordmoe_megatron import megatron_lm as m
from ordmoe_megatron.flags import ordmoe_config_from_args
from ordmoe_megatron.megatron_lm import hooks
args = m.megatron_validated_args(parse_args(m.extra_args_provider(check_now=False)))
args.padded_vocab_size = 512
plain = base(copy.copy(args), 8)
per_layer = [hooks._layer_flops(base, args, 8, [i]) for i in range(args.num_layers)]
all_layers = hooks._layer_flops(base, args, 8, list(range(args.num_layers)))
shared = m.shared_prefix_layers(args, ordmoe_config_from_args(args))
print(shared, plain, sum(per_layer), all_layers, m.ordmoe_num_floating_point_operations(args, 8, base),
      sum(per_layer[:shared]))
"""


@needs_megatron_lm
@pytest.mark.parametrize("layout,shared", [([], 3), (["--pipeline-model-parallel-size", "2"], 0)])
def test_flops_with_megatron_lms_formula(megatron_lm_ready, tmp_path, layout, shared):
    """Megatron-LM's formula is a sum over layers plus the output layer (what the accounting of
    layers run once relies on); the count is C x Megatron's less the shared layers' C-1 copies."""
    argv = [
        *SMALL,
        *CPU,
        "--num-layers",
        "6",
        "--moe-layer-freq",
        "([0]+[1]*5)",
        *layout,
        "--ordmoe",
        "--ordmoe-layer-scope",
        "4-6",
    ]
    proc = _run(
        [sys.executable, "-c", "import sys; sys.argv[1:] = sys.argv[2:]\n" + FLOPS_CHECK, "--", *argv],
        cwd=tmp_path,
        WORLD_SIZE="2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got_shared, plain, per_layer_sum, all_layers, ordmoe, shared_flops = proc.stdout.split()[-6:]
    assert int(got_shared) == shared
    assert float(per_layer_sum) == pytest.approx(float(all_layers), rel=1e-12)
    assert float(ordmoe) == pytest.approx(3 * float(plain) - 2 * float(shared_flops), rel=1e-12)
    assert (float(shared_flops) > 0) == (shared > 0)


def _losses(stdout):
    """{iteration: {metric: value}} from Megatron-LM's training log lines."""
    import re

    out = {}
    for line in stdout.splitlines():
        match = re.search(r"\] iteration\s+(\d+)/\s*\d+ \|", line)
        if not match:
            continue
        fields = [f.strip() for f in line.split("|")]
        it = int(match.group(1))
        out[it] = {k.strip(): float(v) for k, v in (f.split(":", 1) for f in fields[1:] if ":" in f) if _is_float(v)}
    return out


def _without_timing(losses):
    return {it: {k: v for k, v in m.items() if "time" not in k and "throughput" not in k} for it, m in losses.items()}


def _is_float(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def _train(script, cwd, *extra, nproc=1):
    """The installed CPU launcher (``megatron_lm.cpu_launch``: torchrun --standalone, the CPU flags)."""
    launcher = [sys.executable, "-m", "ordmoe_megatron.megatron_lm.cpu_launch", "--nproc-per-node", str(nproc)]
    proc = _run([*launcher, "--megatron-lm", CHECKOUT["path"], script, *SMALL, *extra], cwd=cwd, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return _losses(proc.stdout), proc.stdout


@needs_megatron_lm
def test_cpu_training_plain_patched_equals_unpatched_and_ordmoe_adds_paths(patched, can_train, tmp_path):
    """Also docs/megatron_lm.md's CPU block: the metrics on every training line, rank loss with
    either sign, and the saved checkpoint converts to Hugging Face with one command."""
    original, _ = _train(os.path.join(CHECKOUT["path"], "pretrain_gpt.py"), tmp_path)
    plain, _ = _train(patched, tmp_path)
    assert sorted(plain) == [1, 2]
    assert _without_timing(plain) == _without_timing(original)  # --no-ordmoe: nothing changes
    save = ["--save", str(tmp_path / "ckpt"), "--save-interval", "2"]
    ordmoe, stdout = _train(patched, tmp_path, "--ordmoe", "--ordmoe-num-tiers", "3", *save)
    # Path 1 is the plain model: before any update (iteration 1) the LM and balancing losses agree.
    assert ordmoe[1]["lm loss"] == pytest.approx(plain[1]["lm loss"], rel=1e-6)
    assert ordmoe[1]["load_balancing_loss"] == pytest.approx(plain[1]["load_balancing_loss"], rel=1e-6)
    for it in (1, 2):
        assert {"path1 nll", "path2 nll", "path3 nll"} <= ordmoe[it].keys()
        assert ordmoe[it]["path1 nll"] == pytest.approx(ordmoe[it]["lm loss"], rel=1e-5)
        assert {"load_balancing_loss", "path1 nll"} <= ordmoe[it].keys()
        assert len({"rank loss", "-rank loss"} & ordmoe[it].keys()) == 1  # the one that is positive
    assert any("tier order acc" in ordmoe[it] for it in (1, 2))  # a zero average is not printed
    assert "rank loss value" in stdout and "tier order acc value" in stdout  # evaluation lines

    hf = tmp_path / "hf"
    proc = subprocess.run(
        [sys.executable, "-m", "ordmoe_megatron.convert", "mcore-to-hf", "--mcore-dir", str(tmp_path / "ckpt")]
        + ["--out", str(hf)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_megatron_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    config = json.load(open(hf / "config.json"))
    expect = dict(hidden_size=64, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2)
    expect.update(intermediate_size=64, vocab_size=384, tie_word_embeddings=False, model_type="mixtral")
    assert {k: config[k] for k in expect} == expect  # the flags of common.pt's args


def _sft_data(where):
    """A character-level Hugging Face tokenizer with the special tokens the nemotron-h-aligned
    template uses, and 16 two-turn chats (system, user, assistant) of additions."""
    import json
    import random

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_233>"]
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .:\n"
    chars = ["<eos>", "<unk>", *specials, *sorted(set(letters))]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(specials)
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(where / "tok")
    rng = random.Random(0)
    with open(where / "chats.jsonl", "w") as f:
        for _ in range(16):
            messages = []
            for _ in range(2):
                a, b = rng.randint(1, 999), rng.randint(1, 99)
                messages += [
                    {"role": "system", "content": "Sum."},
                    {"role": "user", "content": f"add {a} {b}"},
                    {"role": "assistant", "content": str(a + b)},
                ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return where / "tok", where / "chats.jsonl"


@needs_megatron_lm
def test_cpu_sft_training_with_ordmoe_path_one_is_plain_sft(patched, can_train, tmp_path):
    """pretrain_gpt.py --sft (SFTDataset, SFTTokenizer, each micro-batch packed into one THD row)
    with --ordmoe at either tag: the packed rows reach the local attention through the plugin's
    packed spec (core_v0.19 builds through OrdMoEGPTModelConfig), every path is logged, before any
    update path 1's answer loss and the balancing loss equal a one-tier run's, with either path
    schedule, and the fused schedule trains as the sequential one does (two samples per packed row:
    core_v0.19's MoE layers see them un-flattened, ``tokens_per_sample``). (Plain --sft cannot be
    the reference here: Megatron-LM's local attention refuses packed rows; it needs Transformer
    Engine's.)"""
    tokenizer, chats = _sft_data(tmp_path)
    small = list(SMALL)  # without the mock data, its tokenizer and evaluation
    small.remove("--mock-data")
    for flag in ("--tokenizer-type", "--vocab-size", "--eval-iters", "--seq-length", "--max-position-embeddings"):
        del small[small.index(flag) : small.index(flag) + 2]
    sft = ["--seq-length", "128", "--max-position-embeddings", "128", "--eval-iters", "0", "--split", "100,0,0"]
    sft += ["--sft", "--sft-tokenizer-prompt-format", "nemotron-h-aligned", "--tokenizer-type", "SFTTokenizer"]
    sft += ["--tokenizer-model", str(tokenizer), "--data-path", str(chats), "--no-create-attention-mask-in-dataloader"]
    launcher = [sys.executable, "-m", "ordmoe_megatron.megatron_lm.cpu_launch", "--nproc-per-node", "1"]
    if not compat.sft_flattens_micro_batches():  # core_v0.16: refused before anything is built
        argv = [*launcher, "--megatron-lm", CHECKOUT["path"], patched, *small, *sft, "--ordmoe", "--legacy-tokenizer"]
        proc = _run(argv, cwd=tmp_path, timeout=400)
        assert proc.returncode != 0
        assert "--sft with --ordmoe needs Megatron-LM core_v0.19.0 or later" in proc.stdout + proc.stderr
        assert " iteration " not in proc.stdout
        return
    runs = {}
    three = (("one tier", "1", "fused"), ("fused", "3", "fused"), ("sequential", "3", "sequential"))
    for name, tiers, schedule in three:
        extra = ["--ordmoe", "--ordmoe-num-tiers", tiers, "--ordmoe-path-schedule", schedule]
        argv = [*launcher, "--megatron-lm", CHECKOUT["path"], patched, *small, *sft, *extra]
        proc = _run(argv, cwd=tmp_path, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        runs[name] = _losses(proc.stdout)
    plain = runs["one tier"]
    for ordmoe in (runs["fused"], runs["sequential"]):
        assert sorted(plain) == sorted(ordmoe) == [1, 2]
        assert ordmoe[1]["lm loss"] == pytest.approx(plain[1]["lm loss"], rel=1e-6)
        assert ordmoe[1]["load_balancing_loss"] == pytest.approx(plain[1]["load_balancing_loss"], rel=1e-6)
        for it in (1, 2):
            assert {"path1 nll", "path2 nll", "path3 nll"} <= ordmoe[it].keys()
            assert len({"rank loss", "-rank loss"} & ordmoe[it].keys()) == 1
    for it in (1, 2):
        for key in ("lm loss", "path1 nll", "path2 nll", "path3 nll", "load_balancing_loss", "grad norm"):
            assert runs["fused"][it][key] == pytest.approx(runs["sequential"][it][key], rel=1e-5), (it, key)


@needs_megatron_lm
def test_cpu_training_example_with_pipeline_parallelism(can_train, tmp_path):
    """The unpatched route (examples/pretrain_gpt_ordmoe.py), two pipeline stages under torchrun:
    activations of all three paths cross the stage boundary."""
    losses, _ = _train(EXAMPLE, tmp_path, "--pipeline-model-parallel-size", "2", "--ordmoe", nproc=2)
    assert sorted(losses) == [1, 2]
    assert {"lm loss", "path3 nll", "load_balancing_loss"} <= losses[2].keys()


@needs_megatron_lm
def test_cpu_training_sequential_paths_equal_fused_under_pipeline_parallelism(can_train, tmp_path):
    """Megatron-LM's own training loop with the sequential schedule and sub-sampled lower paths on
    two pipeline stages: every path its own micro-batch (its loss reports reduced by Megatron-LM),
    fewer rows between the stages for the lower paths, the fused run's losses."""
    flags = ["--pipeline-model-parallel-size", "2", "--ordmoe", "--ordmoe-lower-path-fraction", "0.5"]
    fused, _ = _train(EXAMPLE, tmp_path, *flags, nproc=2)
    sequential, _ = _train(EXAMPLE, tmp_path, *flags, "--ordmoe-path-schedule", "sequential", nproc=2)
    assert sorted(sequential) == [1, 2]
    for it in (1, 2):
        for key in ("lm loss", "path1 nll", "path2 nll", "path3 nll", "load_balancing_loss", "grad norm"):
            assert sequential[it][key] == pytest.approx(fused[it][key], rel=1e-5), (it, key)


# DeepSeek-V3 / Ling-2.0 style: group-limited sigmoid routing with the expert bias and a scaling
# factor, a shared expert, one MTP layer (on the last pipeline stage).
DEEPSEEK_FLAGS = (
    "--num-experts 16 --moe-router-num-groups 4 --moe-router-group-topk 2 --moe-router-score-function sigmoid "
    "--moe-router-enable-expert-bias --moe-router-topk-scaling-factor 2.5 --moe-shared-expert-intermediate-size 64 "
    "--mtp-num-layers 1 --mtp-loss-scaling-factor 0.3"
).split()


@needs_megatron_lm
@pytest.mark.one_version
def test_cpu_training_deepseek_style_with_mtp_on_the_last_pipeline_stage(can_train, tmp_path):
    """Megatron-LM's own loop accepts group-limited routing, the expert bias, a shared expert and
    MTP with --ordmoe; on two pipeline stages (MTP on the last) the sequential schedule gives the
    fused run's losses, MTP's among them (path 1's alone)."""
    flags = ["--pipeline-model-parallel-size", "2", *DEEPSEEK_FLAGS, "--ordmoe"]
    fused, _ = _train(EXAMPLE, tmp_path, *flags, nproc=2)
    sequential, _ = _train(EXAMPLE, tmp_path, *flags, "--ordmoe-path-schedule", "sequential", nproc=2)
    assert sorted(sequential) == [1, 2]
    for it in (1, 2):
        assert "mtp_1 loss" in fused[it]
        for key in ("lm loss", "path1 nll", "path3 nll", "mtp_1 loss", "grad norm"):
            assert sequential[it][key] == pytest.approx(fused[it][key], rel=1e-5), (it, key)
