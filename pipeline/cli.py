"""The `tessera` command: thin front doors that parse, call one library function and print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Segment images too large for memory.")


@app.command()
def segment(
    source: Annotated[Path, typer.Argument(help="GeoTIFF/COG, whole-slide image or OME-TIFF.")],
    model: Annotated[str, typer.Option(
        "--model", "-m", help="Model bundle file, or models:/NAME@ALIAS (or /VERSION) from the MLflow registry.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Mosaic folder to write (.zarr).")],
    tile: Annotated[int | None, typer.Option(help="Tile size in px (default: the bundle's).")] = None,
    overlap: Annotated[int | None, typer.Option(help="Minimum tile overlap in px (default: the bundle's).")] = None,
    window: Annotated[str, typer.Option(help="Blend window: gaussian, cosine, linear, constant.")] = "gaussian",
    scores: Annotated[str, typer.Option(help="Blend and store 'logits' or 'probabilities'.")] = "logits",
    tta: Annotated[bool, typer.Option(help="D4 test-time augmentation (8x compute).")] = False,
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = 8,
    level: Annotated[int | None, typer.Option(help="Source pyramid level (default: match the model).")] = None,
    block: Annotated[int, typer.Option(help="Output block edge in px: 512 x a power of two (shards <= 2048).")] = 2048,
    workers: Annotated[int | None, typer.Option(help="Model workers (default: one per GPU, or per core).")] = None,
    threads: Annotated[int | None, typer.Option(help="Torch threads per CPU worker.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    actors_per_gpu: Annotated[int, typer.Option(help="Model workers sharing each GPU.")] = 1,
    pipelined: Annotated[bool | None, typer.Option(
        "--pipelined/--no-pipelined", help="Read ahead and write behind in each worker (default: on GPU).",
        show_default=False)] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model in each worker.")] = False,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster to join (default: embedded).")] = None,
    skip_background: Annotated[bool, typer.Option(help="Skip tiles without foreground.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace a complete mosaic at --out.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    track: Annotated[bool, typer.Option(help="Track the job as an MLflow run.")] = True,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: ./mlflow.db).")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "tessera-segment",
) -> None:
    """Segment SOURCE into a blended Zarr mosaic with a pyramid, and print the job summary."""
    from pipeline.execution import SegmentConfig
    from pipeline.execution import segment as run_segment
    from pipeline.tracking import Tracking

    with user_errors():
        config = SegmentConfig(
            source=str(source), model=str(model), output=str(out), tile=tile, overlap=overlap,
            window=window, scores=scores, tta=tta, batch_size=batch_size, level=level, block=block,
            chunk=min(512, block), shard=min(block, 2048), workers=workers, threads=threads, device=device,
            actors_per_gpu=actors_per_gpu, pipelined=pipelined, compile=compile,
            ray_address=ray_address, skip_background=skip_background, overwrite=overwrite,
            progress=not quiet, tracking=Tracking(enabled=track, uri=tracking_uri, experiment=experiment),
        )
        typer.echo(run_segment(config).describe())


@app.command()
def info(mosaic: Annotated[Path, typer.Argument(help="A mosaic written by `tessera segment`.")]) -> None:
    """Print a mosaic's state, layout and lineage as JSON."""
    from pipeline.mosaic import Mosaic

    with user_errors():
        m = Mosaic.open(mosaic)
        typer.echo(json.dumps({"complete": m.complete, "layout": m.layout.to_dict(), "lineage": m.lineage},
                              indent=2, default=str))


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Folder for the scenes, model, mosaic and preview.")] = Path("demo"),
    size: Annotated[int, typer.Option(help="Edge of the scene to segment, px.")] = 6000,
) -> None:
    """Generate a scene, fit a small model on another, segment the scene, print summary and mIoU."""
    from pipeline.demo import run_demo

    with user_errors():
        run_demo(workdir, size=size)


jobs_app = typer.Typer(no_args_is_help=True, help="Jobs on a Ray cluster (the Ray Jobs API).")
app.add_typer(jobs_app, name="jobs")
ADDRESS = typer.Option("--address", help="Ray dashboard address, e.g. http://head:8265 (default: RAY_ADDRESS).")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="segment or train.")],
    address: Annotated[str | None, ADDRESS] = None,
    working_dir: Annotated[str | None, typer.Option(help="Folder shipped as the job's working directory.")] = None,
    python: Annotated[str, typer.Option(help="Interpreter on the cluster with tessera installed.")] = "python",
    wait: Annotated[bool, typer.Option(help="Wait for the job to end; exit 1 unless it succeeds.")] = False,
) -> None:
    """Submit JOB with Hydra overrides (key=value ...) to a Ray cluster; prints the job id."""
    from pipeline import submission

    with user_errors():
        job_id = submission.submit(address, job, list(ctx.args), working_dir=working_dir, python=python)
        typer.echo(job_id)
        if wait:
            state = submission.wait(address, job_id)
            typer.echo(f"{state.job_id} {state.status} {state.message}".rstrip())
            if state.status != "SUCCEEDED":
                raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(address: Annotated[str | None, ADDRESS] = None) -> None:
    """The cluster's jobs, oldest first: id, status, entry point."""
    from pipeline import submission

    with user_errors():
        for j in submission.list_jobs(address):
            typer.echo(f"{j.job_id}\t{j.status}\t{j.entrypoint}")


@jobs_app.command("status")
def jobs_status(job_id: str, address: Annotated[str | None, ADDRESS] = None) -> None:
    """One job's status and message."""
    from pipeline import submission

    with user_errors():
        j = submission.info(address, job_id)
        typer.echo(f"{j.job_id} {j.status} {j.message}".rstrip())


@jobs_app.command("logs")
def jobs_logs(job_id: str, address: Annotated[str | None, ADDRESS] = None) -> None:
    """A job's output so far."""
    from pipeline import submission

    with user_errors():
        typer.echo(submission.logs(address, job_id), nl=False)


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: Annotated[str | None, ADDRESS] = None) -> None:
    """Stop a running job (its mosaic stays incomplete; submit it again to resume)."""
    from pipeline import submission

    with user_errors():
        typer.echo("stopping" if submission.stop(address, job_id) else "already ended")


if __name__ == "__main__":
    app()
