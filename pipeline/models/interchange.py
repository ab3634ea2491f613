"""Models in and out: import a model made elsewhere into a bundle, export a bundle for another runtime.

Import takes what a model file can say (its graph and weights) and what only its owner knows (the
classes, the bands it reads, the normalisation, the resolution, the tile), runs one tile through the
model to check that both agree, and writes a bundle that every tessera job takes. It reads:

- TorchScript archives, ``torch.export`` programs (``.pt2``) and ONNX files, kept as programs;
- a segmentation-models-pytorch folder written by ``save_pretrained`` (or its hub id), and a plain
  state dict (``torch.save`` or safetensors) of a registry architecture, rebuilt as registry models.

Export writes a bundle's model as a TorchScript, ExportedProgram or ONNX file, and its spec beside it
as JSON (``FILE.json``), which import reads back so that nothing has to be said twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import hub
from pipeline.classes import ClassInfo, default_colors
from pipeline.errors import BundleError, ConfigError, cause
from pipeline.files import cache_folder, write_atomically
from pipeline.models.bundle import BundleSpec, ModelBundle, Normalization
from pipeline.models.runtimes import PROGRAMS, TORCH, fixed_size, input_channels, load_program, sniff, to_program

log = logging.getLogger(__name__)

SPEC_SUFFIX = ".json"
# smp's model classes (save_pretrained's `_model_class`) and the registry names they are built with.
SMP_CLASSES = {"Unet": "unet", "UnetPlusPlus": "unetplusplus", "DeepLabV3Plus": "deeplabv3plus",
               "Segformer": "segformer", "FPN": "fpn", "PSPNet": "pspnet"}
NORMALIZATIONS = {
    "imagenet": Normalization(1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # 3 bands, 8-bit
    "unit": Normalization(1 / 255, (0.0,), (1.0,)),  # 8-bit values to 0..1, one mean/std repeated per band
    "none": Normalization(1.0, (0.0,), (1.0,)),  # the raw values
}
_FORMATS = ("a TorchScript archive, a torch.export program (.pt2), an ONNX file, a segmentation-models-pytorch "
            "folder (save_pretrained) or hub id, or a state dict (torch.save or .safetensors) with --architecture")


@dataclass(frozen=True)
class ImportSettings:
    """What a model file cannot say; None leaves a field to the spec file beside the model (FILE.json, as
    `export` writes) or to its default.

    Attributes:
        classes: Class names and colours, class 0 first (the background).
        bands: 1-based source bands the model reads (default 1..C when the model says C).
        normalization: How raw values become model input (or a name of NORMALIZATIONS).
        resolution, resolution_unit: The pixel size the model was made for.
        tile_size, overlap: Default tiling (a model of fixed input size fixes the tile).
        input_dtype: The data type of the images it was made for (default: from the scale, 1/255 uint8).
        architecture: For a state dict, the registry architecture; for a program, a label.
        arch_args: For a state dict, the architecture's arguments.
    """

    classes: tuple[ClassInfo, ...] | None = None
    bands: tuple[int, ...] | None = None
    normalization: Normalization | str | None = None
    resolution: float | None = None
    resolution_unit: str | None = None
    tile_size: int | None = None
    overlap: int | None = None
    input_dtype: str | None = None
    architecture: str | None = None
    arch_args: Mapping[str, Any] | None = None


def import_model(source: str | Path, output: str | Path, settings: ImportSettings = ImportSettings()) -> ModelBundle:
    """Make a bundle of a model from elsewhere, check it on one tile, and save it at `output`.

    Raises:
        BundleError: `source` is none of the formats, or its model does not run as its settings say
            (bands, classes, tile size), each in one line naming the fix.
        ConfigError: a setting is missing or invalid.
    """
    source = str(source)
    spec_file = Path(f"{source}{SPEC_SUFFIX}")
    base = _json_object(spec_file) if spec_file.is_file() else {}
    base.pop("sha256", None)  # `tessera model info` output is a spec file too
    path = Path(source)
    if path.is_dir():
        bundle = _from_smp_folder(path, settings, base)
    elif path.is_file():
        bundle = _from_file(path, settings, base)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith((".", "/")):
        bundle = _from_smp_folder(_download(source), settings, base)
    else:
        raise BundleError(f"{source!r} does not exist; give {_FORMATS}.")
    check_on_a_tile(bundle)
    bundle.save(output)
    return bundle


def export_bundle(bundle: ModelBundle, runtime: str, output: str | Path) -> BundleSpec:
    """Write the bundle's model as a `runtime` program at `output` and its spec at `output`.json.

    Returns:
        The spec written (the runtime's, with the input size fixed if the graph needed it).

    Raises:
        ConfigError: an unknown runtime.
        BundleError: the model cannot be exported (the exporter's reason).
    """
    spec, program = as_program(bundle, runtime)
    write_atomically(output, program)
    write_atomically(f"{output}{SPEC_SUFFIX}", json.dumps(spec.to_dict(), indent=2).encode())
    return spec


def as_program(bundle: ModelBundle, runtime: str) -> tuple[BundleSpec, bytes]:
    """The bundle's model as a `runtime` program, and the spec that describes it.

    Raises:
        ConfigError: an unknown runtime.
        BundleError: the model cannot be exported (the exporter's reason).
    """
    if runtime not in PROGRAMS:
        raise ConfigError(f"Export format {runtime!r} is unknown; choose one of {list(PROGRAMS)}.")
    spec = bundle.spec
    tile = spec.input_size or spec.tile_size
    example = torch.randn(2, spec.in_channels, tile, tile)
    if spec.runtime == runtime:  # already that program: written as it is
        assert bundle.program is not None
        program, fixed = bundle.program, (spec.input_size, spec.input_size) if spec.input_size else None
    elif spec.runtime == "onnx":  # torch's tracers would record onnxruntime's answer as a constant
        raise BundleError(f"An ONNX model cannot be exported as {runtime}; export it as onnx, or export the "
                          "original PyTorch model.")
    else:
        try:
            program, fixed = to_program(bundle.model, runtime, example)
        except Exception as exc:  # the exporters raise many types
            raise BundleError(f"The model cannot be exported as {runtime} ({cause(exc)}).") from exc
    label = spec.architecture if spec.runtime != TORCH else _label(spec)
    return dataclasses.replace(spec, runtime=runtime, architecture=label, arch_args={},
                               input_size=fixed[0] if fixed else spec.input_size), program


def on_runtime(bundle: ModelBundle, runtime: str) -> ModelBundle:
    """The bundle run by another runtime: a PyTorch bundle as an ONNX, TorchScript or ExportedProgram
    program (the same weights, the logits equal to float32 rounding). A program runs on its own only.

    Exporting takes a while (about 30 s for the demo's U-Net to ONNX on 2 cores), so the program is kept
    in tessera's cache (``$TESSERA_CACHE/programs``), named by the bundle's sha256: the next job with the
    same bundle loads it at once.

    Raises:
        ConfigError: a program bundle asked to run on another runtime, or an unknown runtime.
        BundleError: the model cannot be exported (the exporter's reason).
    """
    if runtime == bundle.spec.runtime:
        return bundle
    if bundle.spec.runtime != TORCH:
        raise ConfigError(f"runtime={runtime!r}: this bundle is a {bundle.spec.runtime} program and runs on that "
                          "runtime only; leave runtime unset.")
    cached = cache_folder("programs") / f"{bundle.sha256}-{runtime}.bundle" if bundle.sha256 else None
    if cached is not None and cached.is_file():
        with contextlib.suppress(BundleError, ConfigError):  # unreadable: made again below
            return ModelBundle.load(cached)
    log.warning("runtime %s: exporting the model for it, once (it is kept in %s for the next jobs)", runtime,
                cached.parent if cached is not None else "no cache: the bundle has no sha256")
    spec, program = as_program(bundle, runtime)
    converted = ModelBundle.from_program(spec, program)
    if cached is not None:
        with contextlib.suppress(OSError):  # a cache that cannot be written costs the next job the export
            converted.save(cached)
    return converted


def check_on_a_tile(bundle: ModelBundle) -> None:
    """Run a batch of two tiles through the model; BundleError in one line unless it gives (2, K, h, w).

    Raises:
        BundleError: the model fails on such a batch (wrong bands, a fixed input size other than the
            tile) or returns something else than one tensor of the spec's classes.
    """
    spec = bundle.spec
    shape = (2, spec.in_channels, spec.tile_size, spec.tile_size)
    try:
        with torch.inference_mode():
            y = bundle.model.eval()(torch.randn(shape))
    except Exception as exc:  # whatever the model raises on an input it was not made for
        raise BundleError(
            f"The model does not run on a batch of shape {shape} (bands {list(spec.bands)}, tile "
            f"{spec.tile_size}): {cause(exc)}. Give --bands for the number of input channels it takes, "
            "and --tile for the input size of a model made for one size."
        ) from None
    if not isinstance(y, torch.Tensor):
        raise BundleError(f"The model returns {type(y).__name__}, not one (N, classes, H, W) tensor of logits; "
                          "export it with a forward that returns the logits alone.")
    if y.ndim != 4 or y.shape[0] != 2 or y.shape[1] != spec.num_classes:
        raise BundleError(
            f"The model returns shape {tuple(y.shape)} for a batch of {shape}; expected (2, {spec.num_classes}, H, W) "
            f"for the {spec.num_classes} classes given ({', '.join(c.name for c in spec.classes)}). Give one --class "
            "per output channel."
        )


def _from_file(path: Path, settings: ImportSettings, base: Mapping[str, Any]) -> ModelBundle:
    data = path.read_bytes()
    kind = sniff(data)
    if kind == "onnx":
        data = _onnx_whole(path)
    if kind in PROGRAMS:
        try:
            model = load_program(kind, data)
        except BundleError as exc:
            raise BundleError(f"{str(path)!r}: {exc}") from None
        spec = _spec(settings, base, runtime=kind, channels=input_channels(model), label=path.stem)
        bundle = ModelBundle(spec, model.eval(), program=data)
        fixed = fixed_size(bundle.model)
        if fixed is not None:  # an ONNX graph that says its input size
            if fixed[0] != fixed[1]:
                raise BundleError(f"{str(path)!r} takes {fixed[0]} x {fixed[1]} px inputs only; tessera's tiles are "
                                  "square: export the model with a square or free input size.")
            if settings.tile_size not in (None, fixed[0]):
                raise BundleError(f"{str(path)!r} takes {fixed[0]} x {fixed[1]} px inputs only, not tiles of "
                                  f"{settings.tile_size}: give --tile {fixed[0]}, or export it with a free input size.")
            bundle = dataclasses.replace(bundle, spec=dataclasses.replace(
                bundle.spec, tile_size=fixed[0], input_size=fixed[0],
                overlap=min(bundle.spec.overlap, fixed[0] // 2)))
        return bundle
    if kind in ("state_dict", "safetensors"):
        state = _state_dict(data, kind, path)
        return _registry_bundle(state, settings, base, path.stem)
    raise BundleError(f"{str(path)!r} is not a model file tessera imports; give {_FORMATS}.")


def _onnx_whole(path: Path) -> bytes:
    """An ONNX model with its weights inside: torch's exporter and others keep large weights in files
    beside the model (external data), which a bundle would otherwise lose."""
    import onnx

    try:
        return onnx.load_model(str(path), load_external_data=True).SerializeToString()  # type: ignore[no-any-return]
    except (OSError, ValueError) as exc:  # a weights file named by the model is missing or unreadable
        raise BundleError(f"{str(path)!r}: its weights, kept in files beside it, cannot be read ({cause(exc)}); "
                          "keep the .onnx.data file(s) in the model's folder.") from None


def _from_smp_folder(folder: Path, settings: ImportSettings, base: Mapping[str, Any]) -> ModelBundle:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise BundleError(f"{str(folder)!r} is a folder without config.json; give {_FORMATS}.")
    config = _json_object(config_file)
    model_class = config.get("_model_class")
    if model_class not in SMP_CLASSES:
        raise BundleError(f"{str(folder)!r} holds an smp {model_class!r} model; tessera imports "
                          f"{sorted(SMP_CLASSES)} (or export it as ONNX or TorchScript and import that).")
    for key in ("activation", "aux_params"):
        if config.get(key) is not None:
            raise BundleError(f"{str(folder)!r} was saved with {key}={config[key]!r}; tessera blends raw logits: "
                              f"save the model with {key}=None.")
    arch_args = {k: v for k, v in config.items() if not k.startswith("_") and k not in
                 ("in_channels", "classes", "encoder_weights", "activation", "aux_params")}
    weights = folder / "model.safetensors"
    if weights.is_file():
        state = _state_dict(weights.read_bytes(), "safetensors", weights)
    elif (folder / "pytorch_model.bin").is_file():
        state = _state_dict((folder / "pytorch_model.bin").read_bytes(), "state_dict", folder / "pytorch_model.bin")
    else:
        raise BundleError(f"{str(folder)!r} has no model.safetensors or pytorch_model.bin; save it again with "
                          "save_pretrained.")
    architecture = settings.architecture or SMP_CLASSES[model_class]
    settings = dataclasses.replace(settings, architecture=architecture,
                                   arch_args={**arch_args, **(settings.arch_args or {})})
    return _registry_bundle(state, settings, base, folder.name, channels=config.get("in_channels"),
                            classes=config.get("classes"))


def _registry_bundle(state: Mapping[str, torch.Tensor], settings: ImportSettings, base: Mapping[str, Any],
                     label: str, channels: int | None = None, classes: int | None = None) -> ModelBundle:
    architecture = settings.architecture or base.get("architecture")
    if architecture is None:
        raise ConfigError("A state dict holds weights, not a model: give --architecture (one of `tessera model "
                          "architectures`) and --arch-args as it was built.")
    spec = _spec(dataclasses.replace(settings, architecture=architecture), base, runtime=TORCH,
                 channels=channels, label=label, classes=classes)
    bundle = ModelBundle.create(spec)
    try:
        bundle.model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"The weights do not fit {architecture!r} with arch_args {dict(spec.arch_args)}, "
                          f"{spec.in_channels} bands and {spec.num_classes} classes ({cause(exc)}); give the "
                          "--architecture, --arch-args, --bands and classes it was built with.") from None
    return dataclasses.replace(bundle, model=bundle.model.eval())


def _spec(settings: ImportSettings, base: Mapping[str, Any], *, runtime: str, channels: int | None, label: str,
          classes: int | None = None) -> BundleSpec:
    """The bundle spec: the settings given, else the spec file's, else the defaults."""
    fields: dict[str, Any] = {}
    if base:  # a spec file as `export` writes it: every field
        try:
            program: dict[str, Any] = {} if runtime == TORCH else {"arch_args": {}}
            written = BundleSpec.from_dict({**base, "runtime": runtime, **program})
        except ConfigError as exc:
            raise ConfigError(f"The spec file beside the model is invalid: {exc}") from None
        fields = {f.name: getattr(written, f.name) for f in dataclasses.fields(BundleSpec)}
    given = {k: v for k, v in dataclasses.asdict(settings).items() if v is not None and k != "classes"}
    given.pop("normalization", None)
    fields.update(given)
    fields["runtime"] = runtime
    fields.setdefault("architecture", label)
    if runtime != TORCH:
        fields["arch_args"] = {}
    fields.setdefault("arch_args", {})
    if settings.classes is not None:
        fields["classes"] = settings.classes
    if "classes" not in fields:
        if classes is None:
            raise ConfigError("Name the model's classes, background first: --class background --class building "
                              "(NAME or NAME:R,G,B, one per output channel).")
        fields["classes"] = tuple(ClassInfo(name, color) for name, color in
                                  zip(["background", *(f"class{k}" for k in range(1, classes))],
                                      default_colors(classes), strict=True))
    if "bands" not in fields:
        if channels is None:
            raise ConfigError("Give the source bands the model reads, e.g. --bands 1,2,3 (this file does not say "
                              "how many input channels it takes).")
        fields["bands"] = tuple(range(1, channels + 1))
    fields["normalization"] = _normalization(settings.normalization, fields.get("normalization"), len(fields["bands"]))
    if fields.get("input_dtype") is None:
        fields["input_dtype"] = {1 / 255: "uint8", 1 / 65535: "uint16"}.get(fields["normalization"].scale)
    if "overlap" not in fields and "tile_size" in fields:  # the default's share of the default tile, for a tile given
        default = {f.name: f.default for f in dataclasses.fields(BundleSpec)}
        fields["overlap"] = min(default["overlap"], fields["tile_size"] * default["overlap"] // default["tile_size"])
    if settings.tile_size is not None and fields.get("input_size") not in (None, settings.tile_size):
        fields["input_size"] = None  # re-checked on a tile of the size given
    return BundleSpec(**fields)


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON file's object; ConfigError in one line for anything else."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(path)!r} is not readable JSON ({cause(exc)}); fix or remove it.") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{str(path)!r} holds JSON {type(value).__name__}, not an object; fix or remove it.")
    return value


def _normalization(given: Normalization | str | None, from_file: Normalization | None, bands: int) -> Normalization:
    chosen = given if given is not None else from_file
    if chosen is None:
        raise ConfigError(f"Say how the model's input was normalised: --normalization one of {sorted(NORMALIZATIONS)}, "
                          "or --scale, --mean and --std (one mean and std per band).")
    if isinstance(chosen, str):
        if chosen not in NORMALIZATIONS:
            raise ConfigError(f"--normalization {chosen!r} is unknown; choose one of {sorted(NORMALIZATIONS)}, or give "
                              "--scale, --mean and --std.")
        chosen = NORMALIZATIONS[chosen]
    if len(chosen.mean) == 1 and bands > 1:
        chosen = Normalization(chosen.scale, chosen.mean * bands, chosen.std * bands)
    if len(chosen.mean) != bands:
        raise ConfigError(f"The normalisation has {len(chosen.mean)} means and stds for {bands} bands; give one "
                          "per band.")
    return chosen


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a state dict file (torch.save or safetensors), as `_state_dict` takes them.

    Raises:
        BundleError: the file is neither, or holds something else than tensors.
    """
    data = Path(path).read_bytes()
    kind = sniff(data)
    if kind not in ("state_dict", "safetensors"):
        raise BundleError(f"{str(path)!r} is not a state dict (torch.save or .safetensors).")
    return _state_dict(data, kind, Path(path))


def _state_dict(data: bytes, kind: str, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch.save or safetensors file; a checkpoint's nested `state_dict` and DDP's
    `module.` prefix are taken off."""
    try:
        if kind == "safetensors":
            from safetensors.torch import load as load_safetensors

            state: Any = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for unreadable files
        raise BundleError(f"{str(path)!r} cannot be read as a state dict ({cause(exc)}).") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleError(f"{str(path)!r} is not a state dict (a mapping of names to tensors); give {_FORMATS}.")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def _download(repo_id: str) -> Path:
    """A hub model's folder, from the Hugging Face hub, or from its cache where the hub does not answer."""
    from huggingface_hub import constants, snapshot_download

    online = hub.reachable()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors", "*.bin"],
                                      local_files_only=not online))
    except Exception as exc:  # offline, unknown repo, refused: huggingface_hub raises many types
        why = cause(exc) if online else f"it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and " + (
            "huggingface_hub is in offline mode (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE
            else "the hub is not reachable from here")
        raise BundleError(
            f"Hub model {repo_id!r} cannot be fetched: {why}. Where there is a network, download it "
            f"(huggingface-cli download {repo_id} --local-dir FOLDER) and import the folder, or set HF_HOME to a "
            "cache that holds it."
        ) from None


def _label(spec: BundleSpec) -> str:
    """A registry architecture with the arguments that tell its variants apart, e.g. 'unet-resnet34'."""
    encoder = spec.arch_args.get("encoder_name")
    return f"{spec.architecture}-{encoder}" if encoder else spec.architecture

