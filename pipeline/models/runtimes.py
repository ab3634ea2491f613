"""Runtimes: how a bundle's model runs when it is not a registry architecture with a state dict.

A bundle holds either a state dict for an architecture of the registry (runtime ``torch``), or a
serialised program that carries its own graph:

- ``torchscript``: a ``torch.jit`` archive (``torch.jit.save``), run by PyTorch;
- ``exported``: a ``torch.export`` ExportedProgram (``torch.export.save``, the ``.pt2`` files);
- ``onnx``: an ONNX model, run by onnxruntime (the CPU provider; CUDA on a GPU where onnxruntime-gpu
  is installed).

Each loads as an ``nn.Module`` taking a float32 (N, C, H, W) batch and returning (N, K, h, w)
logits, so the predictor, the stitching and every job treat them alike.

What loading may run: an ONNX model is a protobuf, run by onnxruntime's operators. An ExportedProgram
is a graph of ATen operators and tensors, but its archive format allows pickled weights, constants and
objects, and torch.export.load unpickles them (and falls back to unpickling sample inputs it cannot
read safely): tessera refuses any archive with such entries before torch sees it. A TorchScript archive
is code, compiled and run by PyTorch's TorchScript interpreter: import and run TorchScript only from
sources you trust, as you would a Python package.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import BundleError, MissingDependencyError, cause

TORCH = "torch"
PROGRAMS = ("torchscript", "exported", "onnx")
RUNTIMES = (TORCH, *PROGRAMS)
ONNX_OPSET = 18
# A legacy torch.save file starts with pickle protocol 2 storing torch's magic number 0x1950a86a20f9469cfc6c.
_LEGACY_TORCH_SAVE = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


class ExportedModule(nn.Module):
    """An ExportedProgram's module. Its graph is fixed in inference form, so `train()` and `eval()`,
    which PyTorch refuses on such a module, change nothing."""

    def __init__(self, program: Any) -> None:
        super().__init__()
        self.graph = program.module()
        self.input_shape = _exported_input_shape(program)
        self.one_at_a_time = bool(self.input_shape) and self.input_shape[0] == 1  # exported with a batch of 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_at_a_time and len(x) > 1:
            return torch.cat([self.graph(part) for part in x.split(1)])
        return self.graph(x)  # type: ignore[no-any-return]

    def fixed_size(self) -> tuple[int, int] | None:
        """(H, W) when the graph takes only that input size, else None."""
        return _fixed(self.input_shape)

    def train(self, mode: bool = True) -> ExportedModule:
        return self


class OnnxModule(nn.Module):
    """An onnxruntime session behind the nn.Module interface: a tensor in, a tensor out, on the input's
    device. A model whose batch size is fixed at 1 is run one tile at a time."""

    def __init__(self, program: bytes, device: torch.device | str = "cpu") -> None:
        super().__init__()
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # what the worker set for torch
        options.log_severity_level = 3  # errors only: its warnings are about graph optimisations
        wanted = ["CUDAExecutionProvider"] if torch.device(device).type == "cuda" else []
        providers = [p for p in wanted if p in ort.get_available_providers()] + ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(program, options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own types for invalid graphs
            raise BundleError(f"The ONNX model cannot be loaded by onnxruntime ({cause(exc)}).") from exc
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise BundleError(f"The ONNX model has {len(inputs)} inputs and {len(outputs)} outputs; tessera runs "
                              "models with one (N, bands, H, W) input and (N, classes, H, W) logits as first output.")
        self.input_name = inputs[0].name
        self.input_shape = list(inputs[0].shape)
        self.one_at_a_time = self.input_shape[0] == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.detach().to("cpu", torch.float32).contiguous().numpy()
        parts = np.split(batch, len(batch)) if self.one_at_a_time and len(batch) > 1 else [batch]
        y = np.concatenate([self.session.run(None, {self.input_name: part})[0] for part in parts])
        return torch.from_numpy(np.asarray(y, np.float32)).to(x.device)

    def fixed_size(self) -> tuple[int, int] | None:
        """(H, W) when the graph takes only that input size, else None."""
        return _fixed(self.input_shape)


def fixed_size(model: nn.Module) -> tuple[int, int] | None:
    """The (H, W) a program's graph takes only, or None: any size (every registry model, TorchScript)."""
    size = getattr(model, "fixed_size", None)
    return size() if callable(size) else None  # type: ignore[no-any-return]


def _fixed(shape: list[int | str]) -> tuple[int, int] | None:
    """The (H, W) of an (N, C, H, W) input shape whose height and width are numbers, not free dimensions."""
    h, w = shape[2:4] if len(shape) == 4 else (None, None)
    return (h, w) if isinstance(h, int) and isinstance(w, int) else None


def input_channels(model: nn.Module) -> int | None:
    """The number of input channels a program's graph states, or None where it does not (TorchScript)."""
    shape = getattr(model, "input_shape", None)
    return shape[1] if shape is not None and len(shape) == 4 and isinstance(shape[1], int) else None


def _exported_input_shape(program: Any) -> list[int | str]:
    """The shape of an ExportedProgram's one user input, free dimensions as their names."""
    users = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in users and "val" in node.meta:
            return [d if isinstance(d, int) else str(d) for d in node.meta["val"].shape]
    return []


def load_program(runtime: str, program: bytes, device: torch.device | str = "cpu") -> nn.Module:
    """The model of a serialised program, on `device`, ready for inference.

    Raises:
        BundleError: the bytes are not a program of that runtime.
        MissingDependencyError: onnxruntime is not installed (ONNX only).
    """
    try:
        with _quiet():  # torch.jit's deprecation notice: TorchScript files are what many labs have
            if runtime == "torchscript":
                return torch.jit.load(io.BytesIO(program), map_location=device)  # type: ignore[no-any-return]
            if runtime == "exported":
                _refuse_pickles(program)
                return ExportedModule(torch.export.load(io.BytesIO(program))).to(device)
    except BundleError:
        raise
    except (RuntimeError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise BundleError(f"The {runtime} program cannot be loaded ({cause(exc)}).") from exc
    if runtime == "onnx":
        return OnnxModule(program, device)
    raise BundleError(f"Unknown runtime {runtime!r}; expected one of {RUNTIMES}.")


def _refuse_pickles(program: bytes) -> None:
    """BundleError unless an ExportedProgram archive holds only plain tensors: no entry torch.export.load
    would unpickle (weights or constants marked `use_pickle`, custom or opaque objects, sample inputs that
    do not read with weights_only)."""
    from torch.export.pt2_archive.constants import CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX

    archive = zipfile.ZipFile(io.BytesIO(program))
    for name in archive.namelist():
        if name.endswith(("model_weights_config.json", "model_constants_config.json")):
            entries = json.loads(archive.read(name)).get("config", {}).values()
            for entry in entries:
                path = str(entry.get("path_name", ""))
                if entry.get("use_pickle") or path.startswith((CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX)):
                    raise BundleError("The ExportedProgram holds pickled objects, which loading would run; tessera "
                                      "takes programs of plain tensors only: export the model without them.")
        elif "sample_inputs" in name:
            try:
                torch.load(io.BytesIO(archive.read(name)), weights_only=True)
            except Exception:  # anything weights_only refuses would be unpickled by torch.export.load
                raise BundleError("The ExportedProgram's sample inputs are not plain tensors, and loading them "
                                  "would run pickled code; export the model with tensor inputs.") from None


def to_program(model: nn.Module, runtime: str, example: torch.Tensor) -> tuple[bytes, tuple[int, int] | None]:
    """Serialise `model` (in eval mode) for `runtime`, traced on `example` (N, C, H, W).

    The batch size stays free; so do the height and width where the graph allows it (any multiple of
    32), else they are fixed at the example's, which is returned as the fixed (H, W) (None when free).

    Raises:
        RuntimeError: the model cannot be traced or exported (the exporter's reason is in the message).
    """
    model = model.eval()
    if runtime == "torchscript":
        buffer = io.BytesIO()
        with torch.no_grad(), _quiet():
            torch.jit.save(torch.jit.trace(model, example, check_trace=False), buffer)
        return buffer.getvalue(), None
    if runtime == "exported":
        program, fixed = _export(model, example)
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        return buffer.getvalue(), fixed
    if runtime == "onnx":
        _onnxruntime()
        program, fixed = _export(model, example)
        with _quiet():
            onnx_program = torch.onnx.export(program, (example,), input_names=["x"], output_names=["logits"],
                                             dynamo=True, opset_version=ONNX_OPSET, verbose=False)
        assert onnx_program is not None
        return onnx_program.model_proto.SerializeToString(), fixed
    raise ValueError(f"Unknown program runtime {runtime!r}; expected one of {PROGRAMS}.")


def _export(model: nn.Module, example: torch.Tensor) -> tuple[Any, tuple[int, int] | None]:
    """torch.export with a free batch, and free height and width (multiples of 32) where the graph allows."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    h, w = example.shape[-2:]
    side = {name: 32 * torch.export.Dim(name, min=1, max=1024) for name in ("h32", "w32")}
    free = {0: batch, 2: side["h32"], 3: side["w32"]}
    with torch.no_grad(), _quiet():
        if h % 32 == 0 and w % 32 == 0:
            with contextlib.suppress(Exception):  # the graph depends on the size: fix it
                return torch.export.export(model, (example,), dynamic_shapes=(free,)), None
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), (int(h), int(w))


def sniff(data: bytes) -> str | None:
    """The kind of a model file from its first bytes and, for zip archives, its member names:
    'torchscript', 'exported', 'state_dict' (a torch.save file), 'safetensors', 'onnx', or None."""
    if data[:4] == b"PK\x03\x04":
        try:
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except zipfile.BadZipFile:
            return None
        if any(n.endswith(("/archive_format", "serialized_exported_program.json")) for n in names):
            return "exported"
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "state_dict"
        return None
    if data.startswith(_LEGACY_TORCH_SAVE):  # torch.save before PyTorch 1.6 (or _use_new_zipfile_serialization=False)
        return "state_dict"
    if len(data) > 8 and int.from_bytes(data[:8], "little") < len(data) and data[8:9] == b"{":
        return "safetensors"
    if _is_onnx(data):
        return "onnx"
    return None


def _is_onnx(data: bytes) -> bool:
    """True when the bytes parse as an ONNX ModelProto with a graph."""
    try:
        import onnx
    except ImportError:
        return False
    try:
        proto = onnx.load_model_from_string(data)
    except Exception:  # protobuf raises DecodeError and others on other bytes
        return False
    return bool(proto.graph.node) and proto.ir_version > 0


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(
            "ONNX models need onnxruntime: pip install onnxruntime (onnxruntime-gpu on a CUDA machine)."
        ) from exc
    return onnxruntime


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' progress lines and tracer warnings kept off the terminal."""
    with warnings.catch_warnings(), open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        warnings.simplefilter("ignore")
        yield

