"""U-Net 3+: deep supervision, the classification-guided module and its soft gate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.models import DeepSupervisionOutput, UNet3Plus, build_model

CLASSES = 3
SIZE = 64


def small_model(**kwargs: object) -> UNet3Plus:
    """A U-Net 3+ light enough to train a step on CPU in well under a second."""
    torch.manual_seed(0)
    return UNet3Plus(in_channels=3, classes=CLASSES, cat_channels=8, **kwargs)  # type: ignore[arg-type]


def batch(n: int = 2, height: int = SIZE, width: int = SIZE) -> torch.Tensor:
    """Seeded random images."""
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(0))


def test_training_mode_returns_one_mask_per_decoder_level_and_labels() -> None:
    model = small_model().train()
    out = model(batch())
    assert isinstance(out, DeepSupervisionOutput)
    assert model.decoder_levels == 5  # resnet18, depth 5: strides 2..32
    assert len(out.masks) == model.decoder_levels
    assert all(mask.shape == (2, CLASSES, SIZE, SIZE) for mask in out.masks)
    assert out.labels is not None and out.labels.shape == (2, 1)


def test_eval_mode_returns_one_tensor() -> None:
    model = small_model().eval()
    with torch.no_grad():
        out = model(batch())
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, CLASSES, SIZE, SIZE)


def test_gradient_reaches_every_parameter() -> None:
    model = small_model().train()
    out = model(batch())
    assert isinstance(out, DeepSupervisionOutput) and out.labels is not None
    target = torch.randint(0, CLASSES, (2, SIZE, SIZE), generator=torch.Generator().manual_seed(1))
    has_foreground = (target > 0).flatten(1).any(dim=1, keepdim=True).float()
    loss = sum(F.cross_entropy(mask, target) for mask in out.masks)
    loss = loss + F.binary_cross_entropy_with_logits(out.labels, has_foreground)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize(
    ("encoder_name", "encoder_depth", "levels"),
    [("resnet18", 5, 5), ("resnet18", 3, 3), ("mit_b0", 5, 4)],
)
def test_decoder_levels_follow_the_encoder(encoder_name: str, encoder_depth: int, levels: int) -> None:
    model = small_model(encoder_name=encoder_name, encoder_depth=encoder_depth).train()
    out = model(batch())
    assert isinstance(out, DeepSupervisionOutput)
    assert model.decoder_levels == levels == len(out.masks)
    assert all(mask.shape[-2:] == (SIZE, SIZE) for mask in out.masks)


def test_without_deep_supervision_cgm_keeps_the_named_tuple() -> None:
    out = small_model(deep_supervision=False).train()(batch())
    assert isinstance(out, DeepSupervisionOutput)
    assert len(out.masks) == 1 and out.labels is not None


def test_without_deep_supervision_or_cgm_training_returns_a_tensor() -> None:
    model = small_model(deep_supervision=False, classification_guided=False)
    assert isinstance(model.train()(batch()), torch.Tensor)
    assert isinstance(model.eval()(batch()), torch.Tensor)


def test_without_cgm_labels_are_none() -> None:
    out = small_model(classification_guided=False).train()(batch())
    assert isinstance(out, DeepSupervisionOutput)
    assert out.labels is None and len(out.masks) == 5


def test_soft_gate_adds_log_sigmoid_of_the_label_to_foreground_only() -> None:
    model = small_model().eval()
    head = model.classification_head
    assert head is not None
    labels: list[torch.Tensor] = []
    head.register_forward_hook(lambda module, inputs, output: labels.append(output))
    x = batch()
    with torch.no_grad():
        gated = model(x)
        model.classification_head = None
        ungated = model(x)
    assert isinstance(gated, torch.Tensor) and isinstance(ungated, torch.Tensor)
    difference = gated - ungated
    assert torch.equal(difference[:, 0], torch.zeros_like(difference[:, 0]))
    expected = F.logsigmoid(labels[0])[:, :, None, None].expand_as(difference[:, 1:])
    torch.testing.assert_close(difference[:, 1:], expected)


def test_confident_no_foreground_gates_to_background() -> None:
    # The hard gate of the paper is the limit of the soft one.
    model = small_model().eval()
    head = model.classification_head
    assert isinstance(head, torch.nn.Sequential)
    conv = head[1]
    assert isinstance(conv, torch.nn.Conv2d) and conv.bias is not None
    with torch.no_grad():
        conv.bias.fill_(-1e4)
        out = model(batch())
    assert isinstance(out, torch.Tensor)
    assert (out.argmax(dim=1) == 0).all()


def test_input_size_need_not_divide_by_the_encoder_stride() -> None:
    model = small_model().eval()
    with torch.no_grad():
        out = model(batch(1, 70, 90))
    assert isinstance(out, torch.Tensor) and out.shape == (1, CLASSES, 70, 90)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"encoder_depth": 1}, "encoder_depth"),
        ({"cat_channels": 0}, "cat_channels"),
        ({"classes": 0}, "classes"),
    ],
)
def test_bad_settings_raise_config_error(kwargs: dict[str, int], named: str) -> None:
    arguments: dict[str, int] = {"in_channels": 3, "classes": CLASSES, **kwargs}
    with pytest.raises(ConfigError, match=named):
        UNet3Plus(**arguments)  # type: ignore[arg-type]


def test_registry_passes_unet3plus_arguments_through() -> None:
    model = build_model("unet3plus", in_channels=4, classes=2, cat_channels=8, deep_supervision=False)
    assert isinstance(model, UNet3Plus)
    assert len(model.segmentation_heads) == 1
