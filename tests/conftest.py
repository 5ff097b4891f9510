"""Shared fixtures: a tiny synthetic dataset, one tiny training run and its exported bundle.

The training run and the bundle are session-scoped: the real train -> export path runs once (a few
seconds at 64x64 pixels) and every test that needs a real model reads from it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_INPUT = 64


@pytest.fixture(scope="session")
def parts_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("parts"), n_ok=24, n_defect=16, seed=3, size=96)


def tiny_config(data_dir: Path, out_dir: Path, **overrides):
    from training.augment import AugmentConfig
    from training.trainer import TrainConfig

    values = dict(
        dataset="folder", data_dir=data_dir, out_dir=out_dir, backbone="efficientnet_lite0", pretrained=True,
        input_size=TINY_INPUT, epochs=2, batch_size=8, max_steps_per_epoch=2, patience=5, seed=1,
        augment=AugmentConfig(), test_fraction=0.25, val_fraction=0.2,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def trained_run(parts_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.trainer import train

    return train(tiny_config(parts_folder, tmp_path_factory.mktemp("run") / "tiny"), progress=False)


@pytest.fixture(scope="session")
def bundle_dir(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.writer import build_bundle

    return build_bundle(trained_run, tmp_path_factory.mktemp("bundles") / "tiny", calibration_images=16,
                        golden_images=8)


@pytest.fixture(scope="module")
def trt():
    """TensorRT on a CUDA GPU, or a skip that says where these tests run (a Jetson, a GPU machine)."""
    try:
        import tensorrt
    except ImportError as exc:
        pytest.skip(f"needs TensorRT (JetPack's python3-libnvinfer), pycuda and an NVIDIA GPU: run on a Jetson ({exc})")
    from engines.cuda_memory import cuda_available

    ok, reason = cuda_available()
    if not ok:
        pytest.skip(f"needs pycuda and an NVIDIA GPU: run on a Jetson or a GPU machine ({reason})")
    return tensorrt
