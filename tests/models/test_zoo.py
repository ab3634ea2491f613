"""The architectures of the segmentation literature beyond smp: what each paper's mechanism does, and
that each learns (a few steps on a generated scene lower the loss)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import build_model
from pipeline.models.deconvnet import DeconvNet
from pipeline.models.frrn import FRRN
from pipeline.models.setr import SETR
from pipeline.models.skipfcn import SkipFCN, bilinear_upsampling
from pipeline.synthetic import CLASSES, generate_scene

ZOO = ["fcn32s", "fcn16s", "fcn8s", "deconvnet", "setr_naive", "setr_pup", "setr_mla", "fusionnet", "frrn"]


def test_deconvnet_unpools_to_the_recorded_switch_positions() -> None:
    torch.manual_seed(0)
    model = DeconvNet(in_channels=3, classes=2).eval()
    x = torch.randn(1, 4, 6, 8)
    pooled, switches = model.pools[0](x)
    restored = model.unpools[-1](pooled, switches, output_size=x.shape[-2:])  # the decoder's twin of pool 0
    # Each 2x2 window's maximum is back where it was; every other position is zero.
    windows = x.unfold(2, 2, 2).unfold(3, 2, 2).reshape(1, 4, 3, 4, 4)
    argmax = windows.argmax(-1)
    expected = torch.zeros_like(x)
    for c in range(4):
        for i in range(3):
            for j in range(4):
                dy, dx = divmod(int(argmax[0, c, i, j]), 2)
                expected[0, c, 2 * i + dy, 2 * j + dx] = x[0, c, 2 * i + dy, 2 * j + dx]
    assert torch.equal(restored, expected)


def test_deconvnet_decoder_reuses_the_encoder_switches() -> None:
    torch.manual_seed(0)
    model = DeconvNet(in_channels=3, classes=2).eval()
    recorded: list[torch.Tensor] = []
    used: list[torch.Tensor] = []
    hooks = [pool.register_forward_hook(lambda _m, _i, out: recorded.append(out[1])) for pool in model.pools]
    hooks += [unpool.register_forward_pre_hook(lambda _m, args, kwargs: used.append(args[1]), with_kwargs=True)
              for unpool in model.unpools]
    with torch.no_grad():
        assert model(torch.rand(1, 3, 96, 80)).shape == (1, 2, 96, 80)
    for hook in hooks:
        hook.remove()
    assert len(recorded) == len(used) == 5
    for indices, reused in zip(reversed(recorded), used, strict=True):
        assert reused is indices  # the very tensors the pools returned, deepest first


@pytest.mark.parametrize("decoder", ["naive", "pup", "mla"])
def test_setr_runs_at_sizes_other_than_its_training_size(decoder: str) -> None:
    torch.manual_seed(0)
    model = SETR(3, 2, decoder=decoder, img_size=256).eval()  # positional embedding for 16 x 16 patches
    assert model.position.shape[-2:] == (16, 16)
    assert model.positional(16, 16).shape == (1, 256, 128)
    assert model.positional(24, 10).shape == (1, 240, 128)  # interpolated to another grid
    with torch.no_grad():
        for h, w in ((256, 256), (384, 160), (100, 37)):
            assert model(torch.rand(1, 3, h, w)).shape == (1, 2, h, w)
        # Interpolating to the learnt grid itself changes nothing.
        grid = model.position
        same = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
        assert torch.allclose(same, grid)


def test_frrn_residual_stream_stays_at_full_resolution() -> None:
    torch.manual_seed(0)
    model = FRRN(3, 2).eval()
    shapes: list[tuple[int, ...]] = []
    hooks = [unit.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out[1].shape)))
             for unit in (*model.down, *model.up)]
    with torch.no_grad():
        model(torch.rand(1, 3, 70, 45))
    for hook in hooks:
        hook.remove()
    assert len(shapes) == 17 and set(shapes) == {(1, 16, 70, 45)}  # every unit updates it in place


def test_fcn_upsampling_starts_as_bilinear_interpolation() -> None:
    up = bilinear_upsampling(channels=2, factor=4)
    x = torch.rand(1, 2, 6, 7)
    ours = up(x)
    reference = F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
    assert ours.shape == reference.shape == (1, 2, 24, 28)
    # Away from the border (where the transposed convolution sees zeros) they are the same.
    assert torch.allclose(ours[..., 4:-4, 4:-4], reference[..., 4:-4, 4:-4], atol=1e-6)
    assert up.weight.requires_grad  # and learnable


def test_fcn_skips_refine_but_start_silent() -> None:
    torch.manual_seed(0)
    coarse = SkipFCN(3, 2, variant="8s").eval()
    with torch.no_grad():
        x = torch.rand(1, 3, 64, 64)
        before = coarse(x)
        assert coarse.score_pool3 is not None
        coarse.score_pool3.bias.fill_(1.0)
        assert not torch.allclose(coarse(x), before)  # the pool-3 skip reaches the output
    assert SkipFCN(3, 2, variant="32s").score_pool4 is None


@pytest.mark.parametrize("architecture", ZOO)
def test_a_few_steps_on_a_generated_scene_lower_the_loss(architecture: str) -> None:
    torch.manual_seed(0)
    scene = generate_scene(128, 128, seed=3)
    image = torch.from_numpy(scene.image).float().div(255)[None]
    truth = torch.from_numpy(scene.labels).long()[None]
    windows = torch.cat([image[..., :64, :64], image[..., 64:, 64:], image[..., :64, 64:], image[..., 64:, :64]])
    labels = torch.cat([truth[..., :64, :64], truth[..., 64:, 64:], truth[..., :64, 64:], truth[..., 64:, :64]])
    # In the memory layout training uses (pipeline.training.loop: channels_last, model and windows).
    model = build_model(architecture, in_channels=3, classes=len(CLASSES)).to(memory_format=torch.channels_last)
    windows = windows.contiguous(memory_format=torch.channels_last)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        optimiser.zero_grad()
        loss = F.cross_entropy(model(windows), labels)
        loss.backward()
        optimiser.step()
        losses.append(float(loss))
    assert min(losses[-3:]) < 0.8 * losses[0], losses
