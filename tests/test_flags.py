"""The --ordmoe-* flags are made from OrdMoEConfig's fields: one flag per field, with its default,
its Literal choices and its docstring as help; the parsed flags give the config back."""

import argparse
import dataclasses
import typing

import pytest

from ordmoe_megatron import OrdMoEConfig
from ordmoe_megatron.flags import add_ordmoe_args, field_docs, ordmoe_config_from_args


def _actions(tier_flags_only=False):
    parser = add_ordmoe_args(argparse.ArgumentParser(), tier_flags_only=tier_flags_only)
    return parser, {a.dest: a for a in parser._actions if a.dest.startswith("ordmoe")}


def test_every_setting_has_a_flag_a_docstring_and_its_literal_choices():
    _, actions = _actions()
    settings = OrdMoEConfig.settings()
    assert {"ordmoe_" + f.name for f in settings} | {"ordmoe"} == set(actions)
    hints = typing.get_type_hints(OrdMoEConfig)
    docs = field_docs()
    for f in dataclasses.fields(OrdMoEConfig):
        assert len(docs.get(f.name, "")) > 10, f"OrdMoEConfig.{f.name} has no docstring"
    for f in settings:
        action = actions["ordmoe_" + f.name]
        assert action.option_strings[0] == "--ordmoe-" + f.name.replace("_", "-")
        assert action.default == f.default and action.help == docs[f.name]
        if typing.get_origin(hints[f.name]) is typing.Literal:
            assert tuple(action.choices) == typing.get_args(hints[f.name])
            for choice in action.choices:  # every choice is accepted by the config
                OrdMoEConfig(**{f.name: choice, "grouping": "explicit", "tier_ranks": "1-2,3-4,5-6"})
        else:
            assert action.choices is None


def test_the_flag_names_and_defaults_the_docs_and_tests_use():
    """Renaming a field renames a flag: these are the names docs/ and tests/ spell."""
    _, actions = _actions()
    defaults = {a.option_strings[0]: a.default for a in actions.values()}
    assert defaults == {
        "--ordmoe": False,
        "--ordmoe-num-tiers": 3,
        "--ordmoe-grouping": "uniform",
        "--ordmoe-tier-ranks": None,
        "--ordmoe-layer-scope": None,
        "--ordmoe-ranking": "token",
        "--ordmoe-rewards": None,
        "--ordmoe-advantage": "zscore",
        "--ordmoe-rank-loss-coeff": 1.0,
        "--ordmoe-logprob-floor": None,
        "--ordmoe-lazy-fanout": True,
        "--ordmoe-objective": "advantage",
        "--ordmoe-beta": 1.0,
        "--ordmoe-path-schedule": "fused",
        "--ordmoe-lower-path-fraction": 1.0,
    }
    assert set(_actions(tier_flags_only=True)[1]) == {
        "ordmoe_num_tiers",
        "ordmoe_grouping",
        "ordmoe_tier_ranks",
        "ordmoe_layer_scope",
        "ordmoe_ranking",
    }


def test_parsed_flags_give_the_config_and_bad_choices_are_refused(capsys):
    parser, _ = _actions()
    argv = "--ordmoe --ordmoe-num-tiers 2 --ordmoe-rewards 1 0 --ordmoe-advantage center --no-ordmoe-lazy-fanout"
    cfg = ordmoe_config_from_args(parser.parse_args([*argv.split(), "--ordmoe-logprob-floor", "-4"]))
    assert (cfg.num_tiers, cfg.rewards, cfg.advantage, cfg.lazy_fanout, cfg.logprob_floor) == (
        2,
        [1.0, 0.0],
        "center",
        False,
        -4.0,
    )
    assert ordmoe_config_from_args(parser.parse_args(["--no-ordmoe"])) is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--ordmoe-objective", "dpo"])
    assert "invalid choice: 'dpo'" in capsys.readouterr().err


def test_the_flag_table_of_docs_mcore_matches_the_fields():
    """docs/mcore.md's table has one row per flag, with the field's default and Literal choices."""
    import re
    from pathlib import Path

    from ordmoe_megatron.method.config import literal_choices, option

    rows = {}
    for line in (Path(__file__).resolve().parents[1] / "docs" / "mcore.md").read_text().splitlines():
        match = re.match(r"\| `(--ordmoe-[a-z-]+)[^|]*\|\s*([^|]*?)\s*\|([^|]*)\|$", line)
        if match:
            rows[match[1]] = (match[2].strip(), match[3])
    assert set(rows) == {option(f.name) for f in OrdMoEConfig.settings()}
    for f in OrdMoEConfig.settings():
        default, meaning = rows[option(f.name)]
        if isinstance(f.default, str):
            assert default == f"`{f.default}`", f.name
        elif isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
            assert float(default) == f.default, f.name
        for choice in literal_choices().get(f.name, ()):
            assert f"`{choice}`" in meaning, (f.name, choice)
