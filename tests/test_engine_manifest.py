"""The engine manifest: written beside each engine, read and compared with the device before deserializing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bundle.errors import GpuUnavailableError
from engines.manifest import (
    DeviceInfo,
    EngineManifest,
    advisories,
    incompatibilities,
    load_manifest,
    manifest_path,
    write_manifest,
)

ORIN = DeviceInfo(tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7")


def orin_manifest(**overrides: object) -> EngineManifest:
    values: dict[str, object] = dict(
        bundle_name="parts",
        bundle_model_id="parts@0123456789ab",
        onnx_sha256="a" * 64,
        precision="fp16",
        tensorrt_version="10.3.0",
        cuda_version="12.6",
        l4t_version="36.4.3",
        gpu_name="Orin",
        compute_capability="8.7",
        dla_core=None,
        build_options={"workspace_mib": 1024, "strongly_typed": False},
        built_utc="2026-11-20T10:00:00Z",
        build_seconds=312.5,
        engine_sha256="b" * 64,
        input_name="image",
        output_name="logits",
        input_shape=[1, 3, 224, 224],
    )
    values.update(overrides)
    return EngineManifest.model_validate(values)


def test_manifest_lives_beside_the_engine_with_json_appended() -> None:
    assert manifest_path(Path("/opt/station/model_fp16.engine")) == Path("/opt/station/model_fp16.engine.json")
    assert manifest_path("engines/out/x.plan") == Path("engines/out/x.plan.json")


def test_manifest_round_trips_through_its_file(tmp_path: Path) -> None:
    # given a manifest written beside an engine
    manifest = orin_manifest(dla_core=0, precision="int8")
    path = write_manifest(manifest_path(tmp_path / "model.engine"), manifest)
    # when it is loaded again
    loaded = load_manifest(path)
    # then nothing was lost and no temporary file is left behind
    assert loaded == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.engine.json"]


def test_missing_manifest_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.engine.json"
    with pytest.raises(GpuUnavailableError) as err:
        load_manifest(path)
    assert str(path) in str(err.value)
    assert "make engine" in str(err.value)


def test_manifest_that_is_not_json_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.engine.json"
    path.write_text("{not json")
    with pytest.raises(GpuUnavailableError, match="not valid JSON") as err:
        load_manifest(path)
    assert str(path) in str(err.value)


def test_manifest_with_unknown_key_is_refused_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "model.engine.json"
    raw = orin_manifest().model_dump(mode="json")
    raw["tensorrt_verison"] = "10.3.0"  # a typo must not be ignored silently
    path.write_text(json.dumps(raw))
    with pytest.raises(GpuUnavailableError, match="tensorrt_verison") as err:
        load_manifest(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [("precision", "bf16"), ("compute_capability", "87"), ("engine_sha256", "xyz"), ("input_shape", [])],
)
def test_manifest_with_a_bad_value_is_refused_naming_the_key(tmp_path: Path, key: str, value: object) -> None:
    path = tmp_path / "model.engine.json"
    raw = orin_manifest().model_dump(mode="json")
    raw[key] = value
    path.write_text(json.dumps(raw))
    with pytest.raises(GpuUnavailableError, match=key):
        load_manifest(path)


def test_manifest_from_newer_software_is_refused(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "m.json", orin_manifest(schema_version=99))
    with pytest.raises(GpuUnavailableError, match="schema_version 99"):
        load_manifest(path)


def test_engine_built_on_this_device_is_compatible() -> None:
    assert incompatibilities(orin_manifest(), ORIN) == []
    assert advisories(orin_manifest(), ORIN) == []


def test_other_tensorrt_version_is_incompatible_with_a_rebuild_hint() -> None:
    device = ORIN.model_copy(update={"tensorrt_version": "10.7.0"})
    assert incompatibilities(orin_manifest(), device) == [
        "engine built with TensorRT 10.3.0, this device has 10.7.0: rebuild with `make engine`"
    ]


def test_tensorrt_versions_compare_as_exact_strings() -> None:
    # An engine is tied to the exact build: a longer version string of the "same" release still differs.
    device = ORIN.model_copy(update={"tensorrt_version": "10.3.0.30"})
    [problem] = incompatibilities(orin_manifest(), device)
    assert "TensorRT 10.3.0, this device has 10.3.0.30" in problem


def test_other_compute_capability_is_incompatible_naming_both_gpus() -> None:
    h100 = DeviceInfo(tensorrt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    [problem] = incompatibilities(orin_manifest(), h100)
    assert problem.startswith(
        "engine built for compute capability 8.7 (Orin), this GPU is 9.0 (NVIDIA H100 80GB HBM3)"
    )
    assert "make engine" in problem


def test_every_difference_is_reported_not_just_the_first() -> None:
    device = DeviceInfo(tensorrt_version="10.7.0", gpu_name="NVIDIA L4", compute_capability="8.9")
    problems = incompatibilities(orin_manifest(), device)
    assert len(problems) == 2
    assert "TensorRT 10.3.0" in problems[0]
    assert "8.7 (Orin)" in problems[1] and "8.9 (NVIDIA L4)" in problems[1]


def test_dla_core_requested_for_a_gpu_only_engine_is_incompatible() -> None:
    [problem] = incompatibilities(orin_manifest(dla_core=None), ORIN, dla_core=1)
    assert "DLA core 1" in problem and "GPU only" in problem


def test_dla_engine_runs_with_its_own_or_another_core() -> None:
    assert incompatibilities(orin_manifest(dla_core=0), ORIN) == []
    assert incompatibilities(orin_manifest(dla_core=0), ORIN, dla_core=1) == []


def test_same_compute_capability_other_gpu_model_is_refused_unless_allowed() -> None:
    # Orin AGX and Orin Nano share compute capability 8.7: TensorRT loads the engine only with a warning, its
    # tactics timed on the other model.
    nano = ORIN.model_copy(update={"gpu_name": "Orin Nano"})
    [problem] = incompatibilities(orin_manifest(), nano)
    assert "built on Orin, this GPU is Orin Nano (same compute capability 8.7)" in problem
    assert "make engine" in problem and "inference.allow_other_gpu_model = true" in problem
    # allowed by the station's setting: it runs, with a log line saying what it costs
    assert incompatibilities(orin_manifest(), nano, allow_other_gpu_model=True) == []
    [note] = advisories(orin_manifest(), nano)
    assert "Orin Nano" in note and "allow_other_gpu_model" in note and "make engine" in note


def test_same_name_other_multiprocessor_count_is_another_gpu_model() -> None:
    # On a Jetson every Orin's CUDA name is "Orin": the multiprocessor count tells an AGX (16) from an NX (8).
    agx_engine = orin_manifest(gpu_multiprocessors=16)
    nx = ORIN.model_copy(update={"gpu_multiprocessors": 8})
    [problem] = incompatibilities(agx_engine, nx)
    assert "Orin with 16 multiprocessors, this one has 8" in problem
    assert incompatibilities(agx_engine, ORIN.model_copy(update={"gpu_multiprocessors": 16})) == []
    # a manifest from before the count was recorded, or a device that did not say: the name decides
    assert incompatibilities(orin_manifest(), nx) == []
    assert incompatibilities(agx_engine, ORIN) == []


def test_other_gpu_model_is_not_reported_across_compute_capabilities_twice() -> None:
    h100 = DeviceInfo(tensorrt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    [problem] = incompatibilities(orin_manifest(), h100, allow_other_gpu_model=True)
    assert "compute capability 8.7 (Orin), this GPU is 9.0" in problem
    assert advisories(orin_manifest(), h100) == []


def test_device_info_rejects_a_malformed_compute_capability() -> None:
    with pytest.raises(ValueError, match="compute_capability"):
        DeviceInfo(tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8")
