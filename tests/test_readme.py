"""The README's quick start is the two commands, and shows what the demo really prints."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"## Quick start\n(.*?)\n## ", text, re.S)
    assert match, "README has a Quick start section"
    return match.group(1)


def test_quick_start_is_make_demo_then_make_test() -> None:
    blocks = re.findall(r"```\n(.*?)```", quick_start(), re.S)
    assert blocks[0].split("\n")[:2] == ["make demo", "make test"]


def test_quick_start_shows_lines_the_demo_prints() -> None:
    demo_source = (ROOT / "pipeline" / "demo.py").read_text() + (ROOT / "pipeline" / "execution.py").read_text()
    shown = re.findall(r"```\n(.*?)```", quick_start(), re.S)[1]
    lines = [line.strip() for line in shown.strip().splitlines() if line.strip() != "..."]
    for line in lines:
        word = line.split()[0]
        assert word in demo_source, f"README shows {line!r}, which the demo does not print"
    assert any(line.startswith("mIoU against the known truth") for line in lines)


def test_make_targets_exist_and_ci_runs_make_test() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
