"""Models in and out: export a bundle to each runtime and import it back, smp folders, and bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.classes import ClassInfo
from pipeline.cli import app
from pipeline.execution import SegmentConfig, segment
from pipeline.models import ModelBundle
from pipeline.models.interchange import ImportSettings, export_bundle, import_model
from pipeline.mosaic import Mosaic
from tests.conftest import make_bundle, smooth_image, write_geotiff

SETTINGS = {"scores_dtype": "float32", "chunk": 128, "shard": 256, "block": 256, "workers": 2, "progress": False}
FORMATS = {"torchscript": "pt", "exported": "pt2", "onnx": "onnx"}


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("interchange")
    return {"dir": d, "image": write_geotiff(d / "scene.tif", smooth_image(256, 300, seed=3)),
            "bundle": make_bundle(d / "fcn.bundle", classes=4, arch_args={"depth": 3, "width": 8},
                                  input_dtype="uint8")}


@pytest.fixture(scope="module")
def original(scene: dict[str, Path], ray_session: None) -> Mosaic:
    output = scene["dir"] / "original.zarr"
    segment(SegmentConfig(source=str(scene["image"]), model=str(scene["bundle"]), output=str(output), **SETTINGS))  # type: ignore[arg-type]
    return Mosaic.open(output)


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("runtime", list(FORMATS))
def test_exported_and_imported_back_segments_to_the_same_mosaic(
    runtime: str, scene: dict[str, Path], original: Mosaic, tmp_path: Path
) -> None:
    program = tmp_path / f"model.{FORMATS[runtime]}"
    code, output = run("model", "export", str(scene["bundle"]), "--format", runtime, "--out", str(program))
    assert code == 0, output
    written = json.loads(Path(f"{program}.json").read_text())
    assert written["runtime"] == runtime
    assert written["classes"] == ModelBundle.load(scene["bundle"]).spec.to_dict()["classes"]

    imported = tmp_path / "imported.bundle"
    code, output = run("model", "import", str(program), "--out", str(imported))  # the spec comes from model.*.json
    assert code == 0, output
    bundle = ModelBundle.load(imported)
    assert bundle.spec.runtime == runtime and bundle.spec.input_dtype == "uint8"
    code, output = run("model", "info", str(imported))
    assert code == 0 and json.loads(output)["sha256"] == bundle.sha256

    mosaic = tmp_path / "imported.zarr"
    summary = segment(SegmentConfig(source=str(scene["image"]), model=str(imported), output=str(mosaic), **SETTINGS))  # type: ignore[arg-type]
    assert "input       uint8 as in training" in summary.describe()  # the summary states the input check
    ours = Mosaic.open(mosaic)
    assert ours.complete
    np.testing.assert_array_equal(ours.read("mask"), original.read("mask"))
    np.testing.assert_allclose(ours.read("scores"), original.read("scores"), atol=1e-4)


def test_a_pytorch_bundle_runs_on_onnxruntime_when_the_job_asks(
    scene: dict[str, Path], original: Mosaic, tmp_path: Path, tessera_cache: Path
) -> None:
    for k in (1, 2):  # the second job takes the program the first one exported from tessera's cache
        mosaic = tmp_path / f"ort{k}.zarr"
        segment(SegmentConfig(source=str(scene["image"]), model=str(scene["bundle"]), output=str(mosaic),
                              runtime="onnx", **SETTINGS))  # type: ignore[arg-type]
        ours = Mosaic.open(mosaic)
        assert ours.complete and ours.lineage["config"]["runtime"] == "onnx"
        np.testing.assert_array_equal(ours.read("mask"), original.read("mask"))
        np.testing.assert_allclose(ours.read("scores"), original.read("scores"), atol=1e-4)
        cached = tessera_cache / "programs" / f"{ModelBundle.load(scene['bundle']).sha256}-onnx.bundle"
        assert ModelBundle.load(cached).spec.runtime == "onnx"
    result = CliRunner().invoke(app, ["segment", str(scene["image"]), "--model", str(scene["bundle"]), "--out",
                                      str(tmp_path / "x.zarr"), "--runtime", "tensorrt", "--no-track"])
    assert result.exit_code == 2 and "runtime='tensorrt' is unknown" in result.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_an_smp_folder_imports_and_segments(scene: dict[str, Path], tmp_path: Path, ray_session: None) -> None:
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    model = smp.Unet(encoder_name="resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8),
                     in_channels=3, classes=2)
    model.save_pretrained(str(tmp_path / "smp-unet"))
    bundle_path = tmp_path / "unet.bundle"
    code, output = run("model", "import", str(tmp_path / "smp-unet"), "--out", str(bundle_path),
                       "--class", "background", "--class", "building:255,0,0", "--normalization", "imagenet",
                       "--tile", "128", "--overlap", "32")
    assert code == 0, output
    bundle = ModelBundle.load(bundle_path)
    spec = bundle.spec
    assert (spec.runtime, spec.architecture, spec.arch_args["encoder_depth"]) == ("torch", "unet", 3)
    assert [c.name for c in bundle.spec.classes] == ["background", "building"]
    x = torch.randn(2, 3, 128, 128)
    with torch.inference_mode():
        np.testing.assert_allclose(bundle.model(x), model.eval()(x), atol=1e-5)  # the same weights, strictly loaded

    mosaic = tmp_path / "unet.zarr"
    segment(SegmentConfig(source=str(scene["image"]), model=str(bundle_path), output=str(mosaic), **SETTINGS))  # type: ignore[arg-type]
    assert Mosaic.open(mosaic).complete


def test_a_hub_id_imports_from_the_cache_when_the_hub_does_not_answer(tmp_path: Path, unreachable_hub: Path) -> None:
    import segmentation_models_pytorch as smp

    # The cache as huggingface_hub lays it out after a download of lab/buildings.
    repo = unreachable_hub / "models--lab--buildings"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(0)
    model = smp.Unet(encoder_name="resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8),
                     classes=2)
    model.save_pretrained(str(repo / "snapshots" / ("0" * 40)))

    settings = ImportSettings(classes=(ClassInfo("background", (0, 0, 0)), ClassInfo("building", (255, 0, 0))),
                              normalization="imagenet", tile_size=64)
    bundle = import_model("lab/buildings", tmp_path / "hub.bundle", settings)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        np.testing.assert_allclose(bundle.model(x), model.eval()(x), atol=1e-5)

    start = time.perf_counter()
    result = CliRunner().invoke(app, ["model", "import", "lab/roads", "--class", "a", "--class", "b",
                                      "--out", str(tmp_path / "roads.bundle")])
    elapsed = time.perf_counter() - start
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "'lab/roads' cannot be fetched" in lines[0] and "not reachable" in lines[0], lines
    assert elapsed < 10 and not (tmp_path / "roads.bundle").exists()


def test_a_state_dict_imports_for_a_registry_architecture(scene: dict[str, Path], tmp_path: Path) -> None:
    original = ModelBundle.load(scene["bundle"])
    torch.save({"state_dict": {f"module.{k}": v for k, v in original.model.state_dict().items()}}, tmp_path / "ckpt.pt")
    settings = ImportSettings(architecture="fcn", arch_args={"depth": 3, "width": 8}, bands=(1, 2, 3),
                              classes=original.spec.classes, normalization=original.spec.normalization, tile_size=128)
    bundle = import_model(tmp_path / "ckpt.pt", tmp_path / "sd.bundle", settings)
    # The same weights in torch.save's format before PyTorch 1.6 (not a zip archive), as old checkpoints are.
    torch.save(original.model.state_dict(), tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    old = import_model(tmp_path / "old.pth", tmp_path / "old.bundle", settings)
    x = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        np.testing.assert_array_equal(bundle.model(x), original.model(x))
        np.testing.assert_array_equal(old.model(x), original.model(x))


@pytest.fixture(scope="module")
def onnx_file(scene: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_bundle(ModelBundle.load(scene["bundle"]), "onnx", path)
    return path


@pytest.fixture(scope="module")
def fixed_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX model whose graph takes 64 x 64 px inputs only, as many exported models do."""
    from pipeline.models.fcn import FCN

    path = tmp_path_factory.mktemp("fixed") / "fixed.onnx"
    program = torch.onnx.export(FCN(in_channels=3, classes=2, depth=2, width=4).eval(), (torch.randn(1, 3, 64, 64),),
                                dynamo=True, verbose=False)
    assert program is not None
    path.write_bytes(program.model_proto.SerializeToString())
    return path


@pytest.mark.parametrize(("case", "named"), [
    ("not a model", "is not a model file tessera imports"),
    ("missing", "does not exist"),
    ("wrong bands", "does not run on a batch of shape (2, 2, 128, 128)"),
    ("wrong classes", "expected (2, 2, H, W) for the 2 classes"),
    ("fixed size smaller than the tile", "takes 64 x 64 px inputs only, not tiles of 128: give --tile 64"),
    ("no classes", "Name the model's classes"),
])
def test_bad_models_are_one_line_errors_and_nothing_is_written(
    case: str, named: str, onnx_file: Path, fixed_onnx: Path, tmp_path: Path
) -> None:
    text = tmp_path / "notes.onnx"
    text.write_text("not a model\n")
    bare = tmp_path / "bare.onnx"  # an ONNX file without the spec beside it
    bare.write_bytes(onnx_file.read_bytes())
    args = {
        "not a model": [str(text), "--class", "a", "--class", "b"],
        "missing": [str(tmp_path / "nowhere.onnx")],
        "wrong bands": [str(bare), "--bands", "1,2", "--class", "a", "--class", "b", "--normalization", "unit",
                        "--tile", "128"],
        "wrong classes": [str(onnx_file), "--class", "a", "--class", "b"],
        "fixed size smaller than the tile": [str(fixed_onnx), "--class", "a", "--class", "b", "--tile", "128",
                                             "--normalization", "unit"],
        "no classes": [str(bare), "--normalization", "unit"],
    }[case]
    out = tmp_path / "out.bundle"
    result = CliRunner().invoke(app, ["model", "import", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.bundle*"))


def test_a_uint16_image_into_a_uint8_model_is_refused_before_anything_is_written(
    scene: dict[str, Path], tmp_path: Path
) -> None:
    image = write_geotiff(tmp_path / "uint16.tif", (smooth_image(200, 200, seed=4).astype(np.uint16) * 257))
    out = tmp_path / "m.zarr"
    result = CliRunner().invoke(app, ["segment", str(image), "--model", str(scene["bundle"]), "--out", str(out),
                                      "--quiet", "--no-track"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds uint16 values but the model was made for uint8 images" in lines[0], result.stderr
    assert "--accept-input" in lines[0] and not out.exists()


def test_an_imported_model_registers_and_is_read_back_from_the_registry(
    onnx_file: Path, tmp_path: Path, mlflow_store: str
) -> None:
    bundle = tmp_path / "imported.bundle"
    code, output = run("model", "import", str(onnx_file), "--out", str(bundle), "--register", "imported-onnx",
                       "--tracking-uri", mlflow_store)
    assert code == 0, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("registered models:/imported-onnx/"), output  # MLflow's own lines kept off
    version = output.strip().splitlines()[-1].removeprefix("registered models:/imported-onnx/")
    code, output = run("model", "info", f"models:/imported-onnx/{version}", "--tracking-uri", mlflow_store)
    assert code == 0, output
    assert json.loads(output)["sha256"] == ModelBundle.load(bundle).sha256
    assert json.loads(output)["runtime"] == "onnx"


def test_a_plain_exported_program_imports_and_one_holding_pickles_is_refused(tmp_path: Path) -> None:
    import io
    import zipfile

    from pipeline.models.fcn import FCN

    model = FCN(in_channels=3, classes=2, depth=2, width=4).eval()
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 64, 64),)), tmp_path / "plain.pt2")
    args = ["--class", "a", "--class", "b", "--normalization", "unit"]
    code, output = run("model", "import", str(tmp_path / "plain.pt2"), "--out", str(tmp_path / "plain.bundle"), *args)
    assert code == 0, output
    bundle = ModelBundle.load(tmp_path / "plain.bundle")  # a batch of 1 and 64 px fixed by the graph
    assert (bundle.spec.tile_size, bundle.spec.input_size) == (64, 64)
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        np.testing.assert_allclose(bundle.model(x), model(x), atol=1e-6)

    # The same archive with a weight marked as pickled, which torch.export.load would unpickle.
    source = zipfile.ZipFile(tmp_path / "plain.pt2")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if name.endswith("model_weights_config.json"):
                data = data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
            target.writestr(name, data)
    (tmp_path / "pickled.pt2").write_bytes(buffer.getvalue())
    result = CliRunner().invoke(app, ["model", "import", str(tmp_path / "pickled.pt2"), "--out",
                                      str(tmp_path / "pickled.bundle"), *args])
    assert result.exit_code == 2 and "holds pickled objects" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "pickled.bundle").exists()


def test_an_onnx_model_with_its_weights_beside_it_keeps_them_in_the_bundle(tmp_path: Path) -> None:
    import onnx

    from pipeline.models.fcn import FCN

    model = FCN(in_channels=3, classes=2, depth=2, width=4).eval()
    program = torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), dynamo=True, verbose=False)
    assert program is not None
    onnx.save_model(program.model_proto, str(tmp_path / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    code, output = run("model", "import", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "m.bundle"),
                       "--class", "a", "--class", "b", "--normalization", "unit")
    assert code == 0, output
    (tmp_path / "m.onnx.data").unlink()  # the bundle is whole without the files it was made from
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        np.testing.assert_allclose(ModelBundle.load(tmp_path / "m.bundle").model(x), model(x), atol=1e-5)
