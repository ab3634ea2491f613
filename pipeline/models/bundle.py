"""Model bundles: weights plus everything inference needs, in one file.

A bundle file is ``torch.save`` of::

    {"format": "tessera.bundle", "version": 2, "spec": BundleSpec.to_dict(), "state_dict": ...}

(or ``"program": bytes`` in place of the state dict, see below) and is read with
``torch.load(..., weights_only=True)``, so reading the file never runs pickled code (what loading an
imported program may run is said in ``pipeline.models.runtimes``). With the runtime
``torch`` (every bundle tessera trains) the model is rebuilt from the architecture registry and the
state dict loaded strictly. A model imported from elsewhere keeps its own graph instead: a
TorchScript archive, an ExportedProgram or an ONNX model (``pipeline.models.runtimes``). Version 1
files (before runtimes) are read as runtime ``torch``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.classes import ClassInfo
from pipeline.errors import BandMismatchError, BundleError, BundleNotFoundError, ConfigError
from pipeline.models.registry import available_architectures, build_model
from pipeline.models.runtimes import PROGRAMS, RUNTIMES, TORCH, load_program
from pipeline.storage import Location, storage_for

FORMAT = "tessera.bundle"
VERSION = 2
READABLE_VERSIONS = (1, 2)
RESOLUTION_UNITS: tuple[str | None, ...] = ("m", "um", None)
TILE_MULTIPLE = 32

_WHAT_A_BUNDLE_IS = (
    f"a tessera model bundle is a file written by ModelBundle.save() (a torch.save of a dict with "
    f"format={FORMAT!r}, version={VERSION}, spec and state_dict or program); `tessera train` writes one, "
    "and `tessera model import` makes one of a TorchScript, ExportedProgram, ONNX or smp model"
)


@dataclass(frozen=True)
class Normalization:
    """How raw band values become model input: ``(x * scale - mean) / std`` per channel.

    Args:
        scale: Factor applied to raw values first (1/255 maps 8-bit data to 0..1).
        mean: Per-channel mean subtracted after scaling.
        std: Per-channel standard deviation divided by (each > 0).

    Raises:
        ConfigError: If the values are not finite, ``scale`` or a ``std`` is not positive, or
            ``mean`` and ``std`` differ in length.
    """

    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        mean = _as_float_tuple("normalization mean", self.mean)
        std = _as_float_tuple("normalization std", self.std)
        if not _is_number(self.scale) or not 0 < self.scale < math.inf:
            raise ConfigError(
                f"Normalization scale={self.scale!r} is invalid; expected a finite number > 0 "
                "(1/255 for 8-bit data, 1/65535 for 16-bit, 1.0 for data already in 0..1)."
            )
        if not mean or len(mean) != len(std):
            raise ConfigError(
                f"Normalization has {len(mean)} means and {len(std)} stds; expected one of "
                "each per input band."
            )
        if not all(0 < s < math.inf for s in std):
            raise ConfigError(f"Normalization std={std} is invalid; every std must be a finite number > 0.")
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a batch of raw band values.

        Args:
            x: (N, C, H, W) raw values, C = number of bands; integer tensors are cast to float32.

        Returns:
            ``(x * scale - mean) / std`` per channel, same shape and (float) dtype.

        Raises:
            BandMismatchError: If ``x`` is not 4-D with one channel per mean/std.
        """
        if x.ndim != 4 or x.shape[1] != len(self.mean):
            raise BandMismatchError(
                f"Normalization expects a (N, {len(self.mean)}, H, W) batch, got shape "
                f"{tuple(x.shape)}; read the bands the model bundle lists, in that order."
            )
        if not x.is_floating_point():
            x = x.to(torch.float32)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x * self.scale - mean) / std


@dataclass(frozen=True)
class BundleSpec:
    """Everything about a model except its weights: what to build, feed it, and call its output.

    Sequences given as lists are stored as tuples; ``arch_args`` is stored as a JSON-normalised
    copy (tuples become lists) so that ``from_dict(to_dict())`` is equal to the original.

    Args:
        architecture: A name from ``available_architectures()``.
        arch_args: JSON-serialisable keyword arguments for ``build_model``, e.g.
            ``{"encoder_name": "resnet18"}``; not ``in_channels`` or ``classes``.
        classes: One ``ClassInfo`` per class id; class 0 is background. At least two.
        bands: 1-based source band indices fed to the model, in order.
        normalization: One mean and std per band.
        resolution: Pixel size the model was trained at, or None if it does not matter.
        resolution_unit: ``"m"`` (metres per pixel) or ``"um"`` (microns per pixel); given if
            and only if ``resolution`` is.
        tile_size: Default tile side in pixels, a positive multiple of 32.
        overlap: Default tile overlap in pixels, 0 <= overlap <= tile_size / 2.
        runtime: ``"torch"`` (``architecture`` from the registry and a state dict) or the runtime of
            an imported program: ``"torchscript"``, ``"exported"`` or ``"onnx"``; for those,
            ``architecture`` is a free label (what the model is) and ``arch_args`` is empty.
        input_size: The only tile side the model takes, for programs exported with a fixed input
            size (then ``tile_size`` equals it); None when any multiple of 32 goes.
        input_dtype: The data type of the images the model was made for (``"uint8"``,
            ``"uint16"``, ...), or None if unknown.
        input_range: The range of raw band values the model saw in training (low, high), or None.

    Raises:
        ConfigError: If any field is invalid; the message names the field and the fix.

    Example:
        >>> spec = BundleSpec(
        ...     architecture="unet",
        ...     arch_args={"encoder_name": "resnet18"},
        ...     classes=(ClassInfo("background", (0, 0, 0)), ClassInfo("building", (255, 0, 0))),
        ...     bands=(1, 2, 3),
        ...     normalization=Normalization(),
        ...     resolution=0.5,
        ...     resolution_unit="m",
        ... )
        >>> spec.in_channels, spec.num_classes
        (3, 2)
    """

    architecture: str
    arch_args: Mapping[str, Any]
    classes: tuple[ClassInfo, ...]
    bands: tuple[int, ...]
    normalization: Normalization
    resolution: float | None = None
    resolution_unit: str | None = None
    tile_size: int = 512
    overlap: int = 64
    runtime: str = TORCH
    input_size: int | None = None
    input_dtype: str | None = None
    input_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"Bundle runtime {self.runtime!r} is unknown; expected one of {RUNTIMES}.")
        if self.runtime == TORCH and self.architecture not in available_architectures():
            raise ConfigError(
                f"Bundle architecture {self.architecture!r} is unknown; expected one of "
                f"{available_architectures()}."
            )
        if self.runtime != TORCH and (not isinstance(self.architecture, str) or not self.architecture):
            raise ConfigError("An imported model's architecture is a label saying what it is, e.g. 'unet-resnet34'.")
        object.__setattr__(self, "arch_args", _json_copy(self.arch_args))
        if self.runtime != TORCH and self.arch_args:
            raise ConfigError(f"A {self.runtime} model carries its own graph; arch_args {self.arch_args} would not "
                              "be used: remove them.")
        classes = _as_tuple("classes", self.classes)
        if len(classes) < 2 or not all(isinstance(c, ClassInfo) for c in classes):
            raise ConfigError(
                f"Bundle classes {self.classes!r} are invalid; expected at least two ClassInfo "
                "entries, class 0 being background."
            )
        object.__setattr__(self, "classes", classes)
        bands = _as_tuple("bands", self.bands)
        if not bands or not all(_is_int(b) and b >= 1 for b in bands):
            raise ConfigError(
                f"Bundle bands {self.bands!r} are invalid; expected a non-empty sequence of "
                "1-based band indices, e.g. (1, 2, 3)."
            )
        object.__setattr__(self, "bands", bands)
        if not isinstance(self.normalization, Normalization):
            raise ConfigError(
                f"Bundle normalization {self.normalization!r} is invalid; expected a Normalization."
            )
        if len(self.normalization.mean) != len(bands):
            raise ConfigError(
                f"Bundle normalization has {len(self.normalization.mean)} means/stds but "
                f"{len(bands)} bands {bands}; give one mean and one std per band."
            )
        self._check_resolution()
        self._check_tiling()
        self._check_input()

    def _check_resolution(self) -> None:
        """Validate the resolution and its unit together."""
        if self.resolution_unit not in RESOLUTION_UNITS:
            raise ConfigError(
                f"Bundle resolution_unit={self.resolution_unit!r} is unknown; expected 'm' "
                "(metres per pixel), 'um' (microns per pixel) or None."
            )
        if (self.resolution is None) != (self.resolution_unit is None):
            raise ConfigError(
                f"Bundle resolution={self.resolution!r} with resolution_unit="
                f"{self.resolution_unit!r}: give both (e.g. 0.5 and 'm') or neither."
            )
        if self.resolution is not None:
            if not _is_number(self.resolution) or not 0 < self.resolution < math.inf:
                raise ConfigError(
                    f"Bundle resolution={self.resolution!r} is invalid; expected a finite pixel size > 0."
                )
            object.__setattr__(self, "resolution", float(self.resolution))

    def _check_tiling(self) -> None:
        """Validate the default tile size and overlap."""
        if not _is_int(self.tile_size) or self.tile_size <= 0 or self.tile_size % TILE_MULTIPLE:
            raise ConfigError(
                f"Bundle tile_size={self.tile_size!r} is invalid; expected a positive multiple "
                f"of {TILE_MULTIPLE} (encoders downsample by up to 32), e.g. 512."
            )
        if not _is_int(self.overlap) or self.overlap < 0 or 2 * self.overlap > self.tile_size:
            raise ConfigError(
                f"Bundle overlap={self.overlap!r} is invalid for tile_size={self.tile_size}; "
                f"expected an integer from 0 to tile_size / 2 = {self.tile_size // 2}."
            )

    def _check_input(self) -> None:
        """Validate the fixed input size and what the model was made for."""
        if self.input_size is not None and (not _is_int(self.input_size) or self.input_size != self.tile_size):
            raise ConfigError(
                f"Bundle input_size={self.input_size!r} with tile_size={self.tile_size}: a model that takes one "
                "input size only is run on tiles of that size; give both the same."
            )
        if self.input_dtype is not None:
            import numpy as np

            try:
                object.__setattr__(self, "input_dtype", np.dtype(self.input_dtype).name)
            except TypeError as exc:
                raise ConfigError(f"Bundle input_dtype={self.input_dtype!r} is not a data type; e.g. 'uint8'.") from exc
        if self.input_range is not None:
            low_high = _as_float_tuple("Bundle input_range", self.input_range)
            if len(low_high) != 2 or not low_high[0] <= low_high[1]:
                raise ConfigError(f"Bundle input_range={self.input_range!r} is invalid; expected (low, high), "
                                  "low <= high.")
            object.__setattr__(self, "input_range", low_high)

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @property
    def in_channels(self) -> int:
        """Number of model input channels (one per band)."""
        return len(self.bands)

    @property
    def num_classes(self) -> int:
        """Number of model output channels (one per class)."""
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that ``from_dict`` turns back into an equal spec.

        Returns:
            Plain dicts, lists, strings and numbers only.
        """
        return {
            "architecture": self.architecture,
            "arch_args": _json_copy(self.arch_args),
            "classes": [{"name": c.name, "color": list(c.color)} for c in self.classes],
            "bands": list(self.bands),
            "normalization": {
                "scale": self.normalization.scale,
                "mean": list(self.normalization.mean),
                "std": list(self.normalization.std),
            },
            "resolution": self.resolution,
            "resolution_unit": self.resolution_unit,
            "tile_size": self.tile_size,
            "overlap": self.overlap,
            # Written only when set, so that the spec of a bundle from before they existed, and the
            # fingerprints of the mosaics made with it, read the same.
            **{name: list(value) if isinstance(value, tuple) else value for name, value in (
                ("runtime", None if self.runtime == TORCH else self.runtime), ("input_size", self.input_size),
                ("input_dtype", self.input_dtype), ("input_range", self.input_range)) if value is not None},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BundleSpec:
        """Rebuild a spec from ``to_dict`` output (e.g. after a JSON round trip).

        Args:
            d: A mapping with the keys ``to_dict`` writes; those with defaults may be left out.

        Returns:
            The validated spec.

        Raises:
            ConfigError: If a key is missing or unknown, or a value is invalid.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"A bundle spec must be a mapping, got {type(d).__name__}.")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        missing = sorted(
            name for name, f in fields.items() if f.default is dataclasses.MISSING and name not in d
        )
        if unknown or missing:
            raise ConfigError(
                f"Bundle spec has unknown keys {unknown} and is missing keys {missing}; expected "
                f"the keys {sorted(fields)} that BundleSpec.to_dict() writes."
            )
        try:
            classes = tuple(ClassInfo(name=c["name"], color=c["color"]) for c in d["classes"])
            normalization = Normalization(**d["normalization"])
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                f"Bundle spec classes {d['classes']!r} or normalization "
                f"{d['normalization']!r} are malformed ({exc}); expected classes as "
                "[{'name': ..., 'color': [r, g, b]}, ...] and normalization as "
                "{'scale': ..., 'mean': [...], 'std': [...]}."
            ) from exc
        return cls(**{**d, "classes": classes, "normalization": normalization})


@dataclass(eq=False)
class ModelBundle:
    """A model and its spec, saved to and loaded from one file.

    Attributes:
        spec: What the model is and how to feed it.
        model: The model (in eval mode after ``load``).
        sha256: Hex SHA-256 of the file this bundle was last saved to or loaded from, or None.
        program: The serialised program of an imported model (``spec.runtime`` other than torch),
            saved in place of a state dict; None for registry architectures.

    Example:
        >>> import tempfile
        >>> spec = BundleSpec("fcn", {"depth": 2}, (ClassInfo("bg", (0, 0, 0)), ClassInfo("fg", (255, 0, 0))),
        ...                   bands=(1,), normalization=Normalization(1.0, (0.0,), (1.0,)))
        >>> path = Path(tempfile.mkdtemp()) / "model.bundle"
        >>> digest = ModelBundle.create(spec).save(path)
        >>> ModelBundle.load(path).sha256 == digest
        True
    """

    spec: BundleSpec
    model: nn.Module
    sha256: str | None = None
    program: bytes | None = None

    @classmethod
    def from_program(cls, spec: BundleSpec, program: bytes, map_location: str = "cpu") -> ModelBundle:
        """A bundle of an imported program (``spec.runtime`` torchscript, exported or onnx).

        Raises:
            BundleError: the bytes are not a program of that runtime.
        """
        if spec.runtime not in PROGRAMS:
            raise ConfigError(f"from_program takes a spec with a program runtime {PROGRAMS}, not {spec.runtime!r}.")
        model = load_program(spec.runtime, program, map_location)
        return cls(spec=spec, model=model.eval(), program=program)

    @classmethod
    def create(cls, spec: BundleSpec) -> ModelBundle:
        """Build a freshly initialised model for ``spec`` from the registry.

        Args:
            spec: The bundle spec.

        Returns:
            A bundle with an untrained model (training mode) and no sha256.

        Raises:
            ConfigError: If ``spec.arch_args`` do not fit the architecture.
        """
        model = build_model(
            spec.architecture,
            in_channels=spec.in_channels,
            classes=spec.num_classes,
            **spec.arch_args,
        )
        return cls(spec=spec, model=model)

    def save(self, path: str | Path) -> str:
        """Write the bundle to one file atomically (temporary file, then rename).

        Args:
            path: Destination file (or object-storage URL, s3://bucket/key.bundle); its parent folders are
                created. An existing file is replaced.

        Returns:
            Hex SHA-256 of the written file (also stored in ``self.sha256``).
        """
        data = self.to_bytes()
        location = Location.parse(path)
        storage_for(location).write_bytes(location, data)  # readers never see a half-written bundle
        self.sha256 = hashlib.sha256(data).hexdigest()
        return self.sha256

    def to_bytes(self) -> bytes:
        """The bundle file's bytes, as `save` writes them."""
        payload: dict[str, Any] = {"format": FORMAT, "version": VERSION, "spec": self.spec.to_dict()}
        if self.spec.runtime == TORCH:
            payload["state_dict"] = {
                key: value.detach().cpu() if isinstance(value, torch.Tensor) else value
                for key, value in self.model.state_dict().items()
            }
        else:
            assert self.program is not None, "an imported model's bundle keeps its program"
            payload["program"] = self.program
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()

    @classmethod
    def load(cls, path: str | Path, map_location: str = "cpu") -> ModelBundle:
        """Read a bundle file and rebuild its model.

        Args:
            path: A file written by ``save``, local or on object storage (s3://bucket/key.bundle).
            map_location: Device the model is put on (e.g. ``"cpu"``, ``"cuda:0"``).

        Returns:
            The bundle, its model in eval mode on ``map_location``, with the file's sha256.

        Raises:
            BundleNotFoundError: If ``path`` does not exist.
            BundleError: If the file is corrupt, not a tessera bundle, of an unknown format
                version, or its weights do not fit its spec.
        """
        return cls.from_bytes(read_bundle_bytes(path), path, map_location)

    @classmethod
    def from_bytes(cls, data: bytes, path: str | Path = "<bytes>", map_location: str = "cpu") -> ModelBundle:
        """The bundle whose file's bytes are `data` (as `load` reads them); `path` names it in errors.

        Raises:
            BundleError: As `load` does.
        """
        try:
            payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except Exception as exc:  # torch raises many types for unreadable files
            raise BundleError(
                f"Model bundle {str(path)!r} cannot be read ({type(exc).__name__}: {exc}); the "
                f"file is corrupt or not a bundle: {_WHAT_A_BUNDLE_IS}."
            ) from exc
        spec, weights = _unpack(path, payload)
        if isinstance(weights, bytes):
            try:
                bundle = cls.from_program(spec, weights, map_location)
            except BundleError as exc:
                raise BundleError(f"Model bundle {str(path)!r}: {exc} Import the model again.") from exc
        else:
            try:
                bundle = cls.create(spec)
                bundle.model.load_state_dict(weights, strict=True)
            except (ConfigError, RuntimeError) as exc:
                raise BundleError(
                    f"Model bundle {str(path)!r} has weights that do not fit its spec ({exc}); "
                    "re-save it with ModelBundle.save()."
                ) from exc
        bundle.model.to(torch.device(map_location)).eval()
        bundle.sha256 = hashlib.sha256(data).hexdigest()
        return bundle


def read_bundle_bytes(path: str | Path) -> bytes:
    """A bundle file's bytes, local or on object storage: what `ModelBundle.from_bytes` loads and what
    workers are sent, read once so that the recorded sha256 describes the model that runs.

    Raises:
        BundleNotFoundError: There is no such file.
        BundleError: The path is a folder.
    """
    location = Location.parse(path)
    if location.is_local and Path(location.path).is_dir():
        raise BundleError(f"Model bundle {str(path)!r} is a directory; {_WHAT_A_BUNDLE_IS}.")
    try:
        return storage_for(location).read_bytes(location)
    except FileNotFoundError as exc:
        raise BundleNotFoundError(f"Model bundle {str(path)!r} does not exist; {_WHAT_A_BUNDLE_IS}.") from exc


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes.

    Args:
        path: The file.

    Returns:
        64 lowercase hex digits.

    Raises:
        FileNotFoundError: If the file does not exist.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unpack(path: Path | str, payload: object) -> tuple[BundleSpec, Mapping[str, torch.Tensor] | bytes]:
    """Check a loaded payload's format and version; return its spec and its state dict or program."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise BundleError(f"{str(path)!r} is not a tessera model bundle; {_WHAT_A_BUNDLE_IS}.")
    version = payload.get("version")
    if version not in READABLE_VERSIONS:
        raise BundleError(
            f"Model bundle {str(path)!r} has format version {version!r}, but this tessera reads "
            f"versions {list(READABLE_VERSIONS)}; use the tessera release that wrote it, or re-save the model "
            "with this one."
        )
    spec_dict = payload.get("spec")
    if not isinstance(spec_dict, Mapping):
        raise BundleError(f"Model bundle {str(path)!r} has no spec; {_WHAT_A_BUNDLE_IS}.")
    try:
        spec = BundleSpec.from_dict(spec_dict)
    except ConfigError as exc:
        raise BundleError(f"Model bundle {str(path)!r} has an invalid spec: {exc}") from exc
    key = "state_dict" if spec.runtime == TORCH else "program"
    weights = payload.get(key)
    if not isinstance(weights, Mapping if key == "state_dict" else bytes):
        raise BundleError(f"Model bundle {str(path)!r} has no {key}; {_WHAT_A_BUNDLE_IS}.")
    return spec, weights


def _is_int(value: object) -> bool:
    """True for ints that are not bools."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """True for ints and floats that are not bools."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_tuple(name: str, value: object) -> tuple[Any, ...]:
    """``value`` as a tuple; ConfigError if it is not a list or tuple."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ConfigError(f"{name} {value!r} is invalid; expected a list or tuple.")
    return tuple(value)


def _as_float_tuple(name: str, value: object) -> tuple[float, ...]:
    """``value`` as a tuple of finite floats; ConfigError otherwise."""
    items = _as_tuple(name, value)
    if not all(_is_number(v) and math.isfinite(v) for v in items):
        raise ConfigError(f"{name} {value!r} is invalid; expected finite numbers.")
    return tuple(float(v) for v in items)


def _json_copy(arch_args: object) -> dict[str, Any]:
    """A JSON-normalised deep copy of ``arch_args``; ConfigError if it is not JSON-serialisable."""
    if not isinstance(arch_args, Mapping) or not all(isinstance(k, str) for k in arch_args):
        raise ConfigError(
            f"Bundle arch_args {arch_args!r} are invalid; expected a mapping from argument "
            "names to JSON values, e.g. {'encoder_name': 'resnet18'}."
        )
    for reserved in ("in_channels", "classes"):
        if reserved in arch_args:
            raise ConfigError(
                f"Bundle arch_args set {reserved!r}; remove it: the bundle derives it from bands and classes."
            )
    try:
        copy: dict[str, Any] = json.loads(json.dumps(dict(arch_args), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"Bundle arch_args {dict(arch_args)!r} are not JSON-serialisable ({exc}); use only "
            "strings, numbers, booleans, None, lists and dicts."
        ) from exc
    return copy
