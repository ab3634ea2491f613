"""The MLflow model registry: tessera bundles as registered models, the champion and challenger aliases.

A registered version is an MLflow pyfunc model whose one artefact is the bundle file itself (weights,
architecture, classes, bands, normalisation, tile size: everything a segment job needs), logged with
a signature and the bundle's spec as metadata, so MLflow's own tools can list, load and serve it.
`models:/NAME@ALIAS` or `models:/NAME/VERSION` resolves to that bundle file, downloaded once into a
local cache and checked against the sha256 recorded with the version.

Aliases: `challenger` marks the newest candidate, `champion` what production segments with; only the
nightly job (or a person, in the MLflow UI) moves `champion`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from pipeline.errors import ConfigError
from pipeline.files import cache_folder
from pipeline.models import ModelBundle, file_sha256
from pipeline.tracking import mlflow_client

__all__ = [
    "CHALLENGER", "CHAMPION", "ModelRef", "alias_version", "is_model_uri", "register_bundle", "resolve_model",
    "set_alias",
]

CHAMPION = "champion"
CHALLENGER = "challenger"
SHA256_TAG = "tessera.sha256"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")
_BUNDLE = "bundle"
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")  # what MLflow answers for an unknown name or alias


@dataclass(frozen=True)
class ModelRef:
    """One registered model version, as a mosaic's lineage and a job's run record it."""

    name: str
    version: str
    run_id: str | None = None
    alias: str | None = None
    sha256: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "uri": self.uri}


def is_model_uri(model: str) -> bool:
    """True for `models:/...` references (else the model is a bundle file path)."""
    return str(model).startswith("models:/")


class BundleModel(PythonModel):  # type: ignore[misc]
    """The pyfunc face of a bundle: (N, C, H, W) raw band values in, (N, K, H, W) logits out."""

    def load_context(self, context: Any) -> None:
        self.bundle = ModelBundle.load(context.artifacts[_BUNDLE])

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        import torch

        x = self.bundle.spec.normalization.apply(torch.from_numpy(np.asarray(model_input, np.float32)))
        with torch.inference_mode():
            return self.bundle.model.eval()(x).numpy()


def register_bundle(bundle_path: str | Path, name: str, run_id: str, tracking_uri: str) -> ModelRef:
    """Log the bundle as the run's model and register it under `name`; the new version.

    The version is tagged with the bundle's sha256, architecture and classes, so the registry shows
    what each version is without downloading it; the bundle's whole spec is the model's metadata.
    """
    from mlflow.models import infer_signature

    bundle = ModelBundle.load(bundle_path)
    spec = bundle.spec
    example = np.zeros((1, len(spec.bands), 64, 64), np.float32)
    signature = infer_signature(example, np.zeros((1, spec.num_classes, 64, 64), np.float32))
    requirements = [f"{p}=={importlib.metadata.version(p)}" for p in ("tessera", "torch", "mlflow")]
    client = mlflow_client(tracking_uri)
    # MLflow prints "Successfully registered ..." and "Created version ..." to stderr, and warns that no
    # input example was given (the signature says the shapes): the version is returned, and printed by
    # the front doors that register, once.
    with _fluent_uri(tracking_uri), mlflow.start_run(run_id=run_id), warnings.catch_warnings(), \
            open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        warnings.simplefilter("ignore")
        info = mlflow.pyfunc.log_model(
            name="model", python_model=BundleModel(), artifacts={_BUNDLE: str(bundle_path)}, signature=signature,
            registered_model_name=name, pip_requirements=requirements,
            metadata={"tessera_bundle": spec.to_dict(), "sha256": bundle.sha256},
        )
    version = str(info.registered_model_version)
    tags = {SHA256_TAG: bundle.sha256 or "", "tessera.architecture": spec.architecture,
            "tessera.classes": ",".join(c.name for c in spec.classes)}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return ModelRef(name, version, run_id, sha256=bundle.sha256)


@contextlib.contextmanager
def _fluent_uri(uri: str) -> Iterator[None]:
    """MLflow's module-level API on `uri` for a moment. `mlflow.set_tracking_uri` also sets the
    MLFLOW_TRACKING_URI environment variable; both are put back, so nothing after (a later job, a
    subprocess) is sent to this store by accident."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None unsets it (handled by mlflow)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


@contextlib.contextmanager
def _env_default(name: str, value: str) -> Iterator[None]:
    """`name` set to `value` for a moment, unless the environment sets it already."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def set_alias(ref: ModelRef, alias: str, tracking_uri: str) -> ModelRef:
    """Point `alias` of the model at this version; the version under its new alias."""
    mlflow_client(tracking_uri).set_registered_model_alias(ref.name, alias, ref.version)
    return ModelRef(ref.name, ref.version, ref.run_id, alias, ref.sha256)


def alias_version(name: str, alias: str, tracking_uri: str) -> ModelRef | None:
    """The version `alias` points at, or None when the model or the alias does not exist."""
    try:
        found = mlflow_client(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in _NOT_FOUND:
            return None
        raise  # a store that fails is not a registry without a champion
    return ModelRef(name, str(found.version), found.run_id, alias, found.tags.get(SHA256_TAG))


def resolve_model(uri: str, tracking_uri: str, cache: str | Path | None = None) -> tuple[Path, ModelRef]:
    """The local bundle file of `models:/NAME@ALIAS` or `models:/NAME/VERSION`, and which version it is.

    Args:
        uri: The registry reference.
        tracking_uri: The tracking server (or sqlite store) that holds the registry.
        cache: Where downloaded bundles are kept; default ``$TESSERA_CACHE`` or ~/.cache/tessera.

    Raises:
        ConfigError: The URI is malformed, the model, version or alias does not exist, or the
            downloaded file is not the bundle that was registered.
    """
    match = _MODEL_URI.match(uri)
    if match is None:
        raise ConfigError(f"{uri!r} is not a registry model URI; use models:/NAME@ALIAS or models:/NAME/VERSION.")
    name, alias, version = match["name"], match["alias"], match["version"]
    client = mlflow_client(tracking_uri)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code not in _NOT_FOUND:
            raise
        raise ConfigError(
            f"{uri} is not in the registry at {tracking_uri} ({exc.message.splitlines()[0]}); see the versions and "
            "aliases in the MLflow UI, or train and register one first (tessera train ... tracking.register=NAME)."
        ) from None
    ref = ModelRef(name, str(found.version), found.run_id, alias, found.tags.get(SHA256_TAG))
    root = Path(cache) / "models" if cache else cache_folder("models")
    store = hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]  # two stores may both have NAME/1
    target = root / store / name / ref.version
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{ref.version}-"))
        try:
            # models:/ URIs are resolved through the registry of the fluent API; MLflow's progress bar stays
            # off the terminal unless the user turned it on.
            with _fluent_uri(tracking_uri), _env_default("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"):
                mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{ref.version}",
                                                    dst_path=str(scratch), tracking_uri=tracking_uri)
            os.replace(scratch, target)  # whole or not at all: a cut download is never taken for a bundle
        except OSError:
            if not target.is_dir():  # else another process cached it first
                raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    bundles = sorted((target / "artifacts").glob("*"))
    if len(bundles) != 1:
        raise ConfigError(f"{uri} (version {ref.version}) holds no tessera bundle: it was not registered by tessera.")
    if ref.sha256 and file_sha256(bundles[0]) != ref.sha256:
        raise ConfigError(f"The cached bundle of {uri} at {bundles[0]} does not match the registered sha256; "
                          f"delete {target} and run again.")
    return bundles[0], ref
