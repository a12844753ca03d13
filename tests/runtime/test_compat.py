"""What differs between the supported megatron-core versions, each against the installed one."""

import functools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from ordmoe_megatron import OrdMoEConfig
from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.mcore.router import TierRouter
from ordmoe_megatron.mcore.specs import ordmoe_layer_spec
from ordmoe_megatron.method import ranking_scores, tier_gating
from ordmoe_megatron.runtime import compat
from tests.support import cpu_env

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_megatron_core_is_supported():
    low, high = compat.SUPPORTED
    assert low <= compat.VERSION < high
    compat.check_supported()


@pytest.mark.parametrize(
    "version, parsed",
    [("0.16.1", (0, 16, 1)), ("0.19.2+0f2a709", (0, 19, 2)), ("0.17.0rc0", (0, 17, 0)), ("0.18", (0, 18, 0))],
)
def test_versions_are_read_without_a_git_suffix_or_a_pre_release_tag(version, parsed):
    """A venv inside a git checkout makes megatron-core report "0.19.2+<hash>" (seen in CI)."""
    assert compat._parse(version) == parsed


def test_a_megatron_core_outside_the_range_is_refused(monkeypatch):
    low, high = compat.SUPPORTED
    for outside in (high, (low[0], low[1], low[2] - 1) if low[2] else (low[0], low[1] - 1, 99)):
        monkeypatch.setattr(compat, "VERSION", outside)
        with pytest.raises(
            OrdMoEError, match=f"outside the range ordmoe-megatron supports .{compat.supported_range()}"
        ):
            compat.check_supported()
    assert compat.supported_range() == f"{'.'.join(map(str, low))} up to {high[0]}.{high[1] - 1}.x"


def test_the_supported_range_is_stated_once_and_everything_derives_from_it(tmp_path):
    """compat.SUPPORTED owns the range: setup.py's install_requires is made from it, the README's
    sentence says it, and no other file (package, tests, docs, examples, tools, CI) spells it out."""
    low, high = compat.SUPPORTED
    first, below = ".".join(map(str, low)), f"{high[0]}.{high[1]}"
    subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (requires,) = tmp_path.glob("*.egg-info/requires.txt")
    (megatron_core,) = [r for r in requires.read_text().splitlines() if r.startswith("megatron-core")]
    assert set(megatron_core.removeprefix("megatron-core").split(",")) == {f">={first}", f"<{below}"}
    readme = (ROOT / "README.md").read_text()
    sentence = (
        f"megatron-core {compat.supported_range()}, and Megatron-LM at the matching tags "
        f"({compat.supported_megatron_lm_tags()})"
    )
    assert sentence in readme.replace("\n", " ")
    last = f"{high[0]}.{high[1] - 1}"
    spellings = (
        f"{first} up to",
        f"{first} to {last}",
        f"{first}-{last}",
        f"{first} through",
        f"core_v{first} to",
        f"<{below}",
        f">={first}",
        f">= {first}",
    )
    owners = {ROOT / "README.md", ROOT / "ordmoe_megatron" / "runtime" / "compat.py"}
    restated = [
        f"{path.relative_to(ROOT)}: {spelling}"
        for where in (
            "ordmoe_megatron",
            "tests",
            "docs",
            "examples",
            "tools",
            "patches",
            ".ci/run",
            "setup.py",
            "setup.cfg",
        )
        for path in ([ROOT / where] if (ROOT / where).is_file() else sorted((ROOT / where).rglob("*")))
        if path.is_file() and path not in owners and path.suffix in ("", ".py", ".md", ".sh", ".cfg", ".patch")
        for spelling in spellings
        if spelling in path.read_text(errors="ignore").replace("`", "")
    ]
    assert not restated, restated


def test_the_router_is_swapped_in_module_specs_and_in_partials():
    """0.16/0.17 wrap the MoE layer in a ModuleSpec, 0.18 on in functools.partial."""
    old_style = ModuleSpec(module=torch.nn.Module, submodules=MoESubmodules(experts=None))
    new_style = functools.partial(torch.nn.Module, submodules=MoESubmodules(experts=None))
    spec = ordmoe_layer_spec([old_style, new_style], OrdMoEConfig(num_tiers=2))
    routers = [spec[0].submodules.router, spec[1].keywords["submodules"].router]
    assert all(r.func is TierRouter and r.keywords["ordmoe"].num_tiers == 2 for r in routers)
    assert old_style.submodules.router is not TierRouter  # the caller's spec is left alone


@pytest.mark.parametrize("score_function", ["softmax-pre", "sigmoid", "sqrtsoftplus"])
def test_scores_in_fp32_follow_megatron_core_0_18(score_function):
    torch.manual_seed(0)
    logits = (torch.randn(64, 16) * 3).to(torch.bfloat16)
    pre, function = score_function == "softmax-pre", score_function.replace("-pre", "")
    kept = ranking_scores(logits, function, use_pre_softmax=pre, fp32_scores=True)
    cast = ranking_scores(logits, function, use_pre_softmax=pre, fp32_scores=False)
    assert kept.dtype == torch.float32 and cast.dtype == torch.bfloat16
    reference = {
        "softmax": lambda x: torch.softmax(x, -1),
        "sigmoid": torch.sigmoid,
        "sqrtsoftplus": lambda x: torch.nn.functional.softplus(x).sqrt(),
    }[function](logits.float())
    assert torch.equal(kept, reference) and torch.equal(cast, reference.to(torch.bfloat16))
    experts = torch.tensor([[0, 3]]).expand(64, -1)
    assert tier_gating(logits, experts, 2, function, pre, fp32_scores=True).dtype == torch.bfloat16


def test_sqrtsoftplus_gates_are_normalised_over_the_tier():
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    gates = tier_gating(logits, torch.tensor([[2, 0]]), 2, "sqrtsoftplus")
    s = torch.nn.functional.softplus(torch.tensor([2.0, 0.5])).sqrt()
    assert torch.allclose(gates, (s / s.sum()).unsqueeze(0))


def test_score_functions_are_megatron_cores_own_and_the_tier_router_implements_each():
    """compat reads the list from megatron-core's TransformerConfig; the tier router (method)
    implements every one, and ordmoe-pretrain's flag takes exactly those, refusing the rest."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ordmoe_megatron.method.tiers import SCORE_FUNCTIONS
    from ordmoe_megatron.runtime.model_flags import normalize_flags

    megatron_core = TransformerConfig.__dataclass_fields__["moe_router_score_function"].type.__args__
    assert compat.SCORE_FUNCTIONS == megatron_core and {"softmax", "sigmoid"} <= set(megatron_core)
    assert set(compat.SCORE_FUNCTIONS) <= set(SCORE_FUNCTIONS)
    assert ("sqrtsoftplus" in compat.SCORE_FUNCTIONS) == (compat.VERSION >= (0, 18, 0))
    for name in compat.SCORE_FUNCTIONS:
        assert compat.score_function_problem(name) is None
        assert normalize_flags({"moe_router_score_function": name})["moe_router_score_function"] == name
    with pytest.raises(OrdMoEError, match="--moe-router-score-function 'cosine' is not a router score function"):
        normalize_flags({"moe_router_score_function": "cosine"})
    if "sqrtsoftplus" not in compat.SCORE_FUNCTIONS:
        assert "needs megatron-core 0.18 or later" in compat.score_function_problem("sqrtsoftplus")


def test_checkpoints_of_the_newer_layout_are_refused_by_older_megatron_core(monkeypatch):
    new_layout = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
    old_layout = {**new_layout, "common_backend": "torch", "common_backend_version": 1}
    monkeypatch.setattr(compat, "COMMON_STATE_IN_SHARDS", False)
    assert compat.checkpoint_layout_problem(old_layout) is None
    assert "megatron-core 0.19 or later" in compat.checkpoint_layout_problem(new_layout)
    monkeypatch.setattr(compat, "COMMON_STATE_IN_SHARDS", True)
    assert compat.checkpoint_layout_problem(new_layout) is None


def test_a_gpu_without_transformer_engine_gets_the_names_megatron_core_lacks():
    """megatron-core 0.16 calls moe_utils.te_general_gemm at the first router call and defines it
    only with Transformer Engine: bridged whenever TE is absent, with CUDA too (where nothing else
    is bridged)."""
    code = textwrap.dedent("""
        import torch
        torch.cuda.is_available = lambda: True
        before = (torch.cuda.Stream, torch.cuda.current_device)
        from megatron.core.transformer.moe import moe_utils
        from ordmoe_megatron.runtime import bridges
        bridges.enable()
        assert hasattr(moe_utils, "te_general_gemm") and moe_utils.te_general_gemm is None
        assert (torch.cuda.Stream, torch.cuda.current_device) == before and not bridges.is_enabled()
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=cpu_env())
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_saved_optimizer_groups_take_the_current_schedule_where_groups_are_keyed_by_it(monkeypatch):
    """megatron-core 0.19 matches saved parameter groups by max_lr/min_lr too: a resume with a new
    schedule on purpose must re-key them (tests/train/test_reliability.py runs the whole resume)."""
    from ordmoe_megatron.runtime import checkpointing

    monkeypatch.setattr(compat, "SCHEDULE_GROUP_KEYS", ("max_lr", "min_lr", "start_wd"))
    monkeypatch.setattr(compat, "GROUP_IDENTITY_KEYS", ("wd_mult",))
    current = [{"wd_mult": 1.0, "max_lr": 1e-3, "min_lr": 1e-4}, {"wd_mult": 0.0, "max_lr": 1e-3, "min_lr": 1e-4}]
    saved = {
        "optimizer": {
            "param_groups": [
                {"wd_mult": 0.0, "max_lr": 3e-3, "min_lr": 3e-4, "start_wd": 0.1, "params": [1]},
                {"wd_mult": 1.0, "max_lr": 3e-3, "min_lr": 3e-4, "params": [0]},
            ]
        }
    }
    checkpointing._take_current_schedule([saved], current)
    groups = saved["optimizer"]["param_groups"]
    assert groups == [
        {"wd_mult": 0.0, "max_lr": 1e-3, "min_lr": 1e-4, "params": [1]},
        {"wd_mult": 1.0, "max_lr": 1e-3, "min_lr": 1e-4, "params": [0]},
    ]
