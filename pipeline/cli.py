"""The `tessera` command: thin front doors that parse, call one library function and print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.config import defaults
from pipeline.crf import CRFSettings
from pipeline.errors import ConfigError, user_errors
from pipeline.settings import RefineConfig, SegmentConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Segment images too large for memory.")
CLUSTER_HELP = "Ray cluster to join: auto (RAY_ADDRESS), HOST:6379 or ray://HOST:10001 (default: embedded Ray here)."
SEG = defaults(SegmentConfig)
REF = defaults(RefineConfig)
CRF = defaults(CRFSettings)


@app.command()
def segment(
    sources: Annotated[list[str], typer.Argument(
        help="Image(s): GeoTIFF/COG, whole-slide image or OME-TIFF; a folder; a list file (.csv/.txt: path, "
             "name, level); a STAC ItemCollection (.json); or a STAC API search URL (https://.../search?...).",
        show_default=False)],
    model: Annotated[str, typer.Option(
        "--model", "-m", help="Model bundle file, or models:/NAME@ALIAS (or /VERSION) from the MLflow registry.")],
    out: Annotated[str, typer.Option(
        "--out", "-o", help="The mosaic (.zarr) of one image, or the folder of a collection's mosaics and manifest; "
                            "a local path or object storage (s3://bucket/path).")],
    glob: Annotated[str | None, typer.Option(help="Pattern of the files to take from a folder, e.g. '*.svs'.")] = None,
    asset: Annotated[list[str] | None, typer.Option(
        help="STAC asset to read (repeat to stack several assets as bands).")] = None,
    tile: Annotated[int | None, typer.Option(help="Tile size in px (default: the bundle's).")] = SEG["tile"],
    overlap: Annotated[int | None, typer.Option(help="Minimum tile overlap in px (default: the bundle's).")] = SEG[
        "overlap"],
    window: Annotated[str, typer.Option(help="Blend window: gaussian, cosine, linear, constant.")] = SEG["window"],
    scores: Annotated[str, typer.Option(help="Blend and store 'logits' or 'probabilities'.")] = SEG["scores"],
    tta: Annotated[bool, typer.Option(help="D4 test-time augmentation (8x compute).")] = SEG["tta"],
    uncertainty: Annotated[bool, typer.Option(help="Store per-pixel uncertainty (and, with --tta, the views' "
                                                   "spread).")] = SEG["uncertainty"],
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = SEG["batch_size"],
    level: Annotated[int | None, typer.Option(help="Source pyramid level (default: match the model).")] = SEG["level"],
    block: Annotated[int, typer.Option(help="Output block edge in px: a power of two up to 2048, or a multiple of "
                                            "2048 (the shard is min(block, 2048)).")] = SEG["block"],
    workers: Annotated[int | None, typer.Option(help="Model workers (default: one per GPU, or per core).")] = SEG[
        "workers"],
    threads: Annotated[int | None, typer.Option(help="Torch threads per CPU worker.")] = SEG["threads"],
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = SEG["device"],
    actors_per_gpu: Annotated[int, typer.Option(help="Model workers sharing each GPU.")] = SEG["actors_per_gpu"],
    pipelined: Annotated[bool | None, typer.Option(
        "--pipelined/--no-pipelined", help="Read ahead and write behind in each worker (default: on GPU).",
        show_default=False)] = SEG["pipelined"],
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model in each worker.")] = SEG[
        "compile"],
    runtime: Annotated[str | None, typer.Option(
        help="Run a PyTorch bundle on another runtime: onnx (onnxruntime). Default: the bundle's own.")] = SEG[
        "runtime"],
    address: Annotated[str | None, typer.Option("--address", "--ray-address", help=CLUSTER_HELP)] = SEG["address"],
    skip_background: Annotated[bool, typer.Option(help="Skip tiles without foreground.")] = SEG["skip_background"],
    overwrite: Annotated[bool, typer.Option(help="Replace complete mosaics at --out.")] = SEG["overwrite"],
    accept_input: Annotated[bool, typer.Option(
        "--accept-input", help="Run images whose data type or values differ from the model's training data.")] = SEG[
        "accept_input"],
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = not SEG["progress"],
    verbose: Annotated[bool, typer.Option(help="Show Ray's own messages.")] = SEG["verbose"],
    track: Annotated[bool, typer.Option(help="Track the job as an MLflow run.")] = SEG["tracking"].enabled,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: ./mlflow.db).")] = SEG[
        "tracking"].uri,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = SEG["tracking"].experiment,
    show_config: Annotated[bool, typer.Option(
        "--show-config", help="Print the job's settings as JSON and stop (the same as the Hydra job's "
                              "show_config=true).")] = False,
) -> None:
    """Segment one image, or a collection, into blended Zarr mosaics with pyramids; print the summary.

    A collection runs on one pool of warm workers; a failed image is listed in ROOT/manifest.csv with
    its error and the others go on (exit status 1). Running the same command again skips finished
    mosaics, resumes unfinished ones and retries failed ones. Every default is SegmentConfig's
    (pipeline/execution.py), as for `python -m jobs.segment`.
    """
    from pipeline.config import settings_json
    from pipeline.execution import segment_inputs
    from pipeline.tracking import Tracking

    with user_errors():
        config = SegmentConfig(
            source=",".join(sources), model=str(model), output=str(out), tile=tile, overlap=overlap,
            window=window, scores=scores, tta=tta, batch_size=batch_size, level=level, block=block,
            workers=workers, threads=threads, device=device, actors_per_gpu=actors_per_gpu, pipelined=pipelined,
            compile=compile, runtime=runtime, address=address, skip_background=skip_background, overwrite=overwrite,
            accept_input=accept_input, progress=not quiet, verbose=verbose, uncertainty=uncertainty,
            tracking=Tracking(enabled=track, uri=tracking_uri, experiment=experiment),
        )
        if show_config:
            typer.echo(settings_json(config))
            return
        summary = segment_inputs(config, sources, pattern=glob, assets=asset or ())
    _finish(summary)


def _finish(summary: Any) -> None:
    """Print a job's summary; a collection with failed images exits 1."""
    typer.echo(summary.describe())
    if getattr(summary, "failed", None):
        raise typer.Exit(1)


@app.command()
def refine(
    mosaic: Annotated[str, typer.Argument(
        help="A complete mosaic written by `tessera segment` (a path or s3://...), or a folder of them (a "
             "collection's ROOT).")],
    out: Annotated[str, typer.Option(
        "--out", "-o", help="Refined mosaic to write (.zarr, a path or s3://...), or the folder for a collection's "
                            "refined mosaics.")],
    source: Annotated[str | None, typer.Option(
        help="The image MOSAIC was segmented from (default: the path in its lineage).")] = REF["source"],
    iterations: Annotated[int, typer.Option(help="Mean-field iterations.")] = CRF["iterations"],
    gaussian_sxy: Annotated[float, typer.Option(help="Smoothness kernel: spatial sigma, px.")] = CRF["gaussian_sxy"],
    gaussian_compat: Annotated[float, typer.Option(help="Smoothness kernel: weight.")] = CRF["gaussian_compat"],
    bilateral_sxy: Annotated[float, typer.Option(help="Appearance kernel: spatial sigma, px.")] = CRF[
        "bilateral_sxy"],
    bilateral_srgb: Annotated[float, typer.Option(help="Appearance kernel: colour sigma, 8-bit levels.")] = CRF[
        "bilateral_srgb"],
    bilateral_compat: Annotated[float, typer.Option(help="Appearance kernel: weight.")] = CRF["bilateral_compat"],
    halo: Annotated[int | None, typer.Option(help="Context px around each block (default: 4 x the sigma).")] = CRF[
        "halo"],
    block: Annotated[int | None, typer.Option(help="Block edge, a multiple of the shard (default: a shard).")] = REF[
        "block"],
    workers: Annotated[int | None, typer.Option(help="Blocks refined at once (default: one per core).")] = REF[
        "workers"],
    address: Annotated[str | None, typer.Option("--address", "--ray-address", help=CLUSTER_HELP)] = REF["address"],
    overwrite: Annotated[bool, typer.Option(help="Replace a complete mosaic at --out.")] = REF["overwrite"],
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = not REF["progress"],
    verbose: Annotated[bool, typer.Option(help="Show Ray's own messages.")] = REF["verbose"],
    track: Annotated[bool, typer.Option(help="Track the job as an MLflow run.")] = REF["tracking"].enabled,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: ./mlflow.db).")] = REF[
        "tracking"].uri,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = REF["tracking"].experiment,
) -> None:
    """Refine MOSAIC (or every mosaic in a folder) with a dense CRF into new mosaics of class probabilities."""
    from pipeline.crf import CRFSettings
    from pipeline.tracking import Tracking

    with user_errors():
        crf = CRFSettings(iterations=iterations, gaussian_sxy=gaussian_sxy, gaussian_compat=gaussian_compat,
                          bilateral_sxy=bilateral_sxy, bilateral_srgb=bilateral_srgb,
                          bilateral_compat=bilateral_compat, halo=halo)
        config = RefineConfig(
            mosaic=mosaic, output=out, source=source, crf=crf, block=block,
            workers=workers, address=address, overwrite=overwrite, progress=not quiet, verbose=verbose,
            tracking=Tracking(enabled=track, uri=tracking_uri, experiment=experiment),
        )
        from pipeline.refinement import refine_inputs  # Ray: after the settings check

        summary = refine_inputs(config)
    _finish(summary)


@app.command()
def info(mosaic: Annotated[str, typer.Argument(help="A mosaic written by `tessera segment` (a path or s3://...).")],
         ) -> None:
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
    """Generate a scene, fit the default U-Net on another, segment the scene, print summary and mIoU."""
    from pipeline.demo import run_demo

    with user_errors():
        run_demo(workdir, size=size)


query_app = typer.Typer(no_args_is_help=True, help="Answer questions from a mosaic without reading it whole.")
app.add_typer(query_app, name="query")
MOSAIC_ARG = typer.Argument(help="A mosaic folder, or a URI such as s3://bucket/scene.zarr.")
WINDOW = typer.Option(help="Pixel window y0,x0,y1,x1 at the chosen level.")
BBOX = typer.Option(help="Bounding box minx,miny,maxx,maxy in --crs (default: the mosaic's coordinates).")
CRS = typer.Option(help="CRS of --bbox or --polygon, e.g. EPSG:4326.")
LEVEL = typer.Option(help="Pyramid level (0 = full resolution).")
RESOLUTION = typer.Option(help="Target pixel size in the mosaic's units; picks the coarsest level as fine.")


def _region(window: str | None, bbox: str | None, crs: str | None, level: int | None,
            resolution: float | None) -> dict[str, Any]:
    from pipeline.query.window import parse_bbox, parse_window

    return {"window": parse_window(window), "bbox": parse_bbox(bbox), "crs": crs, "level": level,
            "resolution": resolution}


@query_app.command("info")
def query_info(mosaic: Annotated[str, MOSAIC_ARG]) -> None:
    """Print size, levels, units, bounds (also in WGS84), classes and provenance as JSON."""
    from pipeline.mosaic import Mosaic
    from pipeline.query.info import mosaic_info

    with user_errors():
        typer.echo(json.dumps(mosaic_info(Mosaic.open(mosaic)), indent=2, default=str))


@query_app.command("region")
def query_region(
    mosaic: Annotated[str, MOSAIC_ARG],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Save the values as .npy.")] = None,
    layer: Annotated[str, typer.Option(help="mask, confidence, scores, uncertainty, spread.")] = "mask",
    window: Annotated[str | None, WINDOW] = None,
    bbox: Annotated[str | None, BBOX] = None,
    crs: Annotated[str | None, CRS] = None,
    level: Annotated[int | None, LEVEL] = None,
    resolution: Annotated[float | None, RESOLUTION] = None,
) -> None:
    """Read a region: print where it is and its class counts as JSON, and save its values with --out."""
    import numpy as np

    from pipeline.errors import RegionError
    from pipeline.mosaic import Mosaic
    from pipeline.query import read_region

    with user_errors():
        if out is not None and out.suffix != ".npy":
            raise RegionError(f"--out {out}: give a .npy file (`tessera query export` writes GeoTIFF and PNG)")
        m = Mosaic.open(mosaic)
        arr = read_region(m, layer, as_xarray=True, **_region(window, bbox, crs, level, resolution))
        report = {k: arr.attrs[k] for k in ("level", "window", "resolution", "units")}
        report["shape"] = list(arr.shape)
        if layer == "mask":
            nodata = m.layout.mask_nodata
            counts = np.bincount(arr.values.ravel(), minlength=nodata + 1)
            report["pixels"] = {n: int(counts[i]) for i, n in enumerate(arr.attrs["classes"])}
            report["pixels"]["nodata"] = int(counts[nodata])
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            np.save(out, arr.values)
            report["saved"] = str(out)
        typer.echo(json.dumps(report, indent=2))


@query_app.command("stats")
def query_stats(
    mosaic: Annotated[str, MOSAIC_ARG],
    polygon: Annotated[Path | None, typer.Option(help="GeoJSON file: a Polygon, MultiPolygon or Feature.")] = None,
    window: Annotated[str | None, WINDOW] = None,
    bbox: Annotated[str | None, BBOX] = None,
    crs: Annotated[str | None, CRS] = None,
    level: Annotated[int | None, LEVEL] = None,
) -> None:
    """Per-class pixels and areas (m2, or um2 for slides) of a region, or of the whole mosaic (out of core)."""
    from pipeline.errors import RegionError
    from pipeline.mosaic import Mosaic
    from pipeline.query import class_areas, mosaic_stats
    from pipeline.query.window import parse_bbox, parse_window

    with user_errors():
        m = Mosaic.open(mosaic)
        if polygon is not None:
            try:
                geometry = json.loads(polygon.read_text())
            except (OSError, ValueError) as e:
                raise RegionError(f"--polygon {polygon}: not a readable GeoJSON file ({e})") from None
            result = class_areas(m, polygon=geometry, crs=crs, level=level, max_pixels=None)
        elif window is None and bbox is None:
            result = mosaic_stats(m, level or 0)
        else:
            result = class_areas(m, window=parse_window(window), bbox=parse_bbox(bbox), crs=crs, level=level,
                                 max_pixels=None)
        typer.echo(json.dumps(result.to_dict(), indent=2))


@query_app.command("vectorize")
def query_vectorize(
    mosaic: Annotated[str, MOSAIC_ARG],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output file (default: print GeoJSON).")] = None,
    format: Annotated[str | None, typer.Option(
        "--format", "-f", help="geojson, qupath (QuPath objects in level-0 pixels), gpkg or fgb (default: from "
        "the --out name's ending, else geojson).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
    classes: Annotated[str | None, typer.Option(help="Comma-separated class names (default: all).")] = None,
    background: Annotated[bool, typer.Option(help="qupath: keep class 0, left out by default.")] = False,
    object_type: Annotated[str, typer.Option(help="qupath: annotation or detection.")] = "annotation",
    downsample: Annotated[float | None, typer.Option(
        help="qupath: the downsample of the source level the mosaic was segmented from, when not level 0.")] = None,
    simplify: Annotated[float, typer.Option(help="Simplification tolerance in the mosaic's units.")] = 0.0,
    out_crs: Annotated[str | None, typer.Option(help="Output CRS, e.g. EPSG:4326 (default: the mosaic's).")] = None,
    window: Annotated[str | None, WINDOW] = None,
    bbox: Annotated[str | None, BBOX] = None,
    crs: Annotated[str | None, CRS] = None,
    level: Annotated[int | None, LEVEL] = None,
    resolution: Annotated[float | None, RESOLUTION] = None,
) -> None:
    """The class mask of a region as polygons (one per connected area of a class): GeoJSON, QuPath objects,
    GeoPackage or FlatGeobuf."""
    from pipeline.errors import ConfigError
    from pipeline.mosaic import Mosaic
    from pipeline.query.vector_export import OGR_DRIVERS, export_vectors, vector_collection, vector_format

    with user_errors():
        fmt = vector_format(out, format)
        names = classes.split(",") if classes else None
        region = _region(window, bbox, crs, level, resolution)
        if out is not None:
            written, count = export_vectors(Mosaic.open(mosaic), out, fmt, overwrite=overwrite, classes=names,
                                            background=background, simplify=simplify, out_crs=out_crs,
                                            object_type=object_type, downsample=downsample, **region)
            typer.echo(f"{count} polygon{'' if count == 1 else 's'} -> {written}")
        elif fmt in OGR_DRIVERS:
            raise ConfigError(f"format {fmt}: a {fmt} file needs --out FILE")
        else:  # GeoJSON or QuPath objects, to the terminal
            typer.echo(json.dumps(vector_collection(
                Mosaic.open(mosaic), fmt, out_crs=out_crs, background=background, object_type=object_type,
                downsample=downsample, classes=names, simplify=simplify, **region)))


@query_app.command("export")
def query_export(
    mosaic: Annotated[str, MOSAIC_ARG],
    out: Annotated[Path, typer.Option("--out", "-o", help="A .tif (Cloud-Optimised GeoTIFF) or .png file.")],
    layer: Annotated[str, typer.Option(help="mask, confidence, uncertainty, spread.")] = "mask",
    window: Annotated[str | None, WINDOW] = None,
    bbox: Annotated[str | None, BBOX] = None,
    crs: Annotated[str | None, CRS] = None,
    level: Annotated[int | None, LEVEL] = None,
    resolution: Annotated[float | None, RESOLUTION] = None,
) -> None:
    """Export a region (default: everything) as a COG with overviews (geo mosaics) or a PNG in the class colours."""
    from pipeline.errors import RegionError
    from pipeline.mosaic import Mosaic
    from pipeline.query import export_cog, export_png

    with user_errors():
        m = Mosaic.open(mosaic)
        region = _region(window, bbox, crs, level, resolution)
        if out.suffix.lower() in (".tif", ".tiff"):
            written = export_cog(m, out, layer, **region)
        elif out.suffix.lower() == ".png":
            written = export_png(m, out, layer=layer, **region)
        else:
            raise RegionError(f"--out {out}: give a .tif (COG) or a .png file")
        typer.echo(f"{layer} -> {written}")


@app.command()
def serve(
    root: Annotated[str, typer.Argument(help="The folder whose mosaics to serve (read-only): a path or s3://...")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    max_region_pixels: Annotated[int | None, typer.Option(
        help="Largest region one request may read, in pixels [default: 4096 x 4096].")] = None,
    max_polygon_vertices: Annotated[int | None, typer.Option(
        help="Most vertices in one polygons.geojson answer [default: 1000000].")] = None,
    max_memory: Annotated[int | None, typer.Option(
        help="MiB that heavy requests (regions, polygons, areas, statistics) may take together; as many run at "
             "once as fit, the others wait, then get 503 [default: a quarter of the machine's memory].")] = None,
    request_timeout: Annotated[float | None, typer.Option(
        help="Seconds a client has to send a request's head, and each part of its body [default: 10].")] = None,
    sources: Annotated[list[Path] | None, typer.Option(
        help="A folder whose source images the viewer may preview, besides ROOT (repeatable).")] = None,
    token: Annotated[str | None, typer.Option(
        envvar="TESSERA_TOKEN", show_envvar=True,
        help="Require this token of every request (header 'Authorization: Bearer TOKEN', or open "
             "/?token=TOKEN once in a browser). Prefer the environment variable: a command line is visible "
             "to other users of the machine.")] = None,
    allowed_host: Annotated[list[str] | None, typer.Option(
        help="A Host name the server answers to (repeatable), e.g. the proxy's public name; others get 400. "
             "Default: 127.0.0.1 and localhost when listening there, any otherwise.")] = None,
) -> None:
    """Serve the mosaics under ROOT over HTTP: the API (/docs) and the web viewer (/)."""
    import os

    import uvicorn

    from pipeline.query.preview import OFFLINE_GDAL
    from pipeline.service.access import default_allowed_hosts
    from pipeline.service.app import Limits, create_app
    from pipeline.service.cost import HeaderDeadline
    from pipeline.storage import Location

    os.environ.update(OFFLINE_GDAL)  # this process serves ROOT only: GDAL reaches no network (preview.py)
    with user_errors():
        if token is not None and len(token) < 16:
            raise ConfigError("--token is shorter than 16 characters; use a long random one, e.g. "
                              "`python -c 'import secrets; print(secrets.token_urlsafe())'`.")
        given: dict[str, Any] = {"region_pixels": max_region_pixels, "polygon_vertices": max_polygon_vertices,
                 "memory_bytes": None if max_memory is None else max_memory << 20,
                 "request_timeout_s": request_timeout}
        limits = Limits(**{k: v for k, v in given.items() if v is not None})  # the defaults live in Limits
        service = create_app(root, limits, source_folders=sources or (),
                             token=token, allowed_hosts=default_allowed_hosts(host, allowed_host))
    guard = " (token required)" if token else ""
    typer.echo(f"serving {Location.parse(root)} on http://{host}:{port}/ (API at /docs){guard}; "
               f"{limits.heavy_slots()} heavy requests at once")
    uvicorn.run(service, host=host, port=port, log_level="warning", http=HeaderDeadline.with_timeout(
        limits.request_timeout_s), timeout_keep_alive=5, timeout_graceful_shutdown=5)


model_app = typer.Typer(no_args_is_help=True, help="Models from elsewhere in, bundles out, and what a bundle is.")
app.add_typer(model_app, name="model")


@model_app.command("import")
def model_import(
    source: Annotated[str, typer.Argument(help=(
        "A TorchScript archive, a torch.export program (.pt2), an ONNX file, a segmentation-models-pytorch "
        "folder (save_pretrained) or hub id, or a state dict (.pt/.pth/.safetensors, with --architecture)."))],
    out: Annotated[Path, typer.Option("--out", "-o", help="The bundle to write.")],
    classes: Annotated[list[str] | None, typer.Option(
        "--class", help="A class, background first: NAME or NAME:R,G,B (repeat, one per output channel).")] = None,
    bands: Annotated[str | None, typer.Option(help="Source bands the model reads, 1-based, e.g. 1,2,3.")] = None,
    normalization: Annotated[str | None, typer.Option(
        help="imagenet (8-bit RGB, ImageNet mean/std), unit (8-bit to 0..1) or none (raw values).")] = None,
    scale: Annotated[str | None, typer.Option(help="Factor on raw values, e.g. 1/255 (with --mean, --std).")] = None,
    mean: Annotated[str | None, typer.Option(help="Per-band means after scaling, e.g. 0.485,0.456,0.406.")] = None,
    std: Annotated[str | None, typer.Option(help="Per-band standard deviations after scaling.")] = None,
    resolution: Annotated[float | None, typer.Option(help="Pixel size the model was made for.")] = None,
    unit: Annotated[str | None, typer.Option(help="Unit of --resolution: m or um.")] = None,
    tile: Annotated[int | None, typer.Option(help="Default tile size in px (a multiple of 32).")] = None,
    overlap: Annotated[int | None, typer.Option(help="Default tile overlap in px.")] = None,
    input_dtype: Annotated[str | None, typer.Option(
        help="Data type of the images it was made for (default: uint8 for a scale of 1/255).")] = None,
    architecture: Annotated[str | None, typer.Option(
        help="For a state dict: the registry architecture (`tessera model architectures`). Else a label.")] = None,
    arch_args: Annotated[str | None, typer.Option(help="For a state dict: the architecture's arguments, JSON.")] = None,
    register: Annotated[str | None, typer.Option(help="Also register the bundle in MLflow's registry as NAME.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: ./mlflow.db).")] = None,
) -> None:
    """Make a bundle of a model from elsewhere; it is checked on one tile, then works wherever a trained one does.

    What the file cannot say (classes, bands, normalisation, resolution, tile) is given as options, or read
    from SOURCE.json beside it (`tessera model export` writes one).
    """
    from pipeline.classes import parse_class
    from pipeline.models.interchange import ImportSettings, import_model

    with user_errors():
        settings = ImportSettings(
            classes=tuple(parse_class(c, k) for k, c in enumerate(classes)) if classes else None,
            bands=_numbers("--bands", bands, int), normalization=_normalization(normalization, scale, mean, std),
            resolution=resolution, resolution_unit=unit, tile_size=tile, overlap=overlap, input_dtype=input_dtype,
            architecture=architecture, arch_args=_json_option("--arch-args", arch_args),
        )
        bundle = import_model(source, out, settings)
        typer.echo(f"wrote {out} (sha256 {bundle.sha256 and bundle.sha256[:12]}): {_describe(bundle.spec)}")
        if register:
            _register(out, register, tracking_uri, {"source": source})


@model_app.command("export")
def model_export(
    bundle: Annotated[str, typer.Argument(help="A bundle file, or models:/NAME@ALIAS (or /VERSION).")],
    format: Annotated[str, typer.Option("--format", "-f", help="onnx, torchscript or exported (torch.export .pt2).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The file to write; its spec goes to FILE.json.")],
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI, for models:/ references.")] = None,
) -> None:
    """Write a bundle's model for another runtime, and its spec beside it as JSON."""
    from pipeline.models import ModelBundle
    from pipeline.models.interchange import export_bundle

    with user_errors():
        spec = export_bundle(ModelBundle.load(_bundle_file(bundle, tracking_uri)), format, out)
        size = f", input fixed at {spec.input_size} px" if spec.input_size else ""
        typer.echo(f"wrote {out} ({format}{size}) and {out}.json")


@model_app.command("info")
def model_info(
    bundle: Annotated[str, typer.Argument(help="A bundle file, or models:/NAME@ALIAS (or /VERSION).")],
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI, for models:/ references.")] = None,
) -> None:
    """Print a bundle's spec (what it is and how it is fed) and its sha256 as JSON."""
    from pipeline.models import ModelBundle

    with user_errors():
        loaded = ModelBundle.load(_bundle_file(bundle, tracking_uri))
        typer.echo(json.dumps({"sha256": loaded.sha256, **loaded.spec.to_dict()}, indent=2))


@model_app.command("architectures")
def model_architectures() -> None:
    """List the architectures a bundle can be built with (for training, or to import a state dict)."""
    from pipeline.models import available_architectures

    typer.echo("\n".join(available_architectures()))


def _bundle_file(bundle: str, tracking_uri: str | None) -> str:
    """A local bundle file for a path or a registry reference."""
    from pipeline import registry
    from pipeline.tracking import Tracking, check_reachable

    if not registry.is_model_uri(bundle):
        return bundle
    uri = Tracking(uri=tracking_uri).resolved_uri()
    check_reachable(uri)
    return str(registry.resolve_model(bundle, uri)[0])


def _register(bundle: Path, name: str, tracking_uri: str | None, params: dict[str, Any]) -> None:
    from pipeline.registry import register_bundle
    from pipeline.tracking import Tracking, open_run

    with open_run(Tracking(uri=tracking_uri, experiment="tessera-models"), f"import {bundle.name}", params) as (
            run_id, uri, _):
        ref = register_bundle(bundle, name, run_id, uri)
    typer.echo(f"registered {ref.uri}")


def _describe(spec: Any) -> str:
    tile = f"tile {spec.tile_size}" + (" (fixed)" if spec.input_size else "")
    return (f"{spec.runtime} {spec.architecture}, bands {list(spec.bands)}, classes "
            f"{', '.join(c.name for c in spec.classes)}, {tile}")


def _numbers(option: str, text: str | None, kind: type = float) -> tuple[Any, ...] | None:
    """A comma-separated list typed on the command line: ints, or numbers where 1/255 is taken."""
    from fractions import Fraction

    from pipeline.errors import ConfigError

    if text is None:
        return None
    try:
        return tuple(int(v) if kind is int else float(Fraction(v.strip())) for v in text.split(","))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{option} {text!r}: give {'integers' if kind is int else 'numbers'} separated by "
                          f"commas, e.g. {'1,2,3' if kind is int else '0.485,0.456,0.406 (1/255 is taken)'}.") from None


def _normalization(name: str | None, scale: str | None, mean: str | None, std: str | None) -> Any:
    from pipeline.errors import ConfigError
    from pipeline.models import Normalization

    numbers = (scale, mean, std)
    if all(v is None for v in numbers):
        return name
    if name is not None or any(v is None for v in numbers):
        raise ConfigError("Give either --normalization NAME, or all of --scale, --mean and --std.")
    values = [_numbers(option, text) for option, text in (("--scale", scale), ("--mean", mean), ("--std", std))]
    assert values[0] is not None and values[1] is not None and values[2] is not None
    return Normalization(values[0][0], values[1], values[2])


def _json_option(option: str, text: str | None) -> Any:
    from pipeline.errors import ConfigError

    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise ConfigError(f"{option} is not JSON: {text!r}; e.g. '{{\"encoder_name\": \"resnet34\"}}'.") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option} must be a JSON object, e.g. '{{\"encoder_name\": \"resnet34\"}}'.")
    return value


HYDRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def compose(name: str, overrides: list[str]) -> Any:
    """pipeline/conf/<name>.yaml with Hydra overrides, as `python -m jobs.<name>` sees it."""
    import importlib

    from pipeline.config import compose as compose_layout

    job = importlib.import_module(f"jobs.{name}")
    return compose_layout(getattr(job, name.upper()), overrides)


@app.command(context_settings=HYDRA, options_metavar="[KEY=VALUE]...")
def train(ctx: typer.Context) -> None:
    """Train a model (pipeline/conf/train.yaml with key=value overrides); same as `python -m jobs.train`.

    Arguments: Hydra overrides of pipeline/conf/train.yaml, e.g. image=scene.tif labels=labels.tif steps=400.

    `python -m jobs.train --help` prints every key with its default.
    """
    from jobs.train import describe, to_config, to_distributed, to_tracking
    from pipeline.lifecycle import train_tracked

    with user_errors():
        cfg = compose("train", list(ctx.args))
        tracking, register = to_tracking(cfg)
        typer.echo(describe(train_tracked(to_config(cfg), tracking, register, to_distributed(cfg),
                                          progress=bool(cfg.progress))))


@app.command(context_settings=HYDRA, options_metavar="[KEY=VALUE]...")
def nightly(ctx: typer.Context) -> None:
    """Run one night (pipeline/conf/nightly.yaml with overrides): train a challenger, promote it if better.

    Arguments: Hydra overrides of pipeline/conf/nightly.yaml, e.g. date=2025-01-31 train.catalog=NAME force=true.

    `python -m jobs.nightly --help` prints every key with its default.
    """
    from jobs.nightly import to_config
    from pipeline.lifecycle import nightly as run_nightly

    with user_errors():
        cfg = compose("nightly", list(ctx.args))
        typer.echo(run_nightly(to_config(cfg), progress=bool(cfg.progress)).describe())


schedule_app = typer.Typer(no_args_is_help=True,
                           help="Run the nightly job on its schedule (schedule.cron, schedule.timezone).")
app.add_typer(schedule_app, name="schedule")


def _schedule(overrides: list[str]) -> Any:
    from pipeline.schedule import Schedule

    cfg = compose("nightly", overrides)
    return Schedule(str(cfg.schedule.cron), str(cfg.schedule.timezone))


def _nightly_command(overrides: list[str], address: str | None) -> str:
    """`ray job submit` to a cluster (whose `python` has tessera), or this install's interpreter here:
    cron and systemd do not have the virtual environment on their PATH."""
    from pipeline.schedule import job_command

    return job_command(overrides, address, python="python" if address else sys.executable)


@schedule_app.command("run", context_settings=HYDRA, options_metavar="[OPTIONS] [KEY=VALUE]...")
def schedule_run(
    ctx: typer.Context,
    address: Annotated[str | None, typer.Option(help="Ray dashboard to submit to (default: RAY_ADDRESS, "
                                                     "else the job runs on this machine).")] = None,
    state: Annotated[Path, typer.Option(help="Where the last fired time is kept.")] = Path(".tessera-schedule.json"),
) -> None:
    """Foreground scheduler: start the nightly job at each scheduled time; one catch-up after downtime.

    Arguments: Hydra overrides of pipeline/conf/nightly.yaml, passed to each night's job, e.g. force=true.
    """
    import datetime as dt
    import os
    import subprocess

    from pipeline import schedule, submission

    with user_errors():
        overrides = list(ctx.args)
        plan = _schedule(overrides)
        target = address or os.environ.get("RAY_ADDRESS")

        def fire(when: dt.datetime) -> None:
            night = [*overrides, f"date={when.date().isoformat()}"]
            try:
                if target:
                    typer.echo(f"{when.isoformat()}: submitted {submission.submit(target, 'nightly', night)}")
                else:
                    code = subprocess.call([sys.executable, "-m", "jobs.nightly", *night])
                    typer.echo(f"{when.isoformat()}: nightly exited {code}")
            except Exception as exc:  # the next night must still come: report and keep scheduling
                typer.echo(f"{when.isoformat()}: the nightly job could not be started: {exc}", err=True)

        typer.echo(f"scheduling the nightly job at {plan.cron!r} ({plan.timezone}); state in {state}")
        schedule.run(plan, fire, state)


@schedule_app.command("crontab", context_settings=HYDRA, options_metavar="[OPTIONS] [KEY=VALUE]...")
def schedule_crontab(
    ctx: typer.Context,
    address: Annotated[str | None, typer.Option(help="Ray dashboard for `ray job submit` (default: run here).")] = None,
) -> None:
    """Print a crontab entry that starts the nightly job on schedule (install with `crontab -e`)."""
    from pipeline.schedule import crontab_line

    with user_errors():
        overrides = list(ctx.args)
        typer.echo(crontab_line(_schedule(overrides), _nightly_command(overrides, address), str(Path.cwd())), nl=False)


@schedule_app.command("systemd", context_settings=HYDRA, options_metavar="[OPTIONS] [KEY=VALUE]...")
def schedule_systemd(
    ctx: typer.Context,
    address: Annotated[str | None, typer.Option(help="Ray dashboard for `ray job submit` (default: run here).")] = None,
) -> None:
    """Print a systemd service and timer (Persistent=true: one catch-up after downtime)."""
    from pipeline.schedule import systemd_units

    with user_errors():
        overrides = list(ctx.args)
        units = systemd_units(_schedule(overrides), _nightly_command(overrides, address), str(Path.cwd()))
        for name, text in units.items():
            typer.echo(f"# /etc/systemd/system/{name}\n{text}")


jobs_app = typer.Typer(no_args_is_help=True, help="Jobs on a Ray cluster (the Ray Jobs API).")
app.add_typer(jobs_app, name="jobs")
ADDRESS = typer.Option("--address", help="Ray dashboard address, e.g. http://head:8265 (default: RAY_ADDRESS).")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="segment, refine, train or nightly.")],
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
