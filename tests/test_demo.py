"""`make demo` in miniature: the same code path on a small scene with a short training run."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.demo import run_demo


@pytest.mark.slow(seconds=50)
@pytest.mark.usefixtures("ray_session")
def test_demo_runs_end_to_end_and_scores_the_mosaic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary, miou = run_demo(tmp_path, size=768, train_size=384, steps=20)
    out = capsys.readouterr().out
    assert "mIoU against the known truth" in out
    assert "MPix/s" in out and "recomputed" in out
    assert (tmp_path / "preview.png").stat().st_size > 1000
    assert summary.tiles_recomputed == 0 and summary.width == summary.height == 768
    assert 0.0 <= miou <= 1.0
