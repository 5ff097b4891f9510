"""Training options beyond the basic schedule: start from a previous run, weight averaging, bf16 autocast."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bundle.errors import CheckpointError
from tests.conftest import tiny_config
from training import trainer
from training.__main__ import main as training_main
from training.trainer import WeightEma, load_checkpoint, train, use_bf16


def _params(state: dict) -> dict[str, torch.Tensor]:
    # Parameters only: batch-norm running statistics move with every training forward pass, even at lr ~ 0.
    return {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_init_from_starts_from_the_previous_runs_weights(trained_run: Path, parts_folder: Path, tmp_path: Path):
    # The tiny run is two steps away from a fresh start; shift its head so the two are far apart.
    ckpt = load_checkpoint(trained_run / "final.pt")
    ckpt["model_state"]["head.weight"] += 0.5
    torch.save(ckpt, tmp_path / "previous.pt")
    start = _params(ckpt["model_state"])
    # A learning rate of ~0 keeps the weights where they started, which shows where they started.
    cfg = dict(epochs=1, max_steps_per_epoch=1, lr=1e-12, warmup_epochs=0)
    continued = train(tiny_config(parts_folder, tmp_path / "continued", init_from=tmp_path / "previous.pt", **cfg),
                      progress=False)
    fresh = train(tiny_config(parts_folder, tmp_path / "fresh", **cfg), progress=False)
    assert _max_diff(start, _params(load_checkpoint(continued / "final.pt")["model_state"])) < 1e-6
    assert _max_diff(start, _params(load_checkpoint(fresh / "final.pt")["model_state"])) > 0.4


def test_init_from_another_colour_names_the_file_and_the_setting(trained_run: Path, parts_folder: Path,
                                                                  tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"final\.pt was trained with different color \(color='gray'\)"):
        train(tiny_config(parts_folder, tmp_path / "x", color="rgb", init_from=trained_run / "final.pt"),
              progress=False)


def test_init_from_may_change_the_input_size(trained_run: Path, parts_folder: Path, tmp_path: Path):
    # Same weights, larger images: fine-tuning a model at a higher resolution than it was trained at, on purpose.
    run = train(tiny_config(parts_folder, tmp_path / "larger", input_size=96, epochs=1, max_steps_per_epoch=1,
                            init_from=trained_run / "final.pt", allow_input_size_change=True), progress=False)
    final = load_checkpoint(run / "final.pt")
    assert final["config"]["input_size"] == 96 and final["preprocess"]["input_height"] == 96


def test_init_from_a_corrupt_file_is_named(parts_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    bad = tmp_path / "final.pt"
    bad.write_bytes(b"not a checkpoint")
    rc = training_main(["--dataset", "folder", "--data", str(parts_folder), "--out", str(tmp_path / "run"),
                        "--input-size", "64", "--epochs", "1", "--max-steps-per-epoch", "1", "--init-from", str(bad),
                        "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and f"checkpoint {bad} is corrupt" in err


def test_weight_ema_follows_the_documented_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    ema = WeightEma(model, decay=0.9)
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model(torch.randn(4, 1, 8, 8))  # training-mode forward: moves the batch-norm statistics
    ema.update(model)
    d = min(0.9, 2 / 11)  # warm-up ramp on the first update
    torch.testing.assert_close(ema.model[0].weight, w0 + (1.0 - d))
    torch.testing.assert_close(ema.model[1].running_mean, model[1].running_mean * (1.0 - d))
    assert int(ema.model[1].num_batches_tracked) == int(model[1].num_batches_tracked) == 1
    for _ in range(200):
        ema.update(model)
    # After many updates the decay is the configured one and the average has converged on the weights.
    torch.testing.assert_close(ema.model[0].weight, model[0].weight.detach(), atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ema_run_validates_and_keeps_the_average(parts_folder: Path, tmp_path: Path):
    out = tmp_path / "ema"
    train(tiny_config(parts_folder, out, epochs=1, max_steps_per_epoch=2, ema_decay=0.9), progress=False)
    last = load_checkpoint(out / "last.pt")
    best = load_checkpoint(out / "best.pt")
    assert last["ema_state"]["updates"] == 2
    average, raw = last["ema_state"]["model_state"], last["model_state"]
    assert _max_diff(_params(best["model_state"]), _params(average)) == 0.0
    assert _max_diff(_params(average), _params(raw)) > 0.0
    # Resuming continues the same average rather than starting a new one.
    train(tiny_config(parts_folder, out, epochs=2, max_steps_per_epoch=2, ema_decay=0.9), resume=True,
          progress=False)
    assert load_checkpoint(out / "last.pt")["ema_state"]["updates"] == 4


@pytest.mark.parametrize(
    ("precision", "device", "native", "expected"),
    [
        ("fp32", "cuda", True, False),
        ("bf16", "cpu", False, True),
        ("auto", "cuda", False, True),
        ("auto", "cpu", True, True),
        ("auto", "cpu", False, False),
    ],
)
def test_bf16_autocast_choice(monkeypatch: pytest.MonkeyPatch, precision: str, device: str, native: bool,
                              expected: bool):
    # The CPU's capability is injected: this machine has one answer, the rule must hold for both.
    monkeypatch.setattr(trainer, "_cpu_has_native_bf16", lambda: native)
    assert use_bf16(precision, torch.device(device)) is expected


def test_bf16_training_on_the_cpu_runs_and_keeps_float32_weights(parts_folder: Path, tmp_path: Path):
    run = train(tiny_config(parts_folder, tmp_path / "bf16", epochs=1, max_steps_per_epoch=1, precision="bf16"),
                progress=False)
    state = load_checkpoint(run / "final.pt")["model_state"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.dtype == torch.float32)
