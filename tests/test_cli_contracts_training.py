"""README contracts of `python -m export` and `python -m training` options that had no test.

Export: the bundle replaces an existing one only when complete, `--calibration-method` changes the INT8
activation ranges and is recorded, `--int8-float-convs N` keeps exactly the first N convolutions float.
Training: `--patience`, `--balance sampler`, `--augment mild`, `--evaluate-only`.
Everything runs for real: the CLIs as subprocesses where the command line is the contract, tiny trainings
(64x64 pixels, 2 steps per epoch) through the trainer otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from bundle.format import ROLE_FILES, load_bundle
from tests.conftest import tiny_config
from training.__main__ import build_parser, config_from_args
from training.augment import AugmentConfig, mild_profile
from training.trainer import PartsDataset, _make_loader, load_checkpoint, load_samples, split_samples, train

REPO = Path(__file__).resolve().parents[1]
INT8_ONNX = ROLE_FILES["onnx_int8"]
FP32_ONNX = ROLE_FILES["onnx_fp32"]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _metadata(bundle: Path) -> dict:
    return json.loads((bundle / "metadata.json").read_text())


def _activation_scales(onnx_path: Path) -> dict[str, float]:
    """Activation tensor name -> its per-tensor INT8 scale, read from the QuantizeLinear scale initializers."""
    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    return {
        n.input[0]: float(inits[n.input[1]])
        for n in graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits and inits[n.input[1]].size == 1
    }


def _conv_weights_are_float(onnx_path: Path) -> list[tuple[str, bool]]:
    """(name, weight is float) for every Conv in graph order: float means no DequantizeLinear feeds its weight."""
    graph = onnx.load(str(onnx_path)).graph
    producers = {out: n for n in graph.node for out in n.output}
    flags = []
    for conv in (n for n in graph.node if n.op_type == "Conv"):
        producer = producers.get(conv.input[1])
        flags.append((conv.name, producer is None or producer.op_type != "DequantizeLinear"))
    return flags


def _conv_names(onnx_path: Path) -> list[str]:
    return [n.name for n in onnx.load(str(onnx_path)).graph.node if n.op_type == "Conv"]


# --- python -m export ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CliExport:
    out: Path
    proc: subprocess.CompletedProcess[str]
    old_marker: str
    old_hashes: dict[str, str]


CLI_FLOAT_CONVS = 2


@pytest.fixture(scope="module")
def cli_export(trained_run: Path, bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> CliExport:
    """One real `python -m export` over an existing bundle folder, with minmax calibration and 2 float convs."""
    out = tmp_path_factory.mktemp("cli-export") / "bundle"
    shutil.copytree(bundle_dir, out)
    marker = "only-in-the-old-bundle.txt"
    (out / marker).write_text("the previous export left this\n")
    old_hashes = _tree_hashes(out)
    proc = _cli("-m", "export", "--run", str(trained_run), "--out", str(out), "--calibration-images", "16",
                "--golden-images", "8", "--calibration-method", "minmax",
                "--int8-float-convs", str(CLI_FLOAT_CONVS))
    return CliExport(out, proc, marker, old_hashes)


def test_export_cli_replaces_an_existing_bundle_with_a_complete_verified_one(cli_export: CliExport):
    # given an existing bundle folder at --out (set up by the fixture), when `python -m export` runs
    assert cli_export.proc.returncode == 0, cli_export.proc.stderr
    assert f"bundle written to {cli_export.out}" in cli_export.proc.stdout

    # then no temporary sibling (NAME.partial, NAME.old) is left beside it
    assert sorted(p.name for p in cli_export.out.parent.iterdir()) == ["bundle"]
    # and what is there verifies: every file listed, every sha256 matching
    bundle = load_bundle(cli_export.out, verify=True)
    assert bundle.metadata.export["int8"]["float_convs"] == CLI_FLOAT_CONVS  # the new export, not the old one
    # and nothing of the old folder survives: its stray file is gone, the files are exactly the new bundle's
    assert not (cli_export.out / cli_export.old_marker).exists()
    listed = {entry.path for entry in bundle.metadata.files.values()} | {"metadata.json"}
    assert {p.name for p in cli_export.out.iterdir()} == listed
    new_hashes = _tree_hashes(cli_export.out)
    assert new_hashes["metadata.json"] != cli_export.old_hashes["metadata.json"]
    assert new_hashes[INT8_ONNX] != cli_export.old_hashes[INT8_ONNX]


def test_calibration_method_changes_the_int8_activation_scales_and_is_recorded(cli_export: CliExport,
                                                                               bundle_dir: Path):
    # given the session bundle (default percentile) and the CLI export with --calibration-method minmax,
    # both calibrated on the same training images
    assert cli_export.proc.returncode == 0, cli_export.proc.stderr
    percentile_info = _metadata(bundle_dir)["export"]["int8"]
    minmax_info = _metadata(cli_export.out)["export"]["int8"]
    assert percentile_info["calibration_images"] == minmax_info["calibration_images"]

    # then each records the method it was calibrated with
    assert percentile_info["calibration_method"] == "percentile"
    assert minmax_info["calibration_method"] == "minmax"

    # and the activation scales of the tensors both quantize differ
    percentile = _activation_scales(bundle_dir / INT8_ONNX)
    minmax = _activation_scales(cli_export.out / INT8_ONNX)
    common = sorted(percentile.keys() & minmax.keys())
    assert len(common) > 20
    differing = [name for name in common if not math.isclose(percentile[name], minmax[name], rel_tol=1e-6)]
    assert len(differing) > len(common) // 2, f"only {len(differing)} of {len(common)} activation scales differ"
    # minmax takes the whole observed range, the 99.999th percentile clips the extreme tail: wider on balance
    assert np.median([minmax[n] / percentile[n] for n in common]) >= 1.0


def test_int8_float_convs_keeps_exactly_the_first_n_convolutions_float(cli_export: CliExport, bundle_dir: Path):
    assert cli_export.proc.returncode == 0, cli_export.proc.stderr
    fp32_order = _conv_names(cli_export.out / FP32_ONNX)
    for bundle, n in ((cli_export.out, CLI_FLOAT_CONVS), (bundle_dir, 6)):  # --int8-float-convs 2; default 6
        # when the INT8 model's convolutions are read in graph order
        flags = _conv_weights_are_float(bundle / INT8_ONNX)

        # then they are the FP32 model's convolutions, the first N with float weights, every other one quantized
        assert [name for name, _ in flags] == fp32_order
        assert [is_float for _, is_float in flags] == [True] * n + [False] * (len(flags) - n), bundle
        assert _metadata(bundle)["export"]["int8"]["float_convs"] == n


def test_impossible_int8_float_convs_is_a_clean_error_naming_the_onnx_and_keeps_the_old_bundle(
    trained_run: Path, bundle_dir: Path, tmp_path: Path,
):
    # given an existing, valid bundle at --out
    out = tmp_path / "bundle"
    shutil.copytree(bundle_dir, out)
    before = _tree_hashes(out)

    # when the export asks to keep more convolutions float than the model has
    proc = _cli("-m", "export", "--run", str(trained_run), "--out", str(out), "--calibration-images", "16",
                "--golden-images", "8", "--int8-float-convs", "999")

    # then it exits with the bundle error's code, a one-line message naming the ONNX and the valid range
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, proc.stderr
    assert "float_convs 999" in error[0] and FP32_ONNX in error[0]
    assert f"has {len(_conv_names(bundle_dir / FP32_ONNX))} convolutions" in error[0]
    # and the failed export replaced nothing and left no temporary folder
    assert _tree_hashes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


# --- python -m training ----------------------------------------------------------------------------------------


def _cli_config(*flags: str):
    return config_from_args(build_parser().parse_args(["--dataset", "folder", "--data", "parts", *flags]))


def _improved(history: list[dict]) -> list[bool]:
    """The trainer's rule per epoch: a higher val ROC-AUC, or the same with a lower val loss."""
    best_auc, best_loss, flags = -1.0, math.inf, []
    for h in history:
        better = h["val_auc"] > best_auc or (h["val_auc"] == best_auc and h["val_loss"] < best_loss)
        if better:
            best_auc, best_loss = h["val_auc"], h["val_loss"]
        flags.append(better)
    return flags


def test_patience_stops_the_run_once_validation_stops_improving(parts_folder: Path, tmp_path: Path):
    # given --patience 1 (the command line reaches TrainConfig) and a schedule of 6 epochs
    assert _cli_config("--patience", "1").patience == 1
    max_epochs = 6
    run = train(tiny_config(parts_folder, tmp_path / "run", epochs=max_epochs, patience=1), progress=False)

    # then training stopped early, right after the first epoch that did not improve on the best one
    record = json.loads((run / "run.json").read_text())
    history = record["history"]
    improved = _improved(history)
    assert len(history) < max_epochs, f"ran all {max_epochs} epochs: {history}"
    assert improved[-1] is False and all(improved[:-1]), improved
    assert record["training"]["epochs_run"] == len(history)
    # and final.pt holds the best epoch's weights, not the last one's
    best_epoch = max(i for i, ok in enumerate(improved, start=1) if ok)
    assert record["training"]["best_epoch"] == best_epoch < len(history)
    best, final = load_checkpoint(run / "best.pt"), load_checkpoint(run / "final.pt")
    assert all(torch.equal(best["model_state"][k], final["model_state"][k]) for k in best["model_state"])


def test_balance_sampler_draws_class_balanced_batches(parts_folder: Path, tmp_path: Path):
    # given --balance sampler on the command line
    cfg = tiny_config(parts_folder, tmp_path / "run", balance=_cli_config("--balance", "sampler").balance)
    assert cfg.balance == "sampler"
    train_split = split_samples(cfg, load_samples(cfg))["train"]
    labels = np.array([s.label for s in train_split])
    ds = PartsDataset(train_split, cfg.preprocess_spec(), None, cfg.seed, False)

    # when the trainer builds its data loader
    loader = _make_loader(ds, cfg, torch.device("cpu"))

    # then it draws through a weighted sampler whose weights give both classes the same total
    assert isinstance(loader.sampler, torch.utils.data.WeightedRandomSampler)
    weights = loader.sampler.weights.numpy()
    assert math.isclose(weights[labels == 0].sum(), weights[labels == 1].sum())
    # and the defect share of the drawn indices is about one half, not the split's own share
    drawn = np.concatenate([labels[list(loader.sampler)] for _ in range(60)])
    assert abs(labels.mean() - 0.5) > 0.05
    assert abs(drawn.mean() - 0.5) < 0.04, (drawn.mean(), labels.mean())
    # (the default, class-weighted loss, shuffles plainly instead)
    default = _make_loader(ds, tiny_config(parts_folder, tmp_path / "unused"), torch.device("cpu"))
    assert isinstance(default.sampler, torch.utils.data.RandomSampler)

    # and a run trained that way records it
    run = train(cfg, progress=False)
    assert json.loads((run / "run.json").read_text())["config"]["balance"] == "sampler"
    assert load_checkpoint(run / "final.pt")["config"]["balance"] == "sampler"


def test_augment_mild_selects_the_mild_profile_in_the_config_and_the_report(parts_folder: Path, tmp_path: Path):
    # given --augment mild (with a larger --max-rotation, which mild caps at 5 degrees)
    augment = _cli_config("--augment", "mild", "--max-rotation", "30").augment

    # then TrainConfig gets the mild profile: flips, rotation, gain/gamma, noise; no stains, shadows or shake
    assert augment == mild_profile(5.0)
    assert augment != AugmentConfig()
    assert augment.rotation.max_rotation_deg == 5.0
    assert not augment.background.enabled and not augment.shake.enabled
    assert augment.lighting.gradient_p == 0.0 and augment.lighting.shadow_p == 0.0
    assert augment.flip.enabled and augment.noise.enabled

    # and a run trained with it says so in run.json and in the report
    run = train(tiny_config(parts_folder, tmp_path / "run", augment=augment), progress=False)
    expected = augment.model_dump(mode="json")
    assert json.loads((run / "run.json").read_text())["config"]["augment"] == expected
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["extra"]["config"]["augment"] == expected
    assert '"background": {"enabled": false' in (run / "report" / "report.md").read_text()


def test_evaluate_only_rescores_a_finished_run_without_training(trained_run: Path, tmp_path: Path):
    # given a copy of a finished run (the session's run is shared with other tests)
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    checkpoints_before = {name: _sha256(run / name) for name in ("best.pt", "last.pt")}
    weights_before = load_checkpoint(run / "final.pt")["model_state"]
    report_before = json.loads((run / "report" / "report.json").read_text())
    history_before = json.loads((run / "run.json").read_text())["history"]
    assert "evaluation" not in report_before["extra"]["training"]

    # when `python -m training --evaluate-only` runs on it
    proc = _cli("-m", "training", "--evaluate-only", "--out", str(run))

    # then nothing trained: the checkpoints are byte-identical, final.pt holds the same weights, no new epoch
    assert proc.returncode == 0, proc.stderr
    assert f"re-evaluated {run}" in proc.stdout
    assert not [line for line in proc.stdout.splitlines() if line.startswith(("epoch ", "early stop"))]
    assert {name: _sha256(run / name) for name in checkpoints_before} == checkpoints_before
    final = load_checkpoint(run / "final.pt")
    assert final["model_state"].keys() == weights_before.keys()
    assert all(torch.equal(final["model_state"][k], weights_before[k]) for k in weights_before)
    assert json.loads((run / "run.json").read_text())["history"] == history_before
    # and the report was rewritten as a re-evaluation of the same training
    report = json.loads((run / "report" / "report.json").read_text())
    evaluation = report["extra"]["training"]["evaluation"]
    assert evaluation["trained_on"]["epochs_run"] == report_before["extra"]["training"]["epochs_run"]
    assert "re_evaluated_s" in evaluation
    assert final["training"]["evaluation"] == evaluation
    # same weights, same held-out split: the same scores
    assert report["roc_auc"] == report_before["roc_auc"]
