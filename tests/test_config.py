"""Defaults in one place: the CLI and the Hydra jobs build the same settings objects from the same defaults."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobs.refine import to_config as refine_config
from jobs.segment import to_config as segment_config
from pipeline.cli import app, compose
from pipeline.config import CONF, defaults
from pipeline.errors import ConfigError
from pipeline.settings import RefineConfig, SegmentConfig

REPO = Path(__file__).resolve().parents[1]
FILES = ["a.tif", "--model", "m.bundle", "--out", "a.zarr"]
HYDRA_FILES = ["source=a.tif", "model=m.bundle", "output=a.zarr"]

# (tessera segment options, python -m jobs.segment overrides): the same settings said both ways.
SEGMENT_TABLE = [
    ([], []),
    (["--block", "1024"], ["tiling.block=1024"]),
    (["--block", "512"], ["tiling.block=512"]),
    (["--block", "4096"], ["tiling.block=4096"]),
    (["--tta", "--overlap", "128"], ["tiling=accurate"]),
    (["--tile", "256", "--window", "cosine", "--scores", "probabilities", "--batch-size", "4", "--level", "1",
      "--no-skip-background"],
     ["tiling.tile=256", "tiling.window=cosine", "tiling.scores=probabilities", "tiling.batch_size=4", "tiling.level=1",
      "tiling.skip_background=false"]),
    (["--address", "auto", "--device", "cpu", "--workers", "2", "--threads", "1"],
     ["cluster=remote", "cluster.device=cpu", "cluster.workers=2", "cluster.threads=1"]),
    (["--ray-address", "ray://head:10001", "--actors-per-gpu", "2", "--pipelined", "--compile"],
     ["cluster.address=ray://head:10001", "cluster.actors_per_gpu=2", "cluster.pipelined=true",
      "cluster.compile=true"]),
    (["--runtime", "onnx", "--overwrite", "--accept-input", "--quiet", "--verbose"],
     ["runtime=onnx", "overwrite=true", "accept_input=true", "progress=false", "verbose=true"]),
    (["--no-track", "--tracking-uri", "sqlite:///t.db", "--experiment", "x"],
     ["tracking.enabled=false", "tracking.uri=sqlite:///t.db", "tracking.experiment=x"]),
]


def cli_settings(args: list[str]) -> dict:
    result = CliRunner().invoke(app, ["segment", *FILES, *args, "--show-config"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize(("options", "overrides"), SEGMENT_TABLE,
                         ids=[" ".join(o) or "defaults" for o, _ in SEGMENT_TABLE])
def test_the_cli_and_the_hydra_job_build_equal_segment_settings(options: list[str], overrides: list[str]) -> None:
    from_hydra = segment_config(compose("segment", [*HYDRA_FILES, *overrides]))
    assert cli_settings(options) == dataclasses.asdict(from_hydra)


def test_block_1024_takes_its_shard_from_the_block_on_both_paths() -> None:
    from_hydra = segment_config(compose("segment", [*HYDRA_FILES, "tiling.block=1024"]))
    assert (from_hydra.block, from_hydra.shard, from_hydra.chunk) == (1024, 1024, 512)
    assert SegmentConfig("a", "m", "o", block=4096).edges == (512, 2048)
    assert SegmentConfig("a", "m", "o", block=512).edges == (512, 512)


def test_the_defaults_are_the_dataclass_defaults() -> None:
    """Nothing in pipeline/conf/segment.yaml or the CLI restates a default: both give SegmentConfig's."""
    plain = dataclasses.asdict(SegmentConfig("a.tif", "m.bundle", "a.zarr"))
    assert cli_settings([]) == plain
    assert dataclasses.asdict(segment_config(compose("segment", HYDRA_FILES))) == plain
    for group in ("tiling/default.yaml", "storage/local.yaml", "cluster/local.yaml"):
        lines = [line for line in (CONF / group).read_text().splitlines() if line.strip() and not line.startswith("#")]
        assert lines == [], f"{group} restates defaults: {lines}"


def test_a_bad_value_is_refused_the_same_way_on_both_paths() -> None:
    with pytest.raises(ConfigError) as hydra_error:
        segment_config(compose("segment", [*HYDRA_FILES, "tiling.block=1000"]))
    result = CliRunner().invoke(app, ["segment", *FILES, "--block", "1000", "--show-config"])
    assert result.exit_code == 2 and str(hydra_error.value) in result.output
    with pytest.raises(ConfigError, match="Value 'many' of type 'str' could not be converted to Integer"):
        compose("segment", [*HYDRA_FILES, "cluster.workers=many"])
    with pytest.raises(ConfigError, match="Key 'blok' not in"):
        compose("segment", [*HYDRA_FILES, "tiling.blok=3"])


def test_the_cli_and_the_hydra_job_build_equal_refine_settings() -> None:
    result = CliRunner().invoke(app, ["refine", "a.zarr", "--out", "b.zarr", "--help"])
    assert result.exit_code == 0
    from_hydra = refine_config(compose("refine", ["mosaic=a.zarr", "output=b.zarr", "cluster=remote",
                                                  "crf.bilateral_sxy=30"]))
    assert from_hydra.address == "auto" and from_hydra.crf.bilateral_sxy == 30.0
    plain = refine_config(compose("refine", ["mosaic=a.zarr", "output=b.zarr"]))
    assert plain == RefineConfig("a.zarr", "b.zarr")
    assert defaults(RefineConfig)["tracking"].experiment == plain.tracking.experiment == "tessera-refine"


def test_every_job_says_cluster_the_same_way() -> None:
    for name, files in (("segment", HYDRA_FILES), ("refine", ["mosaic=a", "output=b"]),
                        ("train", ["image=i", "labels=l", "output=o"]), ("nightly", [])):
        cfg = compose(name, [*files, "cluster=remote"])
        assert cfg.cluster.address == "auto", name
    from jobs.train import to_distributed

    settings = to_distributed(compose("train", ["image=i", "labels=l", "output=o", "cluster.device=cuda",
                                                "cluster.workers=3", "cluster.address=ray://h:10001"]))
    assert settings is not None and (settings.device, settings.workers, settings.address) == ("cuda", 3, "ray://h:10001")
    assert to_distributed(compose("train", ["image=i", "labels=l", "output=o", "cluster.workers=0"])) is None
    with pytest.raises(ConfigError, match=r"distributed.use_gpu is now cluster.device=cuda"):
        compose("train", ["distributed.use_gpu=true"])


def test_the_hydra_job_prints_its_settings_and_starts_nothing(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "jobs.segment", *HYDRA_FILES, "tiling.block=1024", "show_config=true"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == cli_settings(["--block", "1024"])
    assert list(tmp_path.iterdir()) == []
