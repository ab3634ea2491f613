"""Every registered architecture builds from scratch and segments a tile; bad requests fail clearly."""

from __future__ import annotations

import socket
from typing import Any, ClassVar

import pytest
import segmentation_models_pytorch.encoders.mix_transformer as mix_transformer
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models import ARCHITECTURES, FCN, available_architectures, build_model
from pipeline.models.fcn import PADDING_MODES

TILE = 512


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to download weights fail loudly."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


class BaseModelTester:
    """Checks every architecture passes; a subclass names one architecture and its arguments."""

    architecture: ClassVar[str]
    arch_args: ClassVar[dict[str, Any]] = {}
    classes: ClassVar[int] = 3

    @pytest.fixture(scope="class")
    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return build_model(self.architecture, in_channels=3, classes=self.classes, **self.arch_args).eval()

    def test_segments_a_tile_in_eval_mode(self, model: nn.Module) -> None:
        x = torch.rand(1, 3, TILE, TILE, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(x)
        assert isinstance(logits, torch.Tensor)
        assert logits.shape == (1, self.classes, TILE, TILE)
        assert torch.isfinite(logits).all()

    def test_takes_any_number_of_bands(self) -> None:
        model = build_model(self.architecture, in_channels=5, classes=2, **self.arch_args).eval()
        with torch.no_grad():
            logits = model(torch.rand(1, 5, 64, 64))
        assert logits.shape == (1, 2, 64, 64)


class TestUnet(BaseModelTester):
    architecture = "unet"


class TestUnetPlusPlus(BaseModelTester):
    architecture = "unetplusplus"
    # The default nested decoder (256..16 channels) doubles this file's CPU time at 512 px.
    arch_args: ClassVar[dict[str, Any]] = {"decoder_channels": [64, 32, 16, 16, 16]}


class TestDeepLabV3Plus(BaseModelTester):
    architecture = "deeplabv3plus"


class TestSegformer(BaseModelTester):
    architecture = "segformer"


class TestFPN(BaseModelTester):
    architecture = "fpn"


class TestPSPNet(BaseModelTester):
    architecture = "pspnet"


class TestUNet3Plus(BaseModelTester):
    architecture = "unet3plus"
    # The default 64 costs ~15x the compute at 512 px; the wiring under test is the same.
    arch_args: ClassVar[dict[str, Any]] = {"cat_channels": 16}


class TestFCN(BaseModelTester):
    architecture = "fcn"


class TestFCN32s(BaseModelTester):
    architecture = "fcn32s"


class TestFCN16s(BaseModelTester):
    architecture = "fcn16s"


class TestFCN8s(BaseModelTester):
    architecture = "fcn8s"


class TestDeconvNet(BaseModelTester):
    architecture = "deconvnet"


class TestSETRNaive(BaseModelTester):
    architecture = "setr_naive"


class TestSETRPUP(BaseModelTester):
    architecture = "setr_pup"


class TestSETRMLA(BaseModelTester):
    architecture = "setr_mla"


class TestFusionNet(BaseModelTester):
    architecture = "fusionnet"


class TestFRRN(BaseModelTester):
    architecture = "frrn"


def test_every_architecture_has_a_tester() -> None:
    tested = sorted(tester.architecture for tester in BaseModelTester.__subclasses__())
    assert tested == available_architectures()


def test_registry_names_the_required_architectures() -> None:
    required = {"unet", "unetplusplus", "deeplabv3plus", "segformer", "fpn", "pspnet", "unet3plus", "fcn",
                "fcn32s", "fcn16s", "fcn8s", "deconvnet", "setr_naive", "setr_pup", "setr_mla", "fusionnet", "frrn"}
    assert required <= set(ARCHITECTURES)
    with pytest.raises(TypeError):
        ARCHITECTURES["mine"] = ARCHITECTURES["unet"]  # type: ignore[index]


@pytest.mark.parametrize(
    "encoder_name",
    ["mit_b0", *(pytest.param(f"mit_b{i}", marks=pytest.mark.slow) for i in range(1, 6))],
)
def test_segformer_builds_with_every_mit_encoder(encoder_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # MiT initialises with timm's trunc_normal_, whose erfinv takes ~60 s on CPU for b1..b5; the
    # initial values do not matter to whether the architecture builds, so a plain normal stands in.
    def normal_init(tensor: torch.Tensor, std: float = 1.0, **_: object) -> torch.Tensor:
        with torch.no_grad():
            return tensor.normal_(0.0, std)

    monkeypatch.setattr(mix_transformer, "trunc_normal_", normal_init)
    model = build_model("segformer", in_channels=3, classes=2, encoder_name=encoder_name)
    assert isinstance(model.encoder, mix_transformer.MixVisionTransformerEncoder)
    assert model.encoder.out_channels[-1] == (256 if encoder_name == "mit_b0" else 512)


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("encoder_name", ["resnet18", "tu-resnet18"])
def test_builds_without_downloading_weights(encoder_name: str) -> None:
    # smp's own default is encoder_weights="imagenet": the registry must override it.
    model = build_model("unet", in_channels=3, classes=2, encoder_name=encoder_name, encoder_weights=None)
    assert isinstance(model, nn.Module)


def test_unknown_architecture_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match="unet3") as excinfo:
        build_model("unet3", in_channels=3, classes=2)
    assert all(name in str(excinfo.value) for name in available_architectures())


@pytest.mark.parametrize("weights", ["imagenet", True, "ssl"])
def test_pretrained_weights_are_refused(weights: object) -> None:
    with pytest.raises(ConfigError, match="encoder_weights"):
        build_model("unet", in_channels=3, classes=2, encoder_weights=weights)


@pytest.mark.parametrize(
    ("architecture", "arch_args", "named"),
    [
        ("unet", {"encoder_nme": "resnet18"}, "encoder_nme"),
        ("unet", {"encoder_name": "resnet181"}, "resnet181"),
        ("unet", {"encoder_name": "tu-not_a_model"}, "tu-not_a_model"),
        ("unet", {"encoder_depth": 7}, "encoder_depth"),
        ("unet", {"activation": "softmax"}, "activation"),
        ("unet", {"aux_params": {"classes": 2}}, "aux_params"),
        ("unet3plus", {"cat_channels": 0}, "cat_channels"),
        ("fcn", {"encoder_name": "resnet18"}, "encoder_name"),
        ("fcn", {"depht": 3}, "depht"),
        ("fcn", {"padding_mode": "mirror"}, "mirror"),
        ("fcn", {"width": 0}, "width"),
        ("fcn8s", {"variant": "4s"}, "4s"),
        ("fcn8s", {"widths": [16, 32]}, "widths"),
        ("deconvnet", {"widths": [16, 32, 64, 128, 0]}, "widths"),
        ("setr_mla", {"depth": 6}, "depth"),
        ("setr_pup", {"patch": 12}, "patch"),
        ("frrn", {"widths": [8, 8]}, "widths"),
    ],
)
def test_bad_arguments_name_the_argument(architecture: str, arch_args: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        build_model(architecture, in_channels=3, classes=2, **arch_args)


@pytest.mark.parametrize(("in_channels", "classes"), [(0, 2), (3, 0), (True, 2)])
def test_bad_channel_counts_are_refused(in_channels: int, classes: int) -> None:
    with pytest.raises(ConfigError):
        build_model("fcn", in_channels=in_channels, classes=classes)


# FCN: the registry's own baseline, whose receptive field the seam tests rely on.


@settings(max_examples=12, deadline=None)
@given(depth=st.integers(0, 5), padding_mode=st.sampled_from(PADDING_MODES))
def test_fcn_receptive_field_is_what_one_pixel_reaches(depth: int, padding_mode: str) -> None:
    torch.manual_seed(depth)
    # Eval mode: in training mode BatchNorm's batch statistics would couple every pixel.
    model = FCN(in_channels=2, classes=3, depth=depth, width=8, padding_mode=padding_mode).double().eval()
    size, centre = 31, 15
    x = torch.rand(1, 2, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    perturbed = x.clone()
    perturbed[0, :, centre, centre] += 10.0
    with torch.no_grad():
        changed = (model(perturbed) - model(x)).abs().amax(dim=(0, 1)) > 1e-9
    rows, cols = changed.nonzero(as_tuple=True)
    rf = model.receptive_field
    assert rf == 1 + 2 * depth
    assert int(rows.max() - rows.min()) + 1 == rf
    assert int(cols.max() - cols.min()) + 1 == rf
    assert int(changed.sum()) <= rf * rf
    assert (rows - centre).abs().max() <= depth and (cols - centre).abs().max() <= depth


def test_fcn_keeps_any_input_size() -> None:
    model = FCN(in_channels=1, classes=2, depth=2).eval()
    with torch.no_grad():
        assert model(torch.rand(3, 1, 17, 5)).shape == (3, 2, 17, 5)
