"""Training and export: a training run's outputs (checkpoints, split, report, resume), and the model bundle made
from it (ONNX FP32 matching PyTorch, INT8 QDQ and its calibration, per-precision operating points, hashes,
refusal of modified or incompatible bundles), on synthetic parts with the real PyTorch, ONNX and ONNX Runtime.

Not the station's inspection pipeline: that is tests/test_runtime.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from bundle.errors import BundleError, CheckpointError
from bundle.format import ROLE_FILES, BundleMetadata, load_bundle
from bundle.images import read_image
from bundle.onnx_runtime import OnnxRuntimeBackend
from bundle.preprocess import preprocess
from export.quantize import check_qdq
from tests.conftest import tiny_config
from training.trainer import PartsDataset, load_checkpoint, load_samples, split_samples, train


def test_training_run_writes_checkpoints_split_and_report(trained_run: Path):
    for name in ("last.pt", "best.pt", "final.pt", "run.json", "split.json"):
        assert (trained_run / name).is_file(), name
    for name in ("report.json", "report.md", "roc.png", "confusion.png", "confidence_hist.png"):
        assert (trained_run / "report" / name).stat().st_size > 0, name
    split = json.loads((trained_run / "split.json").read_text())
    assert set(split) == {"train", "val", "test"}
    assert not set(split["test"]) & set(split["train"])
    report = json.loads((trained_run / "report" / "report.json").read_text())
    assert sorted(report["heldout_images"]) == sorted(split["test"])
    for key in ("accuracy", "recall", "false_positive_rate", "f1", "roc_auc", "threshold"):
        assert key in report


def test_training_preprocessing_is_the_runtime_preprocessing(trained_run: Path, parts_folder: Path):
    final = load_checkpoint(trained_run / "final.pt")
    cfg = tiny_config(parts_folder, trained_run)
    samples = load_samples(cfg)
    ds = PartsDataset(samples, cfg.preprocess_spec(), aug=None, seed=0, soft_labels=False)
    spec = load_checkpoint(trained_run / "final.pt")["preprocess"]
    assert spec == cfg.preprocess_spec().model_dump(mode="json") == final["preprocess"]
    for i in (0, len(samples) - 1):
        x, _ = ds[i]
        runtime = preprocess(read_image(parts_folder / samples[i].name), cfg.preprocess_spec())
        np.testing.assert_array_equal(x.numpy(), runtime)


def test_bundle_holds_every_file_with_matching_hashes(bundle_dir: Path, trained_run: Path):
    from bundle.format import DecisionDefaults

    bundle = load_bundle(bundle_dir)
    assert set(bundle.metadata.files) == set(ROLE_FILES)
    meta = json.loads((bundle_dir / "metadata.json").read_text())
    assert BundleMetadata.model_validate(meta) == bundle.metadata  # round trip
    # FP32's operating point is training's, carried over unchanged.
    final = load_checkpoint(trained_run / "final.pt")
    assert bundle.metadata.decision == DecisionDefaults.model_validate(final["decision"])
    assert set(bundle.metadata.metrics) == {"fp32", "fp16", "int8"}
    assert bundle.metadata.training["fingerprint_sha256"] == final["training"]["fingerprint_sha256"]


def test_a_bundle_whose_band_does_not_contain_its_threshold_is_refused(bundle_dir: Path, tmp_path: Path):
    bad = tmp_path / "bad-band"
    shutil.copytree(bundle_dir, bad)
    raw = json.loads((bad / "metadata.json").read_text())
    threshold = raw["decision"]["threshold"]
    raw["decision"].update(band_low=min(1.0, threshold + 0.01), band_high=1.0)
    (bad / "metadata.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="must contain threshold"):
        load_bundle(bad)


def test_each_reduced_precision_gets_its_operating_point_from_its_own_validation_scores(
    bundle_dir: Path, trained_run: Path, parts_folder: Path
):
    from bundle.format import DecisionDefaults
    from bundle.preprocess import preprocess_batch
    from training.metrics import binary_metrics, choose_operating_point, roc_auc, softmax_defect_score

    meta = load_bundle(bundle_dir).metadata
    assert set(meta.decision_by_precision) == {"fp16", "int8"}  # FP32's is `decision`, from training
    cfg = tiny_config(parts_folder, trained_run)
    val = split_samples(cfg, load_samples(cfg))["val"]
    labels = np.array([s.label for s in val])
    inputs = preprocess_batch([s.image for s in val], meta.preprocess)
    for precision, role in (("fp16", "onnx_fp16"), ("int8", "onnx_int8")):
        scores = softmax_defect_score(OnnxRuntimeBackend(bundle_dir / ROLE_FILES[role]).infer(inputs))
        t, low, high = choose_operating_point(labels, scores, meta.decision.target_recall, cfg.max_manual_fraction)
        expected = DecisionDefaults(threshold=t, band_low=low, band_high=high,
                                    target_recall=meta.decision.target_recall)
        assert meta.decision_for(precision) == expected
        assert meta.metrics[precision]["own_point_threshold"] == pytest.approx(t)
        # The held-out figures, recomputed here from the test split's scores in this precision's ONNX.
        test = split_samples(cfg, load_samples(cfg))["test"]
        test_labels = np.array([s.label for s in test])
        test_scores = softmax_defect_score(OnnxRuntimeBackend(bundle_dir / ROLE_FILES[role]).infer(
            preprocess_batch([s.image for s in test], meta.preprocess)))
        own = binary_metrics(test_labels, test_scores, t)
        assert meta.metrics[precision]["own_point_recall"] == pytest.approx(own.recall)
        assert meta.metrics[precision]["roc_auc"] == pytest.approx(roc_auc(test_labels, test_scores))
    assert meta.decision_for("fp32") == meta.decision


def test_a_version_1_bundle_still_loads_and_a_newer_one_asks_for_an_update(bundle_dir: Path, tmp_path: Path):
    old = tmp_path / "v1"
    shutil.copytree(bundle_dir, old)
    raw = json.loads((old / "metadata.json").read_text())
    raw["schema_version"] = 1
    del raw["decision_by_precision"]
    (old / "metadata.json").write_text(json.dumps(raw))
    meta = load_bundle(old).metadata
    assert meta.decision_for("int8") == meta.decision  # one operating point for every precision
    raw.update(schema_version=99, a_key_from_the_future=True)
    (old / "metadata.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="schema_version 99") as err:
        load_bundle(old)
    assert str(old / "metadata.json") in str(err.value) and "update the appliance" in err.value.hint


def test_exported_onnx_matches_pytorch_on_real_images(bundle_dir: Path, trained_run: Path):
    from training.model import build_model

    final = load_checkpoint(trained_run / "final.pt")
    bundle = load_bundle(bundle_dir)
    model = build_model("efficientnet_lite0", 1, bundle.metadata.preprocess.input_height)
    model.load_state_dict(final["model_state"])
    golden = np.load(bundle.path("golden"))
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(golden["inputs"])).numpy()
    # The recorded parity is the largest |logit difference| on these same golden inputs.
    assert bundle.metadata.export["parity_max_abs_logit_diff"] == pytest.approx(
        float(np.max(np.abs(golden["logits_fp32"] - ref))), abs=1e-6)
    for precision, tol in (("fp32", 1e-4), ("fp16", 5e-2)):
        out = OnnxRuntimeBackend(bundle.path(f"onnx_{precision}")).infer(golden["inputs"])
        assert np.max(np.abs(out - ref)) < tol, precision
        np.testing.assert_allclose(out, golden[f"logits_{precision}"], atol=1e-5)


def test_dynamic_batch_axis(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    backend = OnnxRuntimeBackend(bundle.path("onnx_fp32"))
    x = np.zeros((3, *bundle.metadata.preprocess.input_shape), np.float32)
    assert backend.infer(x).shape == (3, 2)
    graph = onnx.load(bundle.path("onnx_fp32")).graph
    assert (graph.input[0].name, graph.output[0].name) == ("image", "logits")
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_int8_model_is_symmetric_qdq_that_tensorrt_accepts(bundle_dir: Path):
    path = load_bundle(bundle_dir).path("onnx_int8")
    assert check_qdq(path) == []
    model = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        zp = inits[node.input[2]]
        assert zp.dtype == np.int8 and not zp.any()
    # weights per channel: some zero-point/scale initialisers are vectors
    assert any(inits[n.input[1]].ndim == 1 and inits[n.input[1]].size > 1 for n in qdq)
    # the Linear(1280, 2) head stays in float
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert gemm.input[1] in inits  # float weight straight from an initializer, no DequantizeLinear


def test_int8_agreement_with_fp32_is_measured_on_the_held_out_scores(
        bundle_dir: Path, trained_run: Path, parts_folder: Path):
    from bundle.preprocess import preprocess_batch
    from training.metrics import softmax_defect_score

    meta = load_bundle(bundle_dir).metadata
    cfg = tiny_config(parts_folder, trained_run)
    test = split_samples(cfg, load_samples(cfg))["test"]
    inputs = preprocess_batch([s.image for s in test], meta.preprocess)
    fp32, int8 = (softmax_defect_score(OnnxRuntimeBackend(bundle_dir / ROLE_FILES[role]).infer(inputs))
                  for role in ("onnx_fp32", "onnx_int8"))
    t = meta.decision.threshold
    metrics = meta.metrics["int8"]
    assert metrics["decision_agreement_vs_fp32"] == pytest.approx(np.mean((int8 >= t) == (fp32 >= t)))
    assert metrics["mean_abs_score_diff_vs_fp32"] == pytest.approx(np.mean(np.abs(int8 - fp32)))


def test_the_first_convolutions_stay_float_and_the_rest_are_int8(bundle_dir: Path):
    from export.quantize import FLOAT_CONVS

    model = onnx.load(load_bundle(bundle_dir).path("onnx_int8"))
    produced_by = {out: n.op_type for n in model.graph.node for out in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    # a quantized conv reads its activation and its weight through DequantizeLinear; a float one reads neither
    fed_by_dq = [produced_by.get(c.input[0]) == "DequantizeLinear" and produced_by.get(c.input[1]) == "DequantizeLinear"
                 for c in convs]
    assert fed_by_dq == [False] * FLOAT_CONVS + [True] * (len(convs) - FLOAT_CONVS)
    info = load_bundle(bundle_dir).metadata.export["int8"]
    assert info["float_convs"] == FLOAT_CONVS
    assert info["float_nodes"][:FLOAT_CONVS] == [c.name for c in convs[:FLOAT_CONVS]]


def test_more_float_convolutions_than_the_model_has_is_refused_naming_the_file(bundle_dir: Path, tmp_path: Path):
    from export.quantize import quantize_int8
    from synthetic.parts import render_part

    bundle = load_bundle(bundle_dir)
    frames = [render_part(900 + i, None, 64) for i in range(4)]
    with pytest.raises(BundleError, match=r"float_convs 500: .*model_fp32\.onnx has 49 convolutions"):
        quantize_int8(bundle.path("onnx_fp32"), tmp_path / "q.onnx", frames, bundle.metadata.preprocess,
                      float_convs=500)
    assert not (tmp_path / "q.onnx").exists()


def test_check_qdq_flags_an_asymmetric_model(tmp_path: Path, bundle_dir: Path):
    model = onnx.load(load_bundle(bundle_dir).path("onnx_int8"))
    node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    zp = next(i for i in model.graph.initializer if i.name == node.input[2])
    zp.CopyFrom(numpy_helper.from_array(np.array(3, dtype=np.int8), zp.name))
    onnx.save(model, tmp_path / "bad.onnx")
    problems = check_qdq(tmp_path / "bad.onnx")
    assert any("not 0" in p for p in problems)


def test_modified_bundle_file_is_refused_by_name(bundle_dir: Path, tmp_path: Path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    with open(copy / "model_fp32.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"model_fp32\.onnx \(onnx_fp32\) has sha256 .* changed after export"):
        load_bundle(copy)
    (copy / "model_fp32.onnx").unlink()
    with pytest.raises(BundleError, match=r"model_fp32\.onnx \(onnx_fp32\) is missing"):
        load_bundle(copy)
    (copy / "metadata.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"metadata\.json is not valid JSON"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nothing")


def test_corrupt_checkpoint_is_named(tmp_path: Path, trained_run: Path):
    bad = tmp_path / "last.pt"
    bad.write_bytes((trained_run / "last.pt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"last\.pt is corrupt"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")


def test_resume_continues_after_the_last_epoch(parts_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "resume"
    train(tiny_config(parts_folder, out, epochs=1, max_steps_per_epoch=1), progress=False)
    first = load_checkpoint(out / "last.pt")["state"]
    assert first["epoch"] == 1
    capsys.readouterr()
    train(tiny_config(parts_folder, out, epochs=2, max_steps_per_epoch=1), resume=True, progress=False)
    assert "resuming" in capsys.readouterr().out
    state = load_checkpoint(out / "last.pt")["state"]
    assert state["epoch"] == 2 and [h["epoch"] for h in state["history"]] == [1, 2]


def test_resume_refuses_another_architecture(parts_folder: Path, tmp_path: Path):
    out = tmp_path / "arch"
    train(tiny_config(parts_folder, out, epochs=1, max_steps_per_epoch=1), progress=False)
    with pytest.raises(CheckpointError, match="different input_size"):
        train(tiny_config(parts_folder, out, input_size=32, epochs=2, max_steps_per_epoch=1), resume=True,
              progress=False)


def test_same_seed_same_split(parts_folder: Path, tmp_path: Path):
    cfg = tiny_config(parts_folder, tmp_path)
    a = split_samples(cfg, load_samples(cfg))
    b = split_samples(cfg, load_samples(cfg))
    assert {k: [s.name for s in v] for k, v in a.items()} == {k: [s.name for s in v] for k, v in b.items()}


def test_histogram_calibration_is_capped_to_fit_memory(bundle_dir: Path, tmp_path: Path):
    from export.quantize import HISTOGRAM_MAX_IMAGES, quantize_int8
    from synthetic.parts import render_part

    bundle = load_bundle(bundle_dir)
    frames = [render_part(900 + i, None, 64) for i in range(HISTOGRAM_MAX_IMAGES + 6)]
    info = quantize_int8(bundle.path("onnx_fp32"), tmp_path / "q.onnx", frames, bundle.metadata.preprocess,
                         method="percentile")
    assert info["calibration_images"] == HISTOGRAM_MAX_IMAGES and info["calibration_method"] == "percentile"
    assert check_qdq(tmp_path / "q.onnx") == []


def test_parity_refuses_an_onnx_model_that_disagrees_with_pytorch(bundle_dir: Path, trained_run: Path):
    from export.onnx_export import parity
    from training.model import build_model

    bundle = load_bundle(bundle_dir)
    model = build_model("efficientnet_lite0", 1, bundle.metadata.preprocess.input_height)
    state = load_checkpoint(trained_run / "final.pt")["model_state"]
    model.load_state_dict(state)
    inputs = np.load(bundle.path("golden"))["inputs"]
    assert parity(model, bundle.path("onnx_fp32"), inputs) < 1e-3  # the model it was exported from
    with torch.no_grad():
        model.head.bias[1] += 0.5  # PyTorch now says something else than the ONNX file
    with pytest.raises(BundleError, match=r"disagrees with PyTorch: max \|logit difference\| 0\.5"):
        parity(model, bundle.path("onnx_fp32"), inputs)


def test_an_export_refused_at_parity_leaves_the_previous_bundle_in_place_and_no_partial_folder(
        bundle_dir: Path, trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import export.onnx_export
    from export.writer import build_bundle

    out = tmp_path / "bundle"
    shutil.copytree(bundle_dir, out)
    before = (out / "metadata.json").read_bytes()
    real_parity = export.onnx_export.parity
    # The real comparison, with a tolerance no model can meet: the refusal path as it runs in the field.
    monkeypatch.setattr(export.onnx_export, "parity", lambda m, p, x, tolerance=1e-3: real_parity(m, p, x, -1.0))
    with pytest.raises(BundleError, match="disagrees with PyTorch"):
        build_bundle(trained_run, out, calibration_images=4, golden_images=2)
    assert (out / "metadata.json").read_bytes() == before
    load_bundle(out)  # still whole: every file matches its hash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no bundle.partial, no bundle.old
