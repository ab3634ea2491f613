"""Images on object storage read in place through GDAL's /vsis3/, against the real S3 server on 127.0.0.1."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import SourceNotFoundError
from pipeline.sources import open_source
from pipeline.storage import Location, storage_for
from pipeline.storage.gdal import gdal_options
from tests.conftest import smooth_image, write_geotiff


def test_the_endpoint_boto_reads_becomes_gdals_own() -> None:
    assert gdal_options({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}) == {
        "AWS_S3_ENDPOINT": "127.0.0.1:9000", "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE"}
    # The S3-specific variable wins over the general one; https stays https.
    assert gdal_options({"AWS_ENDPOINT_URL": "http://other:1", "AWS_ENDPOINT_URL_S3": "https://s3.lab.org/"}) == {
        "AWS_S3_ENDPOINT": "s3.lab.org", "AWS_HTTPS": "YES", "AWS_VIRTUAL_HOSTING": "FALSE"}
    assert gdal_options({}) == {}  # AWS itself: GDAL's defaults
    assert gdal_options({"AWS_ENDPOINT_URL": "http://a:1", "AWS_S3_ENDPOINT": "b:2"}) == {}  # the user's GDAL setting


def test_a_geotiff_on_s3_reads_as_the_local_file(s3_bucket: str, tmp_path: Path) -> None:
    local = write_geotiff(tmp_path / "scene.tif", smooth_image(300, 260, seed=4))
    url = Location.parse(f"{s3_bucket}/in/scene.tif")
    storage_for(url).write_bytes(url, local.read_bytes())
    with open_source(url.url) as remote, open_source(str(local)) as disk:
        assert (remote.height, remote.width, remote.crs) == (disk.height, disk.width, disk.crs)
        np.testing.assert_array_equal(remote.read(0, 0, 300, 260), disk.read(0, 0, 300, 260))
        again = pickle.loads(pickle.dumps(remote))  # as a worker gets it: path and level, opened there
        np.testing.assert_array_equal(again.read(20, 30, 64, 64), disk.read(20, 30, 64, 64))
    with pytest.raises(SourceNotFoundError, match=r"s3://.*/in/missing.tif does not exist"):
        open_source(f"{s3_bucket}/in/missing.tif")
