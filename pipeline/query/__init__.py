"""Questions to a finished mosaic, answered without reading it whole.

    from pipeline import query
    from pipeline.mosaic import Mosaic

    m = Mosaic.open("scene.zarr")                      # or "s3://bucket/scene.zarr"
    query.read_region(m, bbox=(-84.39, 33.77, -84.38, 33.78), crs="EPSG:4326", as_xarray=True)
    query.class_areas(m, polygon=field_geojson, crs="EPSG:4326")   # m^2 per class
    query.vectorize(m, classes=["building"], simplify=1.0, out_crs="EPSG:4326")
    query.export_cog(m, "mask.tif")
    query.export_vectors(m, "cells.geojson", "qupath")   # or .gpkg / .fgb; query.qupath_objects(m) as a dict
    query.mosaic_stats(m)                              # whole image, out of core (dask)

Every region is resolved the same way (`window.resolve`): a pixel window or a bbox in any CRS, at a
pyramid level or a target resolution. docs/query.md describes each call, the CLI and the service.
"""

from pipeline.query.export import export_cog, export_png
from pipeline.query.region import read_region
from pipeline.query.stats import ClassAreas, class_areas, mosaic_stats
from pipeline.query.tiles import pixel_tile, point, xyz_tile
from pipeline.query.vector import vectorize
from pipeline.query.vector_export import export_vectors, qupath_objects
from pipeline.query.window import Window, resolve

__all__ = [
    "ClassAreas",
    "Window",
    "class_areas",
    "export_cog",
    "export_png",
    "export_vectors",
    "mosaic_stats",
    "pixel_tile",
    "point",
    "qupath_objects",
    "read_region",
    "resolve",
    "vectorize",
    "xyz_tile",
]
