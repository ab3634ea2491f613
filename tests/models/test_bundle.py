"""Model bundles: specs validate and round-trip, files round-trip exactly, bad files fail clearly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import BandMismatchError, BundleError, BundleNotFoundError, ConfigError
from pipeline.models import BundleSpec, ClassInfo, ModelBundle, Normalization, file_sha256

CLASSES = (
    ClassInfo("background", (0, 0, 0)),
    ClassInfo("building", (255, 0, 0)),
    ClassInfo("road", (0, 0, 255)),
)


def make_spec(**changes: Any) -> BundleSpec:
    """A valid small spec, with ``changes`` applied."""
    fields: dict[str, Any] = {
        "architecture": "fcn",
        "arch_args": {"depth": 2, "width": 8},
        "classes": CLASSES,
        "bands": (3, 2, 1),
        "normalization": Normalization(),
        "resolution": 0.5,
        "resolution_unit": "m",
        "tile_size": 256,
        "overlap": 32,
    }
    return BundleSpec(**{**fields, **changes})


def tiles() -> torch.Tensor:
    """Seeded 8-bit-like raw tiles."""
    return torch.randint(0, 256, (2, 3, 64, 64), generator=torch.Generator().manual_seed(0)).float()


# Spec


def test_spec_properties() -> None:
    spec = make_spec()
    assert spec.in_channels == 3 and spec.num_classes == 3


def test_spec_round_trips_through_json() -> None:
    spec = make_spec(arch_args={"depth": 3, "padding_mode": "reflect"})
    assert BundleSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_spec_stores_lists_as_tuples_and_is_hashable() -> None:
    spec = make_spec(
        classes=[ClassInfo("a", [1, 2, 3]), ClassInfo("b", (4, 5, 6))],  # type: ignore[arg-type]
        bands=[1, 2, 3],
        normalization=Normalization(mean=[0.1, 0.2, 0.3], std=[1, 1, 1]),  # type: ignore[arg-type]
    )
    assert spec.bands == (1, 2, 3) and spec.classes[0].color == (1, 2, 3)
    assert spec.normalization.std == (1.0, 1.0, 1.0)
    assert hash(spec) == hash(BundleSpec.from_dict(spec.to_dict()))


def test_spec_copies_arch_args() -> None:
    arch_args = {"depth": 2}
    spec = make_spec(arch_args=arch_args)
    arch_args["depth"] = 5
    assert spec.arch_args == {"depth": 2}


spec_strategy = st.builds(
    make_spec,
    classes=st.lists(
        st.builds(
            ClassInfo,
            name=st.text(min_size=1, max_size=8),
            color=st.tuples(*[st.integers(0, 255)] * 3),
        ),
        min_size=2,
        max_size=5,
    ).map(tuple),
    resolution=st.floats(1e-3, 1e3),
    resolution_unit=st.sampled_from(["m", "um"]),
    tile_size=st.integers(2, 64).map(lambda k: 32 * k),
    overlap=st.integers(0, 32),
)


@settings(max_examples=30, deadline=None)
@given(spec=spec_strategy)
def test_any_valid_spec_round_trips(spec: BundleSpec) -> None:
    assert BundleSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"architecture": "unet4"}, "unet4"),
        ({"arch_args": {"depth": {1, 2}}}, "JSON"),
        ({"arch_args": {"in_channels": 3}}, "in_channels"),
        ({"classes": CLASSES[:1]}, "at least two"),
        ({"bands": ()}, "bands"),
        ({"bands": (0, 1, 2)}, "bands"),
        ({"bands": (1, 2)}, "one mean and one std per band"),
        ({"resolution": None}, "resolution"),
        ({"resolution_unit": None}, "resolution"),
        ({"resolution_unit": "km"}, "km"),
        ({"resolution": -1.0}, "resolution"),
        ({"tile_size": 250}, "tile_size"),
        ({"tile_size": 0}, "tile_size"),
        ({"overlap": -1}, "overlap"),
        ({"overlap": 129}, "overlap"),
    ],
)
def test_invalid_specs_raise_config_error(changes: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        make_spec(**changes)


@pytest.mark.parametrize(
    ("factory", "named"),
    [
        (lambda: ClassInfo("", (0, 0, 0)), "name"),
        (lambda: ClassInfo("x", (0, 0, 256)), "Colour"),
        (lambda: ClassInfo("x", (0, 0)), "Colour"),  # type: ignore[arg-type]
        (lambda: Normalization(std=(1.0, 0.0, 1.0)), "std"),
        (lambda: Normalization(mean=(0.5,), std=(1.0, 1.0)), "stds"),
        (lambda: Normalization(scale=0.0), "scale"),
        (lambda: Normalization(mean=(float("nan"), 0.0, 0.0)), "mean"),
    ],
)
def test_invalid_parts_raise_config_error(factory: Any, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        factory()


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda d: d.pop("bands"), "missing keys \\['bands'\\]"),
        (lambda d: d.update(colour="red"), "unknown keys \\['colour'\\]"),
        (lambda d: d.update(classes=["background", "building"]), "classes"),
    ],
)
def test_malformed_dicts_raise_config_error(edit: Any, named: str) -> None:
    d = make_spec().to_dict()
    edit(d)
    with pytest.raises(ConfigError, match=named):
        BundleSpec.from_dict(d)


def test_from_dict_fills_optional_defaults() -> None:
    d = make_spec().to_dict()
    for key in ("resolution", "resolution_unit", "tile_size", "overlap"):
        del d[key]
    spec = BundleSpec.from_dict(d)
    assert (spec.resolution, spec.tile_size, spec.overlap) == (None, 512, 64)


# Normalization


def test_normalization_applies_scale_mean_and_std_per_channel() -> None:
    norm = Normalization(scale=0.5, mean=(1.0, 2.0), std=(2.0, 4.0))
    x = torch.tensor([[[[4.0]], [[12.0]]]])
    torch.testing.assert_close(norm.apply(x), torch.tensor([[[[0.5]], [[1.0]]]]))


def test_normalization_casts_integers_to_float32() -> None:
    out = Normalization().apply(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])
    )


def test_normalization_refuses_the_wrong_band_count() -> None:
    with pytest.raises(BandMismatchError, match="4"):
        Normalization().apply(torch.zeros(1, 4, 2, 2))


# Files


@pytest.mark.parametrize(
    ("architecture", "arch_args"),
    [
        ("fcn", {"depth": 2, "width": 8}),
        ("unet", {"encoder_name": "resnet18"}),
        ("unet3plus", {"cat_channels": 8}),
        ("fcn8s", {"widths": [8, 8, 16, 16, 16], "head_channels": 32}),
        ("deconvnet", {"widths": [8, 8, 16, 16, 16], "bottleneck": 32}),
    ],
)
def test_bundle_round_trips(tmp_path: Path, architecture: str, arch_args: dict[str, Any]) -> None:
    spec = make_spec(architecture=architecture, arch_args=arch_args)
    bundle = ModelBundle.create(spec)
    assert bundle.sha256 is None
    # One training-mode pass moves BatchNorm running statistics off their initial values, so the
    # round trip must carry buffers as well as parameters.
    bundle.model.train()(spec.normalization.apply(tiles()))
    bundle.model.eval()

    path = tmp_path / "models" / "model.bundle"
    digest = bundle.save(path)
    loaded = ModelBundle.load(path)

    assert digest == bundle.sha256 == loaded.sha256 == file_sha256(path)
    assert loaded.spec == spec
    assert not loaded.model.training
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())
    with torch.no_grad():
        x = spec.normalization.apply(tiles())
        assert torch.equal(loaded.model(x), bundle.model(x))
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.bundle"]  # no temporary left


def test_save_replaces_an_existing_bundle(tmp_path: Path) -> None:
    path = tmp_path / "model.bundle"
    first = ModelBundle.create(make_spec()).save(path)
    second = ModelBundle.create(make_spec(arch_args={"depth": 3})).save(path)
    assert first != second == file_sha256(path)
    assert ModelBundle.load(path).spec.arch_args == {"depth": 3}


def test_missing_file_raises_bundle_not_found(tmp_path: Path) -> None:
    with pytest.raises(BundleNotFoundError, match="does not exist") as excinfo:
        ModelBundle.load(tmp_path / "nope.bundle")
    assert isinstance(excinfo.value, FileNotFoundError)


def test_a_bundle_on_object_storage_saves_and_loads_as_a_file(s3_bucket: str, tmp_path: Path) -> None:
    bundle = ModelBundle.create(make_spec())
    url = f"{s3_bucket}/models/m.bundle"
    digest = bundle.save(url)
    assert digest == bundle.save(tmp_path / "m.bundle") == file_sha256(tmp_path / "m.bundle")  # the same bytes
    loaded = ModelBundle.load(url)
    assert loaded.sha256 == digest and loaded.spec == bundle.spec
    for name, value in bundle.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value)
    with pytest.raises(BundleNotFoundError, match=r"'s3://.*/models/nope.bundle' does not exist"):
        ModelBundle.load(f"{s3_bucket}/models/nope.bundle")


def write_payload(path: Path, payload: object) -> Path:
    torch.save(payload, path)
    return path


@pytest.mark.parametrize(
    ("make_file", "named"),
    [
        (lambda p: p.write_bytes(bytes(range(256)) * 4), "cannot be read"),
        (lambda p: p.write_text("not a model\n"), "cannot be read"),
        (lambda p: write_payload(p, {"weight": torch.zeros(3)}), "not a tessera model bundle"),
        (lambda p: write_payload(p, [1, 2, 3]), "not a tessera model bundle"),
        (lambda p: write_payload(p, {"format": "tessera.bundle", "version": 3}), "version 3"),
        (lambda p: write_payload(p, {"format": "tessera.bundle", "version": 1, "spec": make_spec().to_dict()}),
         "no state_dict"),
        (lambda p: write_payload(p, {"format": "tessera.bundle", "version": 2, "state_dict": {},
                                     "spec": {**make_spec().to_dict(), "runtime": "onnx", "arch_args": {}}}),
         "no program"),
        # weights_only loading refuses arbitrary pickled objects instead of running them.
        (lambda p: write_payload(p, {"format": "tessera.bundle", "obj": Path("x")}), "cannot be read"),
        (lambda p: p.mkdir(), "directory"),
    ],
)
def test_bad_files_raise_bundle_error(tmp_path: Path, make_file: Any, named: str) -> None:
    path = tmp_path / "model.bundle"
    make_file(path)
    with pytest.raises(BundleError, match=named) as excinfo:
        ModelBundle.load(path)
    assert not isinstance(excinfo.value, BundleNotFoundError)
    assert "ModelBundle.save" in str(excinfo.value) or "re-save" in str(excinfo.value)


def test_truncated_bundle_raises_bundle_error(tmp_path: Path) -> None:
    path = tmp_path / "model.bundle"
    ModelBundle.create(make_spec()).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BundleError, match="cannot be read"):
        ModelBundle.load(path)


def test_weights_that_do_not_fit_the_spec_raise_bundle_error(tmp_path: Path) -> None:
    path = tmp_path / "model.bundle"
    ModelBundle.create(make_spec()).save(path)
    payload = torch.load(path, weights_only=True)
    payload["spec"] = make_spec(arch_args={"depth": 3}).to_dict()
    torch.save(payload, path)
    with pytest.raises(BundleError, match="do not fit"):
        ModelBundle.load(path)


def test_invalid_spec_in_a_file_raises_bundle_error(tmp_path: Path) -> None:
    path = tmp_path / "model.bundle"
    ModelBundle.create(make_spec()).save(path)
    payload = torch.load(path, weights_only=True)
    payload["spec"]["tile_size"] = 100
    torch.save(payload, path)
    with pytest.raises(BundleError, match="tile_size"):
        ModelBundle.load(path)


def test_bundle_spec_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_spec().tile_size = 1024  # type: ignore[misc]
