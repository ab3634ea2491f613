"""Where training starts: a local encoder checkpoint, a bundle to fine-tune, and hub weights offline."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch

from pipeline.errors import ConfigError
from pipeline.models import ModelBundle, build_model
from pipeline.training import DEFAULT_ARCH_ARGS, TrainConfig, train
from pipeline.training.pretrained import check_encoder_weights, init_from_bundle

ARCH = dict(DEFAULT_ARCH_ARGS)  # the default U-Net: a MobileNetV3-small encoder cut at stride 8


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
