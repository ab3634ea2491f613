"""Shared fixtures: a real embedded Ray for the session, seeded rasters, small model bundles."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from pipeline.models.bundle import BundleSpec, ClassInfo, ModelBundle, Normalization
from tests.servers.ports import ServerIdentityError, check_own_server, free_port, start_server, tcp_answers

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest modules first: `make test` runs two workers, one module at a time each (`--dist
    loadfile --no-loadscope-reorder`), and a long module handed out last keeps one worker busy while the
    other has nothing left to do. A module's length is the sum of its tests': `slow(seconds=N)` where
    measured (N: its time in `make test`), 10 s for another slow test, 1 s for the rest."""

    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    def seconds(item: pytest.Item) -> float:
        slow = item.get_closest_marker("slow")
        return 1.0 if slow is None else float(slow.kwargs.get("seconds", 10))

    length: Counter[str] = Counter()
    for item in items:
        length[module(item)] += seconds(item)
    first_seen = {name: k for k, name in enumerate(dict.fromkeys(module(i) for i in items))}
    items.sort(key=lambda i: (-length[module(i)], first_seen[module(i)]))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repo; absent on a user's fresh clone, always present in CI."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA} (CI always has it)")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def tessera_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """tessera's cache (registry downloads, converted programs) in a throwaway folder, not the user's."""
    import os

    folder = tmp_path_factory.mktemp("tessera-cache")
    before = os.environ.get("TESSERA_CACHE")
    os.environ["TESSERA_CACHE"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("TESSERA_CACHE", None)
    else:
        os.environ["TESSERA_CACHE"] = before


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Every job the tests run is tracked in a throwaway MLflow store (subprocesses inherit it)."""
    import os

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One real embedded Ray for the tests that run jobs in-process (started here, stopped after)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


def pytest_configure(config: pytest.Config) -> None:
    # Object storage in the tests is a real S3 server (moto's) on 127.0.0.1, one per test process,
    # started by the `s3_server` fixture on first use. Its address and credentials go into the
    # environment now, before any Ray starts, so that Ray workers read them as boto does on a cluster.
    # Each pytest process its own port: xdist's workers inherit the environment of the process that
    # started them.
    if os.environ.get("TESSERA_TEST_S3_PID") != str(os.getpid()):
        port = free_port()
        os.environ.update({
            "TESSERA_TEST_S3_PID": str(os.getpid()), "TESSERA_TEST_S3_PORT": str(port),
            "AWS_ACCESS_KEY_ID": "tessera-test", "AWS_SECRET_ACCESS_KEY": "tessera-test",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        })
        # Azure Blob Storage likewise (Azurite, the `azure_server` fixture), with the emulator's
        # well-known development account, which is public.
        port = free_port()
        os.environ.update({
            "TESSERA_TEST_AZURE_PORT": str(port),
            "AZURE_STORAGE_CONNECTION_STRING": (
                f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
                f"BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};"),
        })


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-compatible server (moto) on 127.0.0.1, started here and stopped after; its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = int(os.environ["TESSERA_TEST_S3_PORT"])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    deadline = time.monotonic() + 20
    while not tcp_answers(port):  # answering, or fail now rather than at each test's timeout
        if time.monotonic() > deadline:
            raise RuntimeError(f"the test S3 server did not start on 127.0.0.1:{port}")
        time.sleep(0.1)
    check_own_server(os.getpid(), port)  # its thread listens in this process, not a stranger
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A new, empty bucket on the test S3 server: its URL, ``s3://NAME``."""
    import s3fs

    name = f"tessera-{os.urandom(4).hex()}"
    s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE = REPO / "tests" / "servers" / "node_modules" / ".bin" / "azurite-blob"


@pytest.fixture(scope="session")
def azure_server() -> Iterator[str]:
    """A real Azure Blob Storage server (Azurite, from npm: `make test` installs it) on 127.0.0.1,
    started here and stopped after; its blob endpoint."""
    if not AZURITE.exists():
        raise RuntimeError(f"{AZURITE} is missing: run `make test`, or `npm ci` in tests/servers")
    # The port is fixed (the environment already names it, for Ray workers): one attempt, checked ours.
    process, port = start_server(lambda port: subprocess.Popen(
        [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
         "--skipApiVersionCheck", "--silent"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        port=int(os.environ["TESSERA_TEST_AZURE_PORT"]), seconds=30)
    yield f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    process.kill()  # in memory: nothing to keep
    process.wait(10)


@pytest.fixture
def azure_container(azure_server: str) -> str:
    """A new, empty container on the test Azure server: its URL, ``az://NAME``."""
    import fsspec

    name = f"tessera-{os.urandom(4).hex()}"
    fsspec.filesystem("az", connection_string=os.environ["AZURE_STORAGE_CONNECTION_STRING"],
                      skip_instance_cache=True).mkdir(name)
    return f"az://{name}"


@pytest.fixture
def unreachable_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face hub that does not answer (nothing listens on its port) and an empty cache, returned."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@dataclass(frozen=True)
class RayHead:
    """A `ray start --head` on 127.0.0.1, on ports of its own."""

    process: subprocess.Popen[bytes]
    gcs: str  # host:port, the address `ray.init` joins
    client: str  # ray://host:port, its Ray Client server
    dashboard: str  # http://host:port, its dashboard and Jobs API


def start_head(temp: str, log: Path, env: Mapping[str, str]) -> RayHead:
    """`ray start --head` with `env` added to this process's; returned once its dashboard and Ray Client answer.

    Raises:
        RuntimeError: the head exited before it answered (the log's tail says why) or took over 120 s.
    """
    port, dashboard, agent, agent_grpc, metrics, runtime_env, client = (free_port() for _ in range(7))
    # GRPC_ENABLE_FORK_SUPPORT=0 as docs/cluster.md advises: Ray Client's per-driver server, forked from a
    # multi-threaded gRPC server, otherwise crashed at start in 4 joins of 5 here (ray-project/ray#63202).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "GRPC_ENABLE_FORK_SUPPORT": "0", **env}
    with log.open("ab") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
             # Every port of its own: the suite's embedded Rays already hold the default ones.
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
             f"--ray-client-server-port={client}", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp}"],
            env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT,
        )
    head = RayHead(process, f"127.0.0.1:{port}", f"ray://127.0.0.1:{client}", f"http://127.0.0.1:{dashboard}")
    deadline = time.monotonic() + 120
    while True:
        with contextlib.suppress(OSError):
            try:
                urllib.request.urlopen(f"{head.dashboard}/api/version", timeout=2)
            except urllib.error.HTTPError as answer:
                if answer.code != 401:  # a head with token authentication answers 401: it is up
                    raise
            socket.create_connection(("127.0.0.1", client), timeout=2).close()
            try:  # answered by this head, not by another test's Ray that took the port first
                for own in (dashboard, client):
                    check_own_server(process.pid, own)
            except ServerIdentityError:
                stop_head(process)
                raise
            return head
        if process.poll() is not None or time.monotonic() > deadline:
            stop_head(process)
            raise RuntimeError("the Ray head did not start:\n" + log.read_text(errors="replace")[-3000:])
        time.sleep(0.5)


def stop_head(head: subprocess.Popen[bytes]) -> None:
    """SIGTERM to `ray start` alone, which stops its processes in order (sent to them all at once, it
    waited over 120 s on its GCS, gone first); then SIGKILL to whatever of its group is left."""
    head.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait()


@contextlib.contextmanager
def ray_head_running(env: Mapping[str, str]) -> Iterator[RayHead]:
    """A Ray head in its own process group and temp dir, so that stopping it touches nothing else
    (`ray stop` would stop every Ray on the machine). A start that fails (a port taken between choosing
    it and binding it, by the Ray of a test running beside this one) is tried once more on other ports."""
    temp = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's socket paths are length-limited
    log = Path(temp) / "head.log"
    try:
        head = start_head(temp, log, env)
    except RuntimeError as first:
        warnings.warn(f"Ray head start retried after: {first}", stacklevel=1)
        head = start_head(temp, log, env)
    try:
        yield head
    finally:
        stop_head(head.process)
        shutil.rmtree(temp, ignore_errors=True)


def write_geotiff(path: Path, image: np.ndarray, *, nodata: float | None = None, crs: str = "EPSG:32632",
                  pixel: float = 2.0, origin: tuple[float, float] = (600000.0, 5100000.0)) -> Path:
    """A tiled GeoTIFF with a real CRS and affine transform."""
    bands, h, w = image.shape
    with rasterio.open(
        path, "w", driver="GTiff", height=h, width=w, count=bands, dtype=image.dtype, crs=crs,
        transform=from_origin(*origin, pixel, pixel), nodata=nodata, tiled=True, blockxsize=128,
        blockysize=128, compress="deflate",
    ) as dst:
        dst.write(image)
    return path


def smooth_image(h: int, w: int, bands: int = 3, seed: int = 0) -> np.ndarray:
    """Seeded uint8 image with structure at several scales (so models give varied classes)."""
    from scipy.ndimage import zoom

    rng = np.random.default_rng(seed)
    out = np.zeros((bands, h, w), np.float64)
    for cells in (4, 16, 64):
        coarse = rng.normal(size=(bands, cells, cells))
        out += zoom(coarse, (1, h / cells, w / cells), order=1)[:, :h, :w] * (64 / cells) ** 0.5
    out = (out - out.min()) / (out.max() - out.min())
    return (out * 255).astype(np.uint8)


def make_bundle(path: Path, *, bands: int = 3, classes: int = 3, tile: int = 128, overlap: int = 32,
                architecture: str = "fcn", arch_args: dict | None = None, seed: int = 0,
                resolution: float | None = None, unit: str | None = None, input_dtype: str | None = None) -> Path:
    """A randomly initialised (seeded) bundle; nothing is downloaded."""
    torch.manual_seed(seed)
    palette = [(0, 0, 0), (220, 40, 40), (40, 160, 40), (40, 40, 220), (200, 200, 40)]
    spec = BundleSpec(
        architecture=architecture,
        arch_args=arch_args if arch_args is not None else {"depth": 4, "width": 8},
        classes=tuple(ClassInfo(f"class{i}", palette[i % len(palette)]) for i in range(classes)),
        bands=tuple(range(1, bands + 1)),
        normalization=Normalization(scale=1 / 255, mean=(0.5,) * bands, std=(0.25,) * bands),
        resolution=resolution, resolution_unit=unit, tile_size=tile, overlap=overlap, input_dtype=input_dtype,
    )
    bundle = ModelBundle.create(spec)
    bundle.save(path)
    return path


@pytest.fixture(scope="session")
def fcn_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-band, 3-class FCN (receptive field 9 px, reflect padding) with tile 128, overlap 32."""
    return make_bundle(tmp_path_factory.mktemp("bundles") / "fcn.bundle",
                       arch_args={"depth": 4, "width": 8, "padding_mode": "reflect"})
