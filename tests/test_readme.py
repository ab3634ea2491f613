"""The README's quick start is the two commands, and shows what the demo really prints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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


@pytest.mark.slow(seconds=65)
def test_the_readme_training_command_trains_in_a_fresh_folder_with_the_default_tracking_store(tmp_path: Path) -> None:
    """Run as a new user would: a fresh folder, no tracking or Ray variables, the command as the README
    writes it (only shortened to 10 steps), on the default Ray Train worker and the default ./mlflow.db."""
    import sqlite3
    import subprocess
    import sys

    from pipeline.synthetic import generate_scene, write_scene

    text = (ROOT / "README.md").read_text()
    match = re.search(r"## Train on your own images\n.*?```\n(tessera train [^\n]*)\n```", text, re.S)
    assert match, "README has a Train on your own images section with its command"
    command = match.group(1).split()
    assert command[2:4] == ["image=scene.tif", "labels=labels.tif"]
    write_scene(generate_scene(384, 384, seed=3), tmp_path / "scene.tif", tmp_path / "labels.tif")
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": str(ROOT)}
    run = subprocess.run([*command, "steps=10", "steps_per_epoch=10"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "wrote model.bundle" in run.stdout and "validation mIoU" in run.stdout
    # The run is in ./mlflow.db, finished, with its figures.
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        runs = db.execute("select status from runs").fetchall()
        metrics = {name for (name,) in db.execute("select distinct key from metrics")}
    assert runs == [("FINISHED",)] and "best_val_miou" in metrics
    # Ray Train's own chatter (its controller, workers, placement group cleaner) stays out of the terminal.
    terminal = run.stdout + run.stderr
    for noise in ("TrainController", "RayTrainWorker", "Failed to query", "PlacementGroupCleaner", "WARNING"):
        assert noise not in terminal, terminal
