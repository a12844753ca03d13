"""README's two set-up commands and CI's script stay in step; its efficacy numbers are recorded."""

import json
import re
from pathlib import Path

from ordmoe_megatron.sweep.results import markdown

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    assert text.startswith("```bash\n"), "README.md must open with the set-up commands"
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands():
    main, tests = readme_commands()
    assert "ordmoe-pretrain" in main and "pytest" in tests


def test_ci_runs_the_readme_test_command():
    _, tests = readme_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines


def test_results_tables_are_the_recorded_sweeps_and_readme_quotes_them():
    """RESULTS.md holds each recorded sweep's table as ``ordmoe-sweep`` wrote it (from the
    results JSON kept next to it), and every number README's efficacy sentences give is in them."""
    results = (ROOT / "RESULTS.md").read_text()
    recorded = sorted((ROOT / "docs" / "results").glob("sweep-*.json"))
    assert recorded, "docs/results/ holds the recorded sweeps' results.json"
    for path in recorded:
        table = markdown(json.loads(path.read_text()))
        assert table.strip() in results, f"RESULTS.md lacks {path.name}'s table as the sweep writes it"
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## What OrdMoE buys", 1)[1].split("\n## ", 1)[0]
    quoted = re.findall(r"\d+\.\d+ ± \d+\.\d+", section)
    assert quoted, "README's efficacy section quotes the recorded means ± std"
    for number in quoted:
        assert number in results, f"README quotes {number}, which RESULTS.md does not record"
