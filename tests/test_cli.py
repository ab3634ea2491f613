"""Front doors: `tessera segment` and `python -m jobs.segment`, bad inputs and a real run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.mosaic import Mosaic
from tests.conftest import make_bundle, smooth_image, write_geotiff

REPO = Path(__file__).resolve().parents[1]
# In-process commands join the suite's embedded Ray (as a command run inside a Ray job does); the
# fresh-process tests below start their own, as a user's command does.
pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    good = write_geotiff(d / "good.tif", smooth_image(300, 400, seed=1))
    truncated = d / "truncated.tif"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = d / "notes.tif"
    text.write_text("this is not an image\n")
    single = write_geotiff(d / "single.tif", smooth_image(300, 400, bands=1, seed=2))
    taken = d / "taken.zarr"
    taken.mkdir()
    (taken / "thesis.docx").write_text("precious")
    return {"good": good, "truncated": truncated, "text": text, "single": single, "taken": taken,
            "bundle": make_bundle(d / "m.bundle", tile=128, overlap=32), "dir": d}


BAD = {
    "missing source": (lambda i: ["segment", str(i["dir"] / "nope.tif")], "does not exist"),
    "unreadable source": (lambda i: ["segment", str(i["text"])], "cannot"),
    "corrupt tiff": (lambda i: ["segment", str(i["truncated"])], "truncated"),
    "band mismatch": (lambda i: ["segment", str(i["single"])], "band"),
    "tile below twice the overlap": (lambda i: ["segment", str(i["good"]), "--tile", "64", "--overlap", "48"],
                                     "twice the overlap"),
    "output is not a mosaic": (lambda i: ["segment", str(i["good"]), "--out", str(i["taken"])],
                               "not a tessera mosaic"),
    "missing bundle": (lambda i: ["segment", str(i["good"]), "--model", str(i["dir"] / "nope.bundle")],
                       "nope.bundle"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_one_line_error_and_leaves_nothing(inputs: dict[str, Path], case: str) -> None:
    build, expected = BAD[case]
    args = build(inputs)
    out = inputs["dir"] / f"out-{case.replace(' ', '-')}.zarr"
    if "--out" not in args:
        args += ["--out", str(out)]
    if "--model" not in args:
        args += ["--model", str(inputs["bundle"])]
    result = CliRunner().invoke(app, [*args, "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0].lower() or expected in lines[0]
    assert not out.exists(), "nothing is written for bad input"
    assert (inputs["taken"] / "thesis.docx").read_text() == "precious"


def test_complete_mosaic_is_not_replaced_without_overwrite(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.zarr"
    args = ["segment", str(inputs["good"]), "--model", str(inputs["bundle"]), "--out", str(out), "--quiet",
            "--block", "512"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "tiles" in first.stdout and "MPix/s" in first.stdout
    before = Mosaic.open(out).lineage["summary"]
    again = CliRunner().invoke(app, args)  # the same job again: kept, nothing computed
    assert again.exit_code == 0 and "complete already" in again.stdout, again.output
    assert Mosaic.open(out).complete and Mosaic.open(out).lineage["summary"] == before
    other = CliRunner().invoke(app, [*args, "--tile", "256"])  # other settings: refused, not replaced
    assert other.exit_code == 2 and "--overwrite" in other.stderr
    replaced = CliRunner().invoke(app, [*args, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output


def test_hydra_job_runs_end_to_end_in_a_fresh_process(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "job.zarr"
    cmd = [sys.executable, "-m", "jobs.segment", f"source={inputs['good']}", f"model={inputs['bundle']}",
           f"output={out}", "progress=false", "tiling.block=256", "storage.shard=256", "storage.chunk=128",
           "cluster.workers=2"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MPix/s" in done.stdout
    mosaic = Mosaic.open(out)
    assert mosaic.complete and mosaic.lineage["summary"]["workers"] == 2
    assert (mosaic.read("mask") != 255).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.zarr"], "Hydra leaves no litter"


def test_hydra_job_bad_input_exits_non_zero_with_one_line(inputs: dict[str, Path], tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "jobs.segment", f"source={tmp_path / 'nope.tif'}",
           f"model={inputs['bundle']}", f"output={tmp_path / 'x.zarr'}"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "x.zarr").exists()


def test_info_prints_lineage(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.zarr"
    CliRunner().invoke(app, ["segment", str(inputs["good"]), "--model", str(inputs["bundle"]), "--out",
                             str(out), "--quiet", "--block", "512"])
    result = CliRunner().invoke(app, ["info", str(out)])
    assert result.exit_code == 0
    assert '"complete": true' in result.stdout and "sha256" in result.stdout
    assert np.isfinite(Mosaic.open(out).lineage["summary"]["mpix_per_second"])


def test_bad_settings_never_touch_an_existing_mosaic(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.zarr"
    base = ["segment", str(inputs["good"]), "--model", str(inputs["bundle"]), "--out", str(out), "--quiet"]
    assert CliRunner().invoke(app, [*base, "--block", "512"]).exit_code == 0
    before = Mosaic.open(out).lineage["summary"]
    for bad, expected in ((["--scores", "prob"], "logits"), (["--block", "1536"], "block 1536 must be a power of two"),
                          (["--batch-size", "0"], "batch_size"), (["--workers", "0"], "workers")):
        result = CliRunner().invoke(app, [*base, "--overwrite", *bad])
        assert result.exit_code == 2 and expected in result.stderr, (bad, result.stderr)
        mosaic = Mosaic.open(out)
        assert mosaic.complete and mosaic.lineage["summary"] == before


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU message")
def test_asking_for_a_gpu_without_one_fails_up_front(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.zarr"
    result = CliRunner().invoke(app, ["segment", str(inputs["good"]), "--model", str(inputs["bundle"]),
                                      "--out", str(out), "--device", "cuda", "--quiet"])
    assert result.exit_code == 2 and "no GPU" in result.stderr
    assert not out.exists()
