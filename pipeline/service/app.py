"""The read-only HTTP query service: `tessera serve ROOT` serves the mosaics under ROOT.

Every parameter is validated by FastAPI before any read; a mosaic is named by its path relative to
ROOT and must resolve (symlinks followed) to a mosaic inside ROOT; reads are bounded in pixels and
bodies in bytes. Errors are 4xx with a message: 404 unknown mosaic, 413 too large, 422 a region,
level or geometry that does not fit. The viewer (viewer/) is served from the same app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Body, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware

from pipeline.errors import ContainmentError, GivenUpError, MosaicError, RegionError, TesseraError
from pipeline.mosaic import Mosaic, is_mosaic
from pipeline.query.containment import is_contained_mosaic, open_contained
from pipeline.query.export import grey_png, mask_png, npy_bytes
from pipeline.query.info import mosaic_info, mosaic_summary
from pipeline.query.region import read_window
from pipeline.query.source_tiles import SourcePyramid, source_pyramid
from pipeline.query.stats import class_areas, mosaic_stats
from pipeline.query.tiles import (
    ORIGIN,
    TILE,
    WEB_MERCATOR,
    MosaicLayer,
    Pyramid,
    pixel_max_zoom,
    pixel_tile,
    point,
    pointer_grid,
    xyz_tile,
)
from pipeline.query.vector import FIX, VectorLimits
from pipeline.query.window import (
    WGS84,
    RegionTooLargeError,
    bounds_in,
    check_size,
    level_transform,
    parse_bbox,
    parse_window,
    resolve,
)
from pipeline.service.access import TokenGate
from pipeline.service.cost import CANCELLED, HeavyRequests
from pipeline.service.headers import SecurityHeaders
from pipeline.storage import Location, storage_for

VIEWER = Path(__file__).parent / "viewer"


def vendor_folder(name: str) -> Path:
    """Where the npm files served at /vendor/NAME/ are (viewer/assets.json): inside an installed package,
    copied there at build time (setup.py); in a checkout, the viewer's node_modules (`make` runs npm ci)."""
    built = VIEWER / "vendor" / name
    if built.is_dir():
        return built
    spec = json.loads((VIEWER / "assets.json").read_text())[name]
    return VIEWER / "node_modules" / spec["package"] / spec["folder"]


LEAFLET = vendor_folder("leaflet")
SWAGGER_UI = vendor_folder("swagger-ui")  # /docs, served here: a cluster may have no way out
MOSAIC_ID = r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$"
CRS_CODE = r"^(EPSG|ESRI|OGC|IAU_2015):[A-Za-z0-9_]{1,20}$"
NUMBERS = r"^-?[0-9.eE+-]+(,-?[0-9.eE+-]+){3}$"
INTEGERS = r"^-?[0-9]{1,9}(,-?[0-9]{1,9}){3}$"
CLASS_IDS = r"^[0-9]{1,3}(,[0-9]{1,3})*$"
MAX_DEPTH = 4  # folders below ROOT searched for mosaics

log = logging.getLogger(__name__)


# Measured server memory for one region.npy of a 4096 x 4096 mask: about 9 bytes a pixel (the zarr
# read, its chunks, the .npy copy, the body); a polygon answer about 250 bytes a vertex (shapely, the
# GeoJSON dicts, the rendered text). docs/query.md, "What a request may cost".
REGION_BYTES_PER_PIXEL = 10
VECTOR_BYTES_PER_VERTEX = 250


@dataclass(frozen=True)
class Limits:
    """What one request may cost, and what all of them together may."""

    region_pixels: int = 4096 * 4096  # region.png / region.npy
    vector_pixels: int = 2048 * 2048  # polygons.geojson
    polygon_features: int = 100_000  # polygons.geojson: features, vertices and bytes of one answer
    polygon_vertices: int = 1_000_000
    polygon_bytes: int = 64 << 20
    stats_pixels: int = 2**28  # whole-level statistics (dask, out of core)
    body_bytes: int = 1 << 20  # a posted polygon
    memory_bytes: int | None = None  # for heavy requests at once; None: a quarter of the machine's memory
    queue_s: float = 5.0  # how long a heavy request waits for room before a 503
    request_timeout_s: float = 10.0  # to send a request's head, or each part of its body

    def request_bytes(self) -> int:
        """The most memory one heavy request may take (its answer and the copies made on the way)."""
        return max(self.region_pixels * REGION_BYTES_PER_PIXEL, self.polygon_vertices * VECTOR_BYTES_PER_VERTEX)

    def heavy_slots(self) -> int:
        """How many heavy requests run at once: the memory budget over one request's most (at least one)."""
        budget = self.memory_bytes
        if budget is None:
            import psutil

            budget = psutil.virtual_memory().total // 4
        return max(1, budget // self.request_bytes())


MosaicId = Annotated[str, PathParam(pattern=MOSAIC_ID, max_length=512,
                                    description="The mosaic's folder relative to ROOT, e.g. scene.zarr")]
Level = Annotated[int | None, Query(ge=0, le=40, description="Pyramid level (0 = full resolution).")]
Resolution = Annotated[float | None, Query(gt=0, le=1e9, description="Pixel size in the mosaic's units.")]
WindowParam = Annotated[str | None, Query(pattern=INTEGERS, max_length=64,
                                          description="y0,x0,y1,x1 in pixels of the level.")]
BBoxParam = Annotated[str | None, Query(pattern=NUMBERS, max_length=128,
                                        description="min x,min y,max x,max y in crs (default the mosaic's).")]
CrsParam = Annotated[str | None, Query(pattern=CRS_CODE, max_length=40, description="e.g. EPSG:4326.")]
# A layer the map shows; uncertainty and spread only where the mosaic has them (its metadata's `layers`).
MapLayer = Literal["mask", "confidence", "uncertainty", "spread"]


class AreasRequest(BaseModel):
    polygon: dict[str, Any] = Field(description="A GeoJSON Polygon or MultiPolygon (or a Feature).")
    crs: str | None = Field(None, pattern=CRS_CODE, max_length=40, description="The polygon's CRS.")
    level: int = Field(0, ge=0, le=40)


PNG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}, "description": "A PNG image."}}
NPY: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "A NumPy .npy array."}}


def create_app(root: str | Path, limits: Limits | None = None, source_folders: Sequence[str | Path] = (),
               token: str | None = None, allowed_hosts: Sequence[str] = ("*",)) -> FastAPI:
    """The service for the mosaics under `root` (read-only).

    Args:
        source_folders: where source images may be read for the viewer's preview, besides `root`
            (a mosaic names its source; only sources inside these folders are opened).
        token: when given, every request must carry it (`pipeline.service.access.TokenGate`).
        allowed_hosts: the Host names answered to (``*``: any); others get 400.
    """
    where = Location.parse(root)
    if where.is_local:
        base: Path | Location = where.local_path().resolve()
        if not base.is_dir():  # type: ignore[union-attr]
            raise MosaicError(f"{root} is not a folder: give the folder that holds your .zarr mosaics")
    else:  # object storage: a prefix; an unreachable store or a missing bucket fails here, in one line
        storage_for(where).check(where)
        base = where
    sources = [Path(f).resolve() for f in source_folders]
    for folder in sources:
        if not folder.is_dir():
            raise MosaicError(f"--sources {folder} is not a folder")
    lim = limits or Limits()
    cache = _Cache()
    finder = _Finder(base)
    hidden = [str(p) for p in (base if isinstance(base, Path) else None, *sources) if p is not None]

    def public(message: str) -> str:
        """`message` without the server's paths: ROOT's and the source folders' own, and any other."""
        return _without_paths(message, hidden)

    app = FastAPI(title="tessera", version="1", description=__doc__, docs_url=None, redoc_url=None)
    app.add_middleware(HeavyRequests, slots=lim.heavy_slots(), wait_s=lim.queue_s)
    app.add_middleware(BodyLimit, limit=lim.body_bytes, timeout=lim.request_timeout_s)
    if token is not None:
        app.add_middleware(TokenGate, token=token)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.add_middleware(SecurityHeaders)  # the outermost: a 400, 401 or 413 has the headers too

    @app.exception_handler(TesseraError)
    async def tessera_error(request: Request, e: TesseraError) -> JSONResponse:
        status = (413 if isinstance(e, RegionTooLargeError) else 404 if isinstance(e, MosaicError)
                  else 403 if isinstance(e, ContainmentError) else 499 if isinstance(e, GivenUpError) else 422)
        if e.__cause__ is not None:  # the library's own words (PROJ, GEOS, GDAL) go to the server's log
            log.info("%s %s: %s (%r)", request.method, request.url.path, e, e.__cause__)
        return JSONResponse({"detail": public(str(e))}, status_code=status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        if _in_zarr(e):  # a chunk cut short or overwritten: the mosaic is damaged, the request is fine
            log.warning("%s %s: damaged data: %r", request.method, request.url.path, e)
            return JSONResponse({"detail": "this part of the mosaic cannot be read: a chunk is damaged (its checksum "
                                           "or decoding failed); write the mosaic again with `tessera segment`"},
                                status_code=422)
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": "the server failed to answer; its log has the details"}, status_code=500)

    polygon_limits = VectorLimits(features=lim.polygon_features, vertices=lim.polygon_vertices,
                                  bytes=lim.polygon_bytes)

    def mosaic(mid: str) -> Mosaic:
        return cache.mosaic(base, mid)

    def source_image(mid: str, m: Mosaic) -> SourcePyramid:
        def make() -> SourcePyramid:
            try:
                return source_pyramid(m, allowed=[*([base] if isinstance(base, Path) else []), *sources])
            except RegionError as e:
                raise MosaicError(str(e)) from None  # no source image: 404; the mask still shows

        return cache.once((mid, cache.stamp(mid), "source"), make)

    def region_window(m: Mosaic, window: str | None, bbox: str | None, crs: str | None, level: int | None,
                      resolution: float | None, max_pixels: int) -> Any:
        win = resolve(m.layout, window=parse_window(window), bbox=parse_bbox(bbox), crs=crs, level=level,
                      resolution=resolution)
        check_size(win, max_pixels)
        return win

    @app.get("/api/mosaics", summary="The mosaics under ROOT")
    def list_mosaics() -> list[dict[str, Any]]:
        listed = []
        for mid in finder.find():
            try:
                listed.append({"id": mid, **mosaic_summary(cache.mosaic(base, mid))})
            except TesseraError as e:  # a damaged mosaic is listed with its problem, the others as they are
                listed.append({"id": mid, "error": public(str(e))})
            except Exception as e:  # whatever else one mosaic raises, the listing answers
                log.warning("mosaic %s cannot be listed: %r", mid, e)
                listed.append({"id": mid, "error": f"mosaic {mid!r} cannot be read ({_kind(e)})"})
        return listed

    @app.get("/api/mosaics/{mid:path}/region.png", summary="A region as PNG", response_class=Response, responses=PNG)
    def region_png(mid: MosaicId, layer: MapLayer = "mask", window: WindowParam = None,
                   bbox: BBoxParam = None, crs: CrsParam = None, level: Level = None,
                   resolution: Resolution = None) -> Response:
        m = mosaic(mid)
        win = region_window(m, window, bbox, crs, level, resolution, lim.region_pixels)
        values = read_window(m, win, layer)
        png = mask_png(values, m.palette) if layer == "mask" else grey_png(values)
        return Response(png, media_type="image/png")

    @app.get("/api/mosaics/{mid:path}/region.npy", summary="A region as a NumPy array", response_class=Response,
             responses=NPY)
    def region_npy(mid: MosaicId, layer: Literal["mask", "confidence", "scores", "uncertainty", "spread"] = "mask",
                   window: WindowParam = None, bbox: BBoxParam = None, crs: CrsParam = None, level: Level = None,
                   resolution: Resolution = None) -> Response:
        m = mosaic(mid)
        per_pixel = len(m.layout.classes) if layer == "scores" else 1  # scores: one value per class
        win = region_window(m, window, bbox, crs, level, resolution, lim.region_pixels // per_pixel)
        return Response(npy_bytes(read_window(m, win, layer)), media_type="application/octet-stream")

    @app.get("/api/mosaics/{mid:path}/tiles/{z}/{x}/{y}.png", summary="A map tile", response_class=Response,
             responses=PNG)
    def tile(mid: MosaicId, z: Annotated[int, PathParam(ge=0, le=30)], x: Annotated[int, PathParam(ge=0)],
             y: Annotated[int, PathParam(ge=0)], layer: MapLayer | Literal["source"] = "mask",
             hide: Annotated[str | None, Query(pattern=CLASS_IDS, max_length=1024,
                                               description="Class ids the mask tile leaves transparent, "
                                                           "e.g. 1,3.")] = None) -> Response:
        m = mosaic(mid)
        pyramid: Pyramid = source_image(mid, m) if layer == "source" else MosaicLayer(m, layer)
        if m.layout.crs:
            values = xyz_tile(pyramid, z, x, y)
        else:  # the mask's pixel pyramid, whatever the layer, so that layers stay in register
            values = pixel_tile(pyramid, z, x, y, frame=level_transform(m.layout, 0),
                                shape=m.layout.level_shape(0))
        if layer == "mask":
            if hide:  # the viewer's class toggles: hidden classes are drawn as nodata is
                values[0][np.isin(values[0], [int(c) for c in hide.split(",")])] = m.layout.mask_nodata
            return Response(mask_png(values[0], m.palette), media_type="image/png")
        if layer == "source":
            return Response(_rgba_png(values), media_type="image/png")
        return Response(grey_png(values[0]), media_type="image/png")  # confidence, uncertainty, spread: [0, 1]

    @app.get("/api/mosaics/{mid:path}/point", summary="Class and confidence at a point")
    def at_point(mid: MosaicId, x: Annotated[float, Query(ge=-1e12, le=1e12)],
                 y: Annotated[float, Query(ge=-1e12, le=1e12)], crs: CrsParam = None,
                 level: Annotated[int, Query(ge=0, le=40)] = 0) -> dict[str, Any]:
        return point(mosaic(mid), x, y, crs, level)

    @app.get("/api/mosaics/{mid:path}/stats", summary="Per-class areas of a region, or of the whole level")
    def stats(mid: MosaicId, window: WindowParam = None, bbox: BBoxParam = None, crs: CrsParam = None,
              level: Level = None) -> dict[str, Any]:
        m = mosaic(mid)
        if window is None and bbox is None:
            if crs is not None:
                raise RegionError("crs applies to a bbox; give one")
            win = resolve(m.layout, level=level or 0)
            check_size(win, lim.stats_pixels)  # out of core, but its time grows with the level's size
            return cache.once((mid, cache.stamp(mid), "stats", win.level),
                              lambda: mosaic_stats(m, win.level).to_dict())
        # A region is counted in memory: the region limit applies.
        return class_areas(m, window=parse_window(window), bbox=parse_bbox(bbox), crs=crs, level=level,
                           max_pixels=lim.region_pixels).to_dict()

    @app.post("/api/mosaics/{mid:path}/areas", summary="Per-class areas inside a GeoJSON polygon")
    def areas(mid: MosaicId, request: Annotated[AreasRequest, Body()]) -> dict[str, Any]:
        m = mosaic(mid)
        return class_areas(m, polygon=request.polygon, crs=request.crs, level=request.level,
                           max_pixels=lim.region_pixels).to_dict()

    @app.get("/api/mosaics/{mid:path}/polygons.geojson", summary="The class mask of a region as GeoJSON")
    def polygons(request: Request, mid: MosaicId, window: WindowParam = None, bbox: BBoxParam = None,
                 crs: CrsParam = None, level: Level = None, resolution: Resolution = None,
                 classes: Annotated[str | None, Query(max_length=1000, description="Comma-separated names.")] = None,
                 simplify: Annotated[float, Query(ge=0, le=1e9)] = 0.0,
                 out_crs: CrsParam = None,
                 format: Annotated[Literal["geojson", "qupath"], Query(
                     description="qupath: QuPath objects (classification name and colour) in pixels of level 0, "
                                 "class 0 left out unless named in classes= or background=true")] = "geojson",
                 background: Annotated[bool, Query(description="qupath: keep class 0.")] = False,
                 downsample: Annotated[float | None, Query(gt=0, le=1e6, description=(
                     "qupath: the downsample of the source level the mosaic was segmented from, when not 0."))] = None,
                 ) -> Response:
        from pipeline.query.vector_export import vector_collection

        m = mosaic(mid)
        region: dict[str, Any] = {
            "window": parse_window(window), "bbox": parse_bbox(bbox), "crs": crs, "level": level,
            "resolution": resolution, "classes": classes.split(",") if classes else None, "simplify": simplify,
            "max_pixels": lim.vector_pixels, "limits": polygon_limits, "cancelled": request.scope.get(CANCELLED)}
        collection = vector_collection(m, format, out_crs=out_crs, background=background, downsample=downsample,
                                       **region)
        body = json.dumps(collection, ensure_ascii=False, separators=(",", ":")).encode()  # rendered once, then checked
        del collection
        if len(body) > lim.polygon_bytes:
            raise RegionTooLargeError(f"the polygons of this region have {len(body)} bytes of GeoJSON, over the "
                                      f"limit of {lim.polygon_bytes}: {FIX}")
        return Response(body, media_type="application/geo+json")

    @app.get("/api/mosaics/{mid:path}", summary="A mosaic's metadata")
    def metadata(mid: MosaicId) -> dict[str, Any]:
        m = mosaic(mid)
        return {"id": mid, **mosaic_info(m), "tiles": tile_scheme(mid, m)}

    @app.get("/", summary="The viewer's index of mosaics", response_class=FileResponse, include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(VIEWER / "index.html")

    @app.get("/view/{mid:path}", summary="The viewer for one mosaic", response_class=FileResponse,
             include_in_schema=False)
    def view(mid: MosaicId) -> FileResponse:
        mosaic(mid)
        return FileResponse(VIEWER / "viewer.html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        """The interactive API page: Swagger UI from the viewer's npm packages, not a CDN (FastAPI's own page
        fetches it from one and starts it with an inline script, which the CSP refuses; static/docs.js does)."""
        if not SWAGGER_UI.is_dir():
            return JSONResponse({"detail": "Swagger UI is not installed: run `npm ci` in pipeline/service/viewer "
                                           "(`make` does); the schema is at /openapi.json"}, status_code=404)
        return FileResponse(VIEWER / "docs.html")

    app.mount("/static", StaticFiles(directory=VIEWER / "static"), name="static")
    for url, folder in (("/vendor/leaflet", LEAFLET), ("/vendor/swagger-ui", SWAGGER_UI)):
        if folder.is_dir():
            app.mount(url, StaticFiles(directory=folder), name=url)
    return app


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413, whether it states its length or is
    sent in chunks (counted as it arrives, before anything parses it); one whose next part takes over
    `timeout` seconds to come gets 408."""

    def __init__(self, app: Any, limit: int, timeout: float) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await JSONResponse({"detail": f"request body over {self.limit} bytes"}, status_code=413)(
                scope, receive, send)
            return
        received = 0
        complete = False

        async def counted() -> Any:
            nonlocal received, complete
            if complete:  # the body is in: what comes next is a disconnect, whenever it comes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except TimeoutError:
                raise HTTPException(408, f"the request body stalled for over {self.timeout:g} s") from None
            complete = not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, counted, send)


class _Finder:
    """The mosaic folders under `base` (not following links out of it, not looking inside mosaics).

    On a disk, a folder's `zarr.json` is parsed only when it is new or changed (its size and time): a
    listing then costs a walk and one stat per folder, however many mosaics ROOT holds.
    """

    def __init__(self, base: Path | Location) -> None:
        self.base = base
        self._seen: dict[str, tuple[int, int, bool]] = {}  # zarr.json -> (size, mtime_ns, is a mosaic)
        self._lock = threading.Lock()

    def find(self) -> list[str]:
        found: list[str] = []
        base = self.base
        if isinstance(base, Location):
            storage = storage_for(base)

            def walk_prefix(folder: Location, depth: int) -> None:
                for name in storage.list(folder):
                    if name.startswith("."):
                        continue
                    inner = folder.join(name)
                    if is_mosaic(inner):
                        found.append(inner.path.removeprefix(base.path + "/"))
                    elif depth < MAX_DEPTH:
                        walk_prefix(inner, depth + 1)

            walk_prefix(base, 1)
            return found

        def walk(folder: Path, depth: int) -> None:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                return
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_dir():
                    continue
                path = Path(entry.path)
                if not path.resolve().is_relative_to(base):
                    continue
                if self._is_mosaic(path):
                    found.append(path.relative_to(base).as_posix())
                elif depth < MAX_DEPTH:
                    walk(path, depth + 1)

        walk(base, 1)
        return found

    def _is_mosaic(self, folder: Path) -> bool:
        document = folder / "zarr.json"
        try:
            st = document.stat()
        except OSError:
            return False
        key = str(document)
        with self._lock:
            hit = self._seen.get(key)
        if hit is not None and hit[:2] == (st.st_size, st.st_mtime_ns):
            return hit[2]
        try:
            answer = is_contained_mosaic(self.base, folder.resolve())  # type: ignore[arg-type]  # local: a Path
        except ContainmentError:
            answer = True  # listed, with the reason it cannot be read
        with self._lock:
            self._seen[key] = (st.st_size, st.st_mtime_ns, answer)
        return answer


_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s'\"/,;()<>]+/)+[^\s'\"/,;()<>]*")
_ROUTES = ("/api/", "/static/", "/view/", "/vendor/", "/docs")


def _without_paths(message: str, hidden: Sequence[str]) -> str:
    """`message` with the server's absolute paths taken out: below a `hidden` folder (ROOT, a source
    folder) a path becomes relative to it, any other keeps its last part only (the service's own
    routes, /api/..., stay)."""
    for folder in sorted(hidden, key=len, reverse=True):
        message = message.replace(folder.rstrip("/") + "/", "")

    def shorten(match: re.Match[str]) -> str:
        path = match.group(0)
        return path if path.startswith(_ROUTES) else ".../" + path.rstrip("/").rsplit("/", 1)[-1]

    return _PATH.sub(shorten, message)


def _in_zarr(e: BaseException) -> bool:
    """Whether `e` was raised inside zarr or its codecs (decoding a chunk), not in tessera's own code."""
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and any(part in frames[-1].filename for part in ("/zarr/", "/numcodecs/"))


def _kind(e: BaseException) -> str:
    """What went wrong, in a few words without paths: the exception's type and, for a missing key, the key."""
    if isinstance(e, KeyError) and e.args:
        return f"missing {e.args[0]!r}"
    return type(e).__name__


def tile_scheme(mid: str, m: Mosaic) -> dict[str, Any]:
    """How the viewer asks for tiles: Web Mercator XYZ for geo mosaics, the pixel pyramid otherwise."""
    layout = m.layout
    url = f"/api/mosaics/{mid}/tiles/{{z}}/{{x}}/{{y}}.png"
    if layout.crs:
        w, s, e, n = bounds_in(layout, WGS84)
        minx, _, maxx, _ = bounds_in(layout, WEB_MERCATOR)
        metres = (maxx - minx) / layout.width  # a level-0 pixel in Web Mercator metres
        top = max(0, min(24, round(math.log2(2 * ORIGIN / TILE / metres))))
        return {"scheme": "xyz", "url": url, "min_zoom": max(0, top - layout.num_levels - 3), "max_zoom": top,
                "bounds": [w, s, e, n], "pointer_grid": pointer_grid(layout)}
    return {"scheme": "pixel", "url": url, "min_zoom": 0, "max_zoom": pixel_max_zoom(layout.level_shape(0), TILE),
            "tile": TILE, "size": [layout.height, layout.width]}


def _rgba_png(values: Any) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(values.transpose(1, 2, 0), mode="RGBA").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class _Cache:
    """Open mosaics, source previews and whole-level statistics, keyed by the mosaic's metadata file
    time, so a mosaic rewritten by a job is read afresh (and its old entries dropped).

    A preview or a statistic is computed once: concurrent requests for it wait for the first one
    (the viewer asks for a dozen source tiles at once). A preview that cannot be made is remembered
    as such, so later tiles fail fast.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mosaics: dict[str, tuple[float | str, Mosaic]] = {}
        self._values: dict[tuple[Any, ...], Any] = {}
        self._computing: dict[tuple[Any, ...], threading.Lock] = {}

    def mosaic(self, base: Path | Location, mid: str) -> Mosaic:
        """The open mosaic `mid` names; a request costs a path check and one stat (on object storage,
        one HEAD) while it is unchanged."""
        path = _inside(base, mid)
        try:
            if isinstance(path, Location):
                version = storage_for(path).version(path.join("zarr.json"))
                if version is None:
                    raise FileNotFoundError(path)
                stamp: float | str = version.tag
            else:
                stamp = (path / "zarr.json").stat().st_mtime
        except OSError:
            raise MosaicError(f"no mosaic {mid!r} under the served folder: GET /api/mosaics lists them") from None
        with self._lock:
            hit = self._mosaics.get(mid)
            if hit and hit[0] == stamp:
                return hit[1]
        # A local mosaic's files, zarr.json first, are read following no link inside it (containment.py).
        if not (is_mosaic(path) if isinstance(path, Location) else is_contained_mosaic(base, path)):  # type: ignore[arg-type]
            raise MosaicError(f"no mosaic {mid!r} under the served folder: GET /api/mosaics lists them")
        try:
            m = Mosaic.open(path) if isinstance(path, Location) else open_contained(base, path)  # type: ignore[arg-type]
            mosaic_summary(m)  # what every answer reads first: the layout and the classes
        except TesseraError:
            raise
        except Exception as e:  # zarr's, JSON's or the layout's own errors: a mosaic written wrong, or cut short
            log.info("mosaic %s cannot be read: %r", mid, e)
            raise MosaicError(f"mosaic {mid!r} cannot be read: its metadata is damaged ({_kind(e)}); write it "
                              "again with `tessera segment`") from e
        with self._lock:
            self._mosaics[mid] = (stamp, m)
            for key in [k for k in self._values if k[0] == mid and k[1] != stamp]:
                del self._values[key]
        return m

    def once(self, key: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
        """The value for `key`, computing it at most once at a time; a raised TesseraError is kept too."""
        with self._lock:
            gate = self._computing.setdefault(key, threading.Lock()) if key not in self._values else None
        if gate is not None:
            with gate:
                with self._lock:
                    done = key in self._values
                if not done:
                    try:
                        value: Any = compute()
                    except TesseraError as e:
                        value = e
                    with self._lock:
                        self._values[key] = value
                        self._computing.pop(key, None)
        with self._lock:
            value = self._values[key]
        if isinstance(value, TesseraError):
            raise value
        return value

    def stamp(self, mid: str) -> float | str:
        """The metadata time of the mosaic as `mosaic` last opened it (call that first)."""
        with self._lock:
            return self._mosaics[mid][0]


def _inside(base: Path | Location, mid: str) -> Path | Location:
    """The mosaic folder `mid` names, refusing anything that resolves outside `base`."""
    if not re.fullmatch(MOSAIC_ID, mid) or ".." in mid.split("/"):
        raise MosaicError(f"no mosaic {mid!r}: GET /api/mosaics lists the mosaics served")
    if isinstance(base, Location):  # keys have no links: the checked name stays under the prefix
        return base.join(mid)
    path = (base / mid).resolve()
    if not path.is_relative_to(base):
        raise MosaicError(f"no mosaic {mid!r} under the served folder: GET /api/mosaics lists them")
    return path

