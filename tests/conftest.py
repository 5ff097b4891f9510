"""Shared fixtures: a tiny synthetic dataset, one tiny training run and its exported bundle; a broker of a test's
own, its control room, a port that refuses connections; TensorRT where there is one.

The training run and the bundle are session-scoped: the real train -> export path runs once (a few
seconds at 64x64 pixels) and every test that needs a real model reads from it. Helpers that are not fixtures
(settings, frames, the MQTT subscriber, wait_until) are in tests/support/.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.support.mqtt import Subscriber
    from tools.broker import MosquittoBroker

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


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A Mosquitto of this test's own on a free loopback port, stopped afterwards; a skip where none is installed."""
    from tools.broker import MOSQUITTO_HINT, MosquittoBroker, find_mosquitto

    if find_mosquitto() is None:
        pytest.skip(f"mosquitto not installed: {MOSQUITTO_HINT}")
    with MosquittoBroker(tmp_path / "broker") as started:
        yield started


@pytest.fixture
def control_room(broker: MosquittoBroker) -> Iterator[Subscriber]:
    """A subscriber to `inspection/#` on the test's broker: what a control room sees."""
    from tests.support.mqtt import Subscriber

    sub = Subscriber(broker.port)
    yield sub
    sub.close()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port where every connection is refused for the whole test (held bound, so nothing can take it)."""
    from tests.support.mqtt import refused_port as held

    with held() as port:
        yield port
