"""A real install: the wheel built from this checkout, installed into a fresh virtual environment, runs from
a folder outside the checkout (Hydra configs and viewer assets from the package, nothing from here)."""

from __future__ import annotations

import html.parser
import os
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.conftest import smooth_image, write_geotiff
from tests.servers.ports import http_answers, start_server

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def checkout_copy(target: Path) -> Path:
    """The files git would put in a clean clone (tracked, and new ones not ignored), the viewer's npm packages
    beside them as `make` installs them."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file() and not source.is_symlink():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    modules = "pipeline/service/viewer/node_modules"
    (target / modules).symlink_to(REPO / modules)
    return target


class Assets(html.parser.HTMLParser):
    """The scripts and style sheets a page loads."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        url = found.get("src") if tag == "script" else found.get("href") if tag == "link" else None
        if url:
            self.urls.append(url)


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return answer.status, answer.read()


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel of this checkout; its dependencies are this interpreter's (a .pth file
    naming its site-packages: the wheel is what is tested, not PyPI)."""
    work = tmp_path_factory.mktemp("install")
    source = checkout_copy(work / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(work / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (work / "dist").glob("tessera-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    before = set(os.listdir(site))
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    str(wheel)], check=True, capture_output=True)
    installed_names = set(os.listdir(site)) - before - {"dependencies.pth", "__pycache__"}
    assert installed_names == {"pipeline", "jobs", "tessera-0.1.0.dist-info"}, installed_names
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "pipeline/conf/segment.yaml" in names and "pipeline/service/viewer/vendor/leaflet/leaflet.js" in names
    assert not any("node_modules" in n or n.startswith(("tests/", "bench/", "conf/", "docs/")) for n in names)
    shutil.rmtree(source)  # nothing of a checkout is left to find
    return venv


def run(venv: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(cwd)}  # no PYTHONPATH, no tracking variables
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_installed_package_segments_from_any_folder(installed: Path, fcn_bundle: Path,
                                                        tmp_path: Path) -> None:
    where = run(installed, ["python", "-c", "import pipeline, jobs; print(pipeline.__file__, jobs.__file__)"], tmp_path)
    assert where.returncode == 0 and str(REPO) not in where.stdout and str(installed) in where.stdout, where
    write_geotiff(tmp_path / "scene.tif", smooth_image(160, 200))
    shutil.copy(fcn_bundle, tmp_path / "m.bundle")
    cli = run(installed, ["tessera", "segment", "scene.tif", "--model", "m.bundle", "--out", "cli.zarr", "--quiet",
                          "--workers", "1"], tmp_path)
    assert cli.returncode == 0, cli.stderr
    hydra = run(installed, ["python", "-m", "jobs.segment", "source=scene.tif", "model=m.bundle", "output=hydra.zarr",
                            "progress=false", "cluster.workers=1"], tmp_path)
    assert hydra.returncode == 0, hydra.stderr
    masks = [np.asarray(zarr.open_group(str(tmp_path / name), mode="r")["labels/mask/0"]) for name in
             ("cli.zarr", "hydra.zarr")]
    assert masks[0].shape == (160, 200) and np.array_equal(masks[0], masks[1])
    assert (tmp_path / "mlflow.db").is_file()  # the default tracking store, in the folder the jobs ran in


def test_the_installed_viewer_and_docs_load_their_assets(installed: Path, fcn_bundle: Path,
                                                         tmp_path: Path) -> None:
    write_geotiff(tmp_path / "scene.tif", smooth_image(96, 96))
    done = run(installed, ["tessera", "segment", "scene.tif", "--model", str(fcn_bundle), "--out", "a.zarr",
                           "--quiet", "--no-track", "--workers", "1"], tmp_path)
    assert done.returncode == 0, done.stderr
    server, port = start_server(lambda port: subprocess.Popen(
        [str(installed / "bin" / "tessera"), "serve", str(tmp_path), "--port", str(port)], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={"PATH": f"{installed / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}), http_answers("/api/mosaics"))
    try:
        base = f"http://127.0.0.1:{port}"
        for page in ("/view/a.zarr", "/docs", "/"):
            status, body = get(base + page)
            assert status == 200, page
            parser = Assets()
            parser.feed(body.decode())
            assert parser.urls, page
            for url in parser.urls:
                status, content = get(base + url)
                assert status == 200 and len(content) > 100, url
        assert b"Leaflet" in get(f"{base}/vendor/leaflet/leaflet.js")[1]
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("manifest", sorted(p.name for p in (REPO / "conf" / "k8s").glob("*.yaml")))
def test_the_cluster_manifests_name_the_image_the_dockerfile_builds(manifest: str) -> None:
    """conf/k8s/ runs the Dockerfile's image, of this version, on the Ray and Python tessera is tested with."""
    import re

    import ray
    import tomllib
    import yaml

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={ray.__version__}\n" in dockerfile
    assert f"ARG PYTHON=py{sys.version_info.major}{sys.version_info.minor}\n" in dockerfile
    built = set(re.findall(r"-t (\S+)\s+\.", dockerfile))
    assert built == {f"registry.example.org/tessera:{version}-cpu", f"registry.example.org/tessera:{version}-cuda"}

    def images(node: object) -> list[str]:
        if isinstance(node, dict):
            return [str(v) for k, v in node.items() if k == "image"] + [i for v in node.values() for i in images(v)]
        return [i for v in node for i in images(v)] if isinstance(node, list) else []

    text = (REPO / "conf" / "k8s" / manifest).read_text()
    documents = list(yaml.safe_load_all(text))
    for document in documents:  # a ConfigMap may carry a RayJob as text
        for value in (document.get("data") or {}).values() if document.get("kind") == "ConfigMap" else []:
            documents.append(yaml.safe_load(value.replace("NIGHT", "2026-11-22")))
    ray_images = [i for d in documents for i in images(d) if "kubectl" not in i]
    assert ray_images and set(ray_images) <= built, ray_images
