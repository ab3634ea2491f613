"""Build step the pyproject cannot say: the web viewer's npm assets go into the package.

`pip install .` (or `pip wheel .`) copies the files listed in pipeline/service/viewer/assets.json from
the viewer's node_modules (installed first with `npm ci` from its package-lock.json when absent) into
pipeline/service/viewer/vendor/ inside the built package, so an installed tessera serves them with no
checkout and no network. An editable install serves them from node_modules instead.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

VIEWER = Path(__file__).resolve().parent / "pipeline" / "service" / "viewer"


def npm_packages() -> Path:
    """The viewer's node_modules, installed from its lock file when missing."""
    modules = VIEWER / "node_modules"
    if not (modules / ".package-lock.json").is_file() and not (modules / "leaflet").is_dir():
        if shutil.which("npm") is None:
            raise SystemExit("building tessera needs the viewer's npm packages: install npm (apt install npm) or run "
                             "`npm ci --ignore-scripts` in pipeline/service/viewer first")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error", "--ignore-scripts"], cwd=VIEWER,
                       check=True)
    return modules


def copy_assets(target: Path) -> None:
    """The listed files of each npm package into target/NAME/, with the package's licence."""
    modules = npm_packages()
    assets = {k: v for k, v in json.loads((VIEWER / "assets.json").read_text()).items() if not k.startswith("/")}
    for name, spec in assets.items():
        package = modules / spec["package"]
        for file in spec["files"]:
            source = package / spec["folder"] / file
            if not source.is_file():
                raise SystemExit(f"{source} is missing: run `npm ci --ignore-scripts` in {VIEWER}")
            (target / name / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target / name / file)
        shutil.copyfile(package / "LICENSE", target / name / "LICENSE")


class BuildPyWithViewer(build_py):
    def run(self) -> None:
        super().run()
        if not getattr(self, "editable_mode", False):
            copy_assets(Path(self.build_lib) / "pipeline" / "service" / "viewer" / "vendor")


setup(cmdclass={"build_py": BuildPyWithViewer})
