"""Engine build plans per TensorRT version, engine keys and names, staleness, and the golden-set validator.

None of this needs TensorRT: the plan is data, the validator is numpy (run here with ONNX Runtime on both
sides, and with perturbed outputs to see it fail).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from bundle.format import load_bundle
from bundle.onnx_runtime import OnnxRuntimeBackend
from engines.manifest import EngineManifest, manifest_path, write_manifest
from engines.plan import BuildRequest, PlanError, dla_supported, parse_version, plan_build
from engines.store import EngineKey, timing_cache_path, up_to_date
from engines.validate import FP16_RELATIVE, compare, fp16_tolerance, validate


@pytest.mark.parametrize(
    ("version", "precision", "role", "strong", "flags", "explicit"),
    [
        ("8.5.2.2", "fp16", "onnx_fp32", False, ("FP16",), True),       # JetPack 5.1
        ("8.6.2", "int8", "onnx_int8", False, ("INT8", "FP16"), True),  # JetPack 6.0
        ("10.3.0.30", "fp16", "onnx_fp32", False, ("FP16",), False),    # JetPack 6.1/6.2
        ("10.3.0", "int8", "onnx_int8", False, ("INT8", "FP16"), False),
        ("10.3.0", "fp32", "onnx_fp32", False, (), False),
        ("10.12.0.36", "fp16", "onnx_fp16", True, (), False),            # strongly typed from 10.12
        ("10.12.0", "int8", "onnx_int8", True, (), False),
        ("11.0.0", "fp16", "onnx_fp16", True, (), False),
        ("11.4.1", "fp32", "onnx_fp32", True, (), False),
    ],
)
def test_plan_follows_the_tensorrt_version(version, precision, role, strong, flags, explicit):
    plan = plan_build(version, BuildRequest(precision))
    assert (plan.onnx_role, plan.strongly_typed, plan.builder_flags, plan.explicit_batch_flag) == (
        role, strong, flags, explicit)
    assert plan.batch_profile == (1, 1, 1) and not plan.dynamic_batch
    assert plan.workspace_bytes == 1024 * 2**20


def test_max_batch_gives_an_optimization_profile_and_workspace_is_in_bytes():
    plan = plan_build("10.3.0", BuildRequest("fp16", workspace_mb=512, max_batch=8))
    assert plan.batch_profile == (1, 8, 8) and plan.dynamic_batch and plan.workspace_bytes == 512 * 2**20
    assert plan.as_options()["batch_profile"] == [1, 8, 8]


AGX_ORIN = "NVIDIA Jetson AGX Orin Developer Kit"


def test_dla_plan_adds_gpu_fallback_and_checks_the_device():
    plan = plan_build("10.3.0", BuildRequest("int8", dla_core=1), dla_cores=2)
    assert plan.dla_core == 1 and plan.builder_flags == ("INT8", "FP16", "GPU_FALLBACK")
    assert plan.parser_flags == () and plan.dla_min_share == 0.5
    strong = plan_build("11.4.1", BuildRequest("fp16", dla_core=0), dla_cores=2, jetson_model=AGX_ORIN)
    assert strong.builder_flags == ("GPU_FALLBACK",) and strong.onnx_role == "onnx_fp16"


@pytest.mark.parametrize("version", ["8.5.2", "8.6.2", "10.3.0", "10.12.0", "11.4.1"])
def test_fp32_means_fp32_the_tf32_flag_is_cleared(version):
    # TF32 is on by default in TensorRT: FP32 layers would round their inputs to 10-bit mantissas on Orin.
    plan = plan_build(version, BuildRequest("fp32"))
    assert plan.cleared_builder_flags == ("TF32",) and "TF32" not in plan.builder_flags
    assert plan.as_options()["cleared_builder_flags"] == ["TF32"]
    for precision in ("fp16", "int8"):
        assert plan_build(version, BuildRequest(precision)).cleared_builder_flags == ()


@pytest.mark.parametrize("version", ["8.5.2.2", "8.6.2"])
def test_int8_on_the_dla_is_refused_on_tensorrt_8_because_qdq_would_silently_run_on_the_gpu(version):
    with pytest.raises(PlanError, match=r"explicitly quantized \(Q/DQ\).*silently run on the GPU") as err:
        plan_build(version, BuildRequest("int8", dla_core=0), dla_cores=2)
    assert "fp16 for the DLA" in str(err.value)
    # the ways out the message names are plans that exist
    assert plan_build(version, BuildRequest("fp16", dla_core=0), dla_cores=2).dla_core == 0
    assert plan_build(version, BuildRequest("int8"), dla_cores=2).dla_core is None


def test_dla_on_tensorrt_11_4_1_is_agx_orin_only_strongly_typed_with_the_parser_adjusting_for_dla():
    plan = plan_build("11.4.1", BuildRequest("int8", dla_core=1), dla_cores=2, jetson_model=AGX_ORIN)
    assert plan.strongly_typed and plan.parser_flags == ("ADJUST_FOR_DLA",)
    assert plan.builder_flags == ("GPU_FALLBACK",) and plan.onnx_role == "onnx_int8"
    for model in ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "NVIDIA Jetson AGX Thor", None):
        with pytest.raises(PlanError, match="only on Jetson AGX Orin"):
            plan_build("11.4.1", BuildRequest("fp16", dla_core=0), dla_cores=2, jetson_model=model)
    # GPU builds need no particular board, and earlier TensorRT versions no parser flag
    assert plan_build("11.4.1", BuildRequest("fp16"), jetson_model=None).parser_flags == ()
    assert plan_build("10.3.0", BuildRequest("fp16", dla_core=0), dla_cores=2).parser_flags == ()


def test_the_minimum_dla_share_is_part_of_a_dla_plan_only():
    assert plan_build("10.3.0", BuildRequest("fp16", dla_core=0, dla_min_share=0.8), dla_cores=2).dla_min_share == 0.8
    assert plan_build("10.3.0", BuildRequest("fp16")).dla_min_share is None
    with pytest.raises(PlanError, match="only applies to a DLA build"):
        plan_build("10.3.0", BuildRequest("fp16", dla_min_share=0.5))
    with pytest.raises(PlanError, match="between 0 and 1"):
        plan_build("10.3.0", BuildRequest("fp16", dla_core=0, dla_min_share=1.5), dla_cores=2)


@pytest.mark.parametrize(
    ("version", "request_", "dla_cores", "message"),
    [
        ("8.4.1", BuildRequest("fp16"), 0, "older than 8.5"),
        ("10.3.0", BuildRequest("fp16", dla_core=0), 0, "has no DLA"),
        ("10.3.0", BuildRequest("fp16", dla_core=2), 2, "DLA core 2 does not exist"),
        ("10.3.0", BuildRequest("fp32", dla_core=0), 2, "FP16 or INT8 only"),
        ("10.12.0", BuildRequest("fp16", dla_core=0), 2, "no DLA support"),
        ("10.3.0", BuildRequest("fp16", dla_core=0, max_batch=4), 2, "static batch"),
        ("10.3.0", BuildRequest("fp16", workspace_mb=8), 0, "too small"),
        ("10.3.0", BuildRequest("fp16", max_batch=0), 0, "at least 1"),
        ("banana", BuildRequest("fp16"), 0, "cannot read the TensorRT version"),
    ],
)
def test_impossible_builds_are_refused_with_the_reason(version, request_, dla_cores, message):
    with pytest.raises(PlanError, match=message):
        plan_build(version, request_, dla_cores=dla_cores)


def test_a_bundle_without_the_needed_onnx_is_refused_naming_the_file():
    with pytest.raises(PlanError, match="onnx_fp16"):
        plan_build("10.12.0", BuildRequest("fp16"), available_roles={"onnx_fp32", "onnx_int8"})


def test_versions_and_dla_support():
    assert parse_version("10.3.0.30+cuda12.2") == (10, 3, 0, 30)
    assert dla_supported((10, 3, 0)) and dla_supported((10, 7)) and not dla_supported((10, 8, 0))
    assert not dla_supported((11, 4, 0)) and dla_supported((11, 4, 1))


def _key(**changes) -> EngineKey:
    values = dict(bundle_model_id="parts@0123456789ab", onnx_sha256="a" * 64, precision="fp16",
                  tensorrt_version="10.3.0.30", compute_capability="8.7", dla_core=None, batch_profile=(1, 1, 1))
    values.update(changes)
    return EngineKey(**values)


def test_engine_names_come_from_the_key():
    assert _key().file_name() == "parts_0123456789ab-fp16-trt10.3.0.30-sm87.engine"
    assert _key(dla_core=0, precision="int8").file_name() == "parts_0123456789ab-int8-trt10.3.0.30-sm87-dla0.engine"
    assert _key(batch_profile=(1, 8, 8)).file_name().endswith("-b8.engine")
    assert len({_key(tensorrt_version=v).file_name() for v in ("10.3.0", "10.4.0")}) == 2


def _install(folder: Path, key: EngineKey, blob: bytes = b"engine bytes", **manifest_changes) -> Path:
    engine = folder / key.file_name()
    engine.write_bytes(blob)
    values = dict(
        bundle_name="parts", bundle_model_id=key.bundle_model_id, onnx_sha256=key.onnx_sha256,
        precision=key.precision, tensorrt_version=key.tensorrt_version, cuda_version="12.6", l4t_version="36.4.0",
        gpu_name="Orin", compute_capability=key.compute_capability, dla_core=key.dla_core,
        build_options={"batch_profile": list(key.batch_profile)}, built_utc="2026-11-26T06:00:00+00:00",
        build_seconds=42.0, engine_sha256=hashlib.sha256(blob).hexdigest(), input_name="input",
        output_name="logits", input_shape=[1, 1, 224, 224], validation={"passed": True},
    )
    values.update(manifest_changes)
    write_manifest(manifest_path(engine), EngineManifest(**values))
    return engine


def test_an_engine_matching_the_key_is_up_to_date(tmp_path: Path):
    engine = _install(tmp_path, _key())
    assert up_to_date(engine, _key()) == (True, "")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"onnx_sha256": "b" * 64}, "ONNX sha256"),
        ({"tensorrt_version": "10.3.1"}, "TensorRT 10.3.0.30 -> 10.3.1"),
        ({"compute_capability": "7.2"}, "compute capability 8.7 -> 7.2"),
        ({"batch_profile": (1, 4, 4)}, "batch profile"),
    ],
)
def test_any_change_in_the_key_makes_it_stale_and_says_what(tmp_path: Path, change, reason):
    engine = _install(tmp_path, _key())
    # Same file name on purpose (a stale engine under the new key's name): the manifest decides.
    ok, why = up_to_date(engine, _key(**change))
    assert not ok and reason in why


def test_missing_changed_or_failed_engines_are_stale(tmp_path: Path):
    assert up_to_date(tmp_path / "nope.engine", _key())[1].startswith("no engine at")
    engine = _install(tmp_path, _key())
    engine.write_bytes(b"tampered")
    assert "changed after its manifest" in up_to_date(engine, _key())[1]
    failed = _install(tmp_path, _key(), validation={"passed": False})
    assert up_to_date(failed, _key()) == (False, "its validation failed")
    manifest_path(failed).unlink()
    assert "manifest" in up_to_date(failed, _key())[1]


def test_timing_cache_is_per_tensorrt_version_and_gpu_model(tmp_path: Path):
    agx = timing_cache_path(tmp_path, "10.3.0", "8.7", "Orin", 16)
    assert agx == tmp_path / "timing-cache" / "trt10.3.0-sm87-orin-16mp.cache"
    # AGX Orin, Orin NX and Orin Nano share compute capability 8.7 (and, on a Jetson, the CUDA name "Orin")
    assert agx != timing_cache_path(tmp_path, "10.3.0", "8.7", "Orin", 8)
    assert agx != timing_cache_path(tmp_path, "10.3.0", "7.2", "Orin", 16)
    assert agx != timing_cache_path(tmp_path, "10.4.0", "8.7", "Orin", 16)
    ada = timing_cache_path(tmp_path, "10.3.0", "8.9", "NVIDIA GeForce RTX 4090")
    assert ada.name == "trt10.3.0-sm89-nvidia-geforce-rtx-4090.cache"
    assert ada != timing_cache_path(tmp_path, "10.3.0", "8.9", "NVIDIA L4")


# --- the golden-set validator -------------------------------------------------------------------------------


def test_onnx_runtime_against_its_own_golden_logits_passes(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    ort = OnnxRuntimeBackend(bundle.path("onnx_fp32"), threads=1)
    result = validate(ort.infer, bundle, "fp32")
    assert result.passed and result.max_abs_diff < 1e-4 and result.decision_agreement == 1.0
    assert result.images == 8 and "logits_fp32" in result.reference and "PASSED" in result.summary()
    assert "logits_fp32" in validate(ort.infer, bundle, "fp16").reference
    int8 = OnnxRuntimeBackend(bundle.path("onnx_int8"), threads=1)
    int8_result = validate(int8.infer, bundle, "int8")
    assert int8_result.passed
    # INT8 decisions are compared at the threshold INT8 engines run at, not FP32's
    assert int8_result.threshold == bundle.metadata.decision_for("int8").threshold
    assert result.threshold == bundle.metadata.decision.threshold


def test_perturbed_outputs_fail_with_the_reason(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    ort = OnnxRuntimeBackend(bundle.path("onnx_fp32"), threads=1)
    nudged = validate(lambda x: ort.infer(x) + 0.05, bundle, "fp32")
    assert not nudged.passed and "differ by more than atol=rtol=0.005" in nudged.problems[0]
    assert "FAILED" in nudged.summary()
    tiny = validate(lambda x: ort.infer(x) + 1e-4, bundle, "fp32")
    assert tiny.passed  # within tolerance
    far = validate(lambda x: ort.infer(x) * 1.5 + 0.5, bundle, "fp16")
    assert not far.passed and "of the image's logit magnitude" in far.problems[0]


def test_fp16_tolerance_comes_from_fp16_precision_relative_to_the_logit_magnitude():
    # FP16 keeps 11 significant bits: u = 2^-11; 64 roundings on the way to the logits: 2^-5 of their magnitude.
    assert FP16_RELATIVE == 64 * 2.0**-11 == 2.0**-5
    reference = np.array([[8.0, -8.0]] * 50 + [[-8.0, 8.0]] * 50)  # magnitude 8: 0.25 allowed
    sound = compare(reference, reference + 0.2, "fp16", threshold=0.5, defect_index=1)
    assert sound.passed  # FP32's 5e-3 would have failed a sound FP16 engine here
    assert not compare(reference, reference + 0.2, "fp32", threshold=0.5, defect_index=1).passed
    off = compare(reference, reference + 0.3, "fp16", threshold=0.5, defect_index=1)
    assert not off.passed and "0.0312 of the image's logit magnitude" in off.problems[0]
    # small logits are held to 2^-5 absolute (a magnitude of at least 1), not to a vanishing tolerance
    small = np.array([[0.01, -0.01]] * 4)
    assert np.allclose(fp16_tolerance(small), 2.0**-5)
    assert compare(small, small + 0.03, "fp16", 0.5, 1).passed
    assert not compare(small, small + 0.04, "fp16", 0.5, 1).passed


def test_fp16_engines_must_also_agree_on_decisions():
    # logits within FP16's tolerance everywhere, but sitting on the threshold: 2 of 100 decisions flip
    reference = np.array([[0.0, 0.01]] * 100)
    candidate = reference.copy()
    candidate[:2] = [[0.0, -0.01]] * 2
    result = compare(reference, candidate, "fp16", threshold=0.5, defect_index=1)
    assert result.max_abs_diff <= 2.0**-5
    assert not result.passed and "decisions agree on 98.0%" in result.problems[0]


def test_int8_is_judged_by_decision_agreement():
    reference = np.array([[2.0, -2.0]] * 50 + [[-2.0, 2.0]] * 50)  # 50 pass, 50 fail
    noisy = reference + 0.3  # logits move, decisions do not
    ok = compare(reference, noisy, "int8", threshold=0.5, defect_index=1)
    assert ok.passed and ok.decision_agreement == 1.0 and ok.rmse == pytest.approx(0.3)
    flipped = reference.copy()
    flipped[:2] = [[-2.0, 2.0]] * 2  # two of 100 decisions flip: 98 % < 99 %
    bad = compare(reference, flipped, "int8", threshold=0.5, defect_index=1)
    assert not bad.passed and bad.decision_agreement == pytest.approx(0.98) and "98.0%" in bad.problems[0]


def test_nan_outputs_and_wrong_shapes_fail():
    reference = np.zeros((4, 2))
    assert not compare(reference, np.full((4, 2), np.nan), "int8", 0.5, 1).passed
    wrong = compare(reference, np.zeros((4, 3)), "fp16", 0.5, 1)
    assert not wrong.passed and "shape" in wrong.problems[0]


# --- the station picks its engine; the CLI without TensorRT ----------------------------------------------------


def test_station_picks_the_engine_that_fits_this_device_and_skips_failed_ones(tmp_path: Path, bundle_dir: Path):
    from appliance.inference.tensorrt import find_engine
    from bundle.errors import GpuUnavailableError
    from engines.manifest import DeviceInfo

    bundle = load_bundle(bundle_dir)
    store = tmp_path / "store"  # model.engine_dir
    store.mkdir()
    with pytest.raises(GpuUnavailableError, match=r"(?s)no fp16 engine .* make engine BUNDLE=") as info:
        find_engine(store, bundle, "fp16")
    assert "hint" in str(info.value)
    old = _install(store, _key(bundle_model_id=bundle.model_id, tensorrt_version="10.3.0"),
                   built_utc="2026-01-01T00:00:00+00:00")
    new_other_gpu = _install(store, _key(bundle_model_id=bundle.model_id, tensorrt_version="10.4.0",
                                         compute_capability="7.2"), built_utc="2026-06-01T00:00:00+00:00")
    _install(store, _key(bundle_model_id=bundle.model_id, tensorrt_version="10.5.0"),
             built_utc="2026-09-01T00:00:00+00:00", validation={"passed": False})
    _install(store, _key(bundle_model_id="other@000000000000", tensorrt_version="10.3.0"))
    orin = DeviceInfo(tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7")
    assert find_engine(store, bundle, "fp16", orin) == old  # the one this device can run
    assert find_engine(store, bundle, "fp16") == new_other_gpu  # no device known: the newest valid one


def test_build_without_tensorrt_is_a_clear_error_with_exit_7(bundle_dir: Path, tmp_path: Path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "engines", "build", "--bundle", str(bundle_dir), "--store",
                           str(tmp_path / "store")], capture_output=True, text=True, timeout=60, check=False,
                          cwd=Path(__file__).resolve().parents[1])
    if proc.returncode == 0:
        pytest.skip("TensorRT is installed here: the missing-TensorRT path cannot be shown")
    assert proc.returncode == 7, proc.stderr
    assert "TensorRT Python bindings not importable" in proc.stderr and "JetPack" in proc.stderr
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").glob("*.engine"))


def test_plan_command_prints_the_plan_and_refuses_impossible_requests(capsys: pytest.CaptureFixture[str]):
    import json as _json

    from appliance.cli import main as appliance_main
    from engines.__main__ import main

    assert main(["plan", "--tensorrt-version", "10.12.0", "--precision", "fp16"]) == 0
    plan = _json.loads(capsys.readouterr().out)
    assert plan["onnx_role"] == "onnx_fp16" and plan["strongly_typed"] is True and plan["builder_flags"] == []
    assert appliance_main(["engine", "plan", "--tensorrt-version", "8.6.2", "--precision", "int8"]) == 0
    assert _json.loads(capsys.readouterr().out)["builder_flags"] == ["INT8", "FP16"]
    assert main(["plan", "--tensorrt-version", "10.3.0", "--dla-core", "0"]) == 2
    assert "has no DLA" in capsys.readouterr().err
    assert main(["plan", "--tensorrt-version", "8.6.2", "--precision", "int8", "--dla-core", "0",
                 "--dla-cores", "2"]) == 2
    assert "Q/DQ" in capsys.readouterr().err
    assert main(["plan", "--tensorrt-version", "11.4.1", "--dla-core", "0", "--dla-cores", "2", "--dla-min-share",
                 "0.9", "--jetson-model", "NVIDIA Jetson AGX Orin Developer Kit"]) == 0
    plan = _json.loads(capsys.readouterr().out)
    assert plan["parser_flags"] == ["ADJUST_FOR_DLA"] and plan["dla_min_share"] == 0.9
    assert main(["plan", "--tensorrt-version", "10.3.0", "--precision", "fp32"]) == 0
    assert _json.loads(capsys.readouterr().out)["cleared_builder_flags"] == ["TF32"]
