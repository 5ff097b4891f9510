"""Training: class-balanced AdamW with warm-up and cosine decay, checkpoints with resume, early stopping.

A run directory holds everything about one training:

    run.json       configuration, data fingerprint, split sizes, timings, best epoch
    split.json     image names of the train / validation / test splits (anyone can re-score the split)
    last.pt        the latest epoch (resume point), written atomically every epoch
    best.pt        the epoch with the best validation ROC-AUC
    final.pt       best weights + preprocessing + operating point: what export/ reads
    report/        evaluation on the held-out test split (JSON, Markdown, PNG plots); with a previous model
                   (compare_to, or the init_from run), both models on the same test parts

The operating threshold and the uncertainty band are chosen on the validation split; the test split is
only scored, never used for a decision.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bundle.errors import ApplianceError, CheckpointError, DatasetError
from bundle.format import CLASS_NAMES
from bundle.images import DEFAULT_BIT_DEPTH, DEFAULT_MAX_PIXELS, BitDepth
from bundle.preprocess import PreprocessSpec, preprocess
from training.augment import AugmentConfig, augment
from training.datasets import (
    CombinedDataset,
    Sample,
    class_counts,
    content_hash,
    fingerprint,
    load_elpv,
    load_folders,
    load_synthetic,
    stratified_split,
)
from training.metrics import choose_operating_point, roc_auc, softmax_defect_score
from training.model import Backbone, build_model
from training.report import build_comparison, write_report


class TrainConfig(BaseModel):
    """Everything that defines a training run (saved in run.json and in every checkpoint)."""

    model_config = ConfigDict(extra="forbid")

    dataset: Literal["folder", "elpv", "synthetic"] = "folder"
    data_dir: Path | None = None
    # More customer-layout folders trained on together with data_dir (earlier datasets, a station's review
    # exports): one dataset, each picture once (training.datasets.load_folders). Folder dataset only.
    extra_data_dirs: list[Path] = Field(default_factory=list)
    synthetic_ok: int = Field(160, ge=4)
    synthetic_defect: int = Field(80, ge=4)
    synthetic_severity: float = Field(1.0, gt=0, le=5)
    # How image files are read, as the station reads its camera (read_image with camera.bit_depth and
    # camera.max_pixels): a Mono12 camera's frames saved as 16-bit files need 12, where "auto" takes them as
    # 16-bit data, almost black. Only the folder dataset holds camera data; ELPV's files and the synthetic
    # parts are 8-bit. Runs saved before these fields existed were read with the defaults.
    bit_depth: BitDepth = DEFAULT_BIT_DEPTH
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    out_dir: Path = Path("runs/latest")
    backbone: Backbone = "efficientnet_lite0"
    pretrained: bool = True
    weights: Path | None = None
    # Start from a previous run of this project (final.pt / best.pt / last.pt): retraining a shipped model on
    # new parts, or a second, shorter schedule after the first. Weights only: optimizer and schedule start fresh.
    # A run folder (its final.pt) or a checkpoint file. Backbone, colour, input size and resize must be the
    # checkpoint's; allow_input_size_change lets the input size differ (fine-tuning at a higher resolution).
    init_from: Path | None = None
    allow_input_size_change: bool = False
    # The previous model the report compares this one with on this run's test split (a run folder or its
    # final.pt); None: the init_from checkpoint when it has an operating point. compare=False: no comparison.
    compare_to: Path | None = None
    compare: bool = True
    color: Literal["gray", "rgb"] = "gray"
    input_size: int = Field(224, ge=32, le=1024)
    resize: Literal["stretch", "center_crop", "letterbox"] = "stretch"
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    dropout: float = Field(0.2, ge=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    # Exponential moving average of the weights (e.g. 0.998), validated and saved instead of the raw weights:
    # on a small dataset the epoch-to-epoch noise of the raw weights is larger than what one more epoch gains.
    ema_decay: float | None = Field(None, gt=0, lt=1)
    # auto: bfloat16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX), float32 elsewhere,
    # where emulated bf16 would be slower. Weights, loss and evaluation stay float32 either way.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Train on ELPV's annotated defect probability (0, 1/3, 2/3, 1) instead of the hard label.
    soft_labels: bool = False
    # weighted_loss: class weights inversely proportional to frequency; sampler: balanced batches.
    balance: Literal["weighted_loss", "sampler", "none"] = "weighted_loss"
    seed: int = 0
    patience: int = Field(6, ge=1)
    test_fraction: float = Field(0.25, gt=0, lt=1)
    val_fraction: float = Field(0.15, gt=0, lt=1)
    target_recall: float = Field(0.95, gt=0, le=1)
    max_manual_fraction: float = Field(0.1, ge=0, le=1)
    max_steps_per_epoch: int | None = Field(None, ge=1)
    num_workers: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # None: no augmentation (the preprocessing alone).
    augment: AugmentConfig | None = AugmentConfig()

    @field_validator("bit_depth")
    @classmethod
    def _bit_depth_needs_camera_data(cls, value: BitDepth, info: ValidationInfo) -> BitDepth:
        dataset = info.data.get("dataset", "folder")
        if value not in ("auto", 8) and dataset != "folder":
            raise ValueError(
                f"bit depth {value} applies to --dataset folder only; the {dataset} dataset's images are 8-bit"
            )
        return value

    @field_validator("extra_data_dirs")
    @classmethod
    def _extra_folders_need_the_folder_dataset(cls, value: list[Path], info: ValidationInfo) -> list[Path]:
        dataset = info.data.get("dataset", "folder")
        if value and dataset != "folder":
            raise ValueError(f"several data folders apply to --dataset folder only, not {dataset}")
        return value

    def data_dirs(self) -> list[Path]:
        """The dataset folders in --data order (empty when none is set)."""
        return ([self.data_dir] if self.data_dir is not None else []) + list(self.extra_data_dirs)

    def preprocess_spec(self) -> PreprocessSpec:
        channels = 1 if self.color == "gray" else 3
        # [-1, 1] scaling: what the pretrained Lite0 weights expect, and harmless from scratch.
        return PreprocessSpec(
            input_height=self.input_size, input_width=self.input_size, color=self.color,
            resize=self.resize, mean=(0.5,) * channels, std=(0.5,) * channels,
        )


# Fields that change the network or its input: resuming across a change would be meaningless.
_ARCHITECTURE_KEYS = ("backbone", "color", "input_size", "resize", "bit_depth")
# Fields a run started from a checkpoint (init_from) must share with it: the weights' shapes (backbone,
# colour) and what the input pixels mean (input size, resize). The convolutions do not depend on the image
# size, so allow_input_size_change may drop input_size: fine-tuning a model at a larger size, on purpose.
_INIT_KEYS = ("backbone", "color", "input_size", "resize")


def load_dataset(cfg: TrainConfig) -> tuple[list[Sample], CombinedDataset | None]:
    """The samples, and for the folder dataset where each came from (sources, duplicates, per image)."""
    if cfg.dataset == "folder":
        if cfg.data_dir is None:
            raise DatasetError("dataset 'folder' needs a data directory", hint="pass --data DIR")
        combined = load_folders(cfg.data_dirs(), bit_depth=cfg.bit_depth, max_pixels=cfg.max_pixels)
        return combined.samples, combined
    if cfg.dataset == "elpv":
        return load_elpv(cfg.data_dir, max_pixels=cfg.max_pixels), None
    return load_synthetic(cfg.synthetic_ok, cfg.synthetic_defect, seed=cfg.seed, severity=cfg.synthetic_severity), None


def load_samples(cfg: TrainConfig) -> list[Sample]:
    return load_dataset(cfg)[0]


def split_samples(cfg: TrainConfig, samples: Sequence[Sample]) -> dict[str, list[Sample]]:
    """Deterministic train / val / test split (test first, so it does not depend on val_fraction)."""
    rest, test = stratified_split(samples, cfg.test_fraction, seed=cfg.seed)
    train, val = stratified_split(rest, cfg.val_fraction, seed=cfg.seed + 1)
    return {"train": train, "val": val, "test": test}


class PartsDataset(Dataset):
    """Samples -> (input tensor, target); augmentation seeded by (seed, epoch, index): reproducible."""

    def __init__(self, samples: Sequence[Sample], spec: PreprocessSpec, aug: AugmentConfig | None,
                 seed: int, soft_labels: bool) -> None:
        self.samples = list(samples)
        self.spec = spec
        self.aug = aug
        self.seed = seed
        self.soft_labels = soft_labels
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.samples[idx]
        img = s.image
        if self.aug is not None:
            img = augment(img, np.random.default_rng([self.seed, self.epoch, idx]), self.aug)
        x = torch.from_numpy(preprocess(img, self.spec))
        p = s.fine_label / 3.0 if self.soft_labels and s.fine_label >= 0 else float(s.label)
        return x, torch.tensor([1.0 - p, p], dtype=torch.float32)


def torch_device(cfg: TrainConfig) -> torch.device:
    """The device `cfg.device` asks for: CUDA when asked for, or with "auto" when one is available; else the CPU."""
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older or newer torch without these probes: stay on the safe side
        return False


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether training autocasts to bfloat16 (see TrainConfig.precision)."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or _cpu_has_native_bf16()


class WeightEma:
    """Exponential moving average of a model's parameters and batch-norm statistics.

    The decay ramps up as (1 + n) / (10 + n) over the first updates so the average is not dominated by the
    starting weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        import copy

        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = model.state_dict()
        for name, avg in self.model.state_dict().items():
            if avg.dtype.is_floating_point:
                avg.lerp_(current[name].detach(), 1.0 - d)
            else:  # num_batches_tracked
                avg.copy_(current[name])

    def state_dict(self) -> dict:
        return {"updates": self.updates, "model_state": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        self.model.load_state_dict(state["model_state"])


@torch.no_grad()
def predict_logits(model: nn.Module, samples: Sequence[Sample], spec: PreprocessSpec,
                   device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Logits (N, 2) for samples, through the runtime preprocessing and no augmentation."""
    model.eval()
    out = []
    batch = np.empty((batch_size, *spec.input_shape), dtype=np.float32)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        for i, s in enumerate(chunk):
            preprocess(s.image, spec, out=batch[i])
        x = torch.from_numpy(batch[: len(chunk)]).to(device)
        out.append(model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.float32)


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by this trainer; CheckpointError names the file when it is unusable."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated zip, pickle garbage, ...
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a checkpoint ({type(exc).__name__}: {exc})",
            hint="delete it to start over, or resume from best.pt",
        ) from exc
    if not isinstance(ckpt, dict) or "model_state" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint of this project")
    return ckpt


def resolve_checkpoint(path: Path) -> Path:
    """A run folder means its final.pt; a file is taken as it is (final.pt, best.pt, last.pt)."""
    path = Path(path)
    if path.is_dir():
        final = path / "final.pt"
        if not final.is_file():
            raise CheckpointError(f"run folder {path} has no final.pt (the run has not finished)",
                                  hint=f"finish it with --resume --out {path}, or name a checkpoint: {path}/best.pt")
        return final
    return path


def init_checkpoint(cfg: TrainConfig) -> tuple[Path, dict] | None:
    """The checkpoint cfg.init_from names, loaded and checked against cfg; None without init_from.

    CheckpointError (exit code 5) names the file and every setting that differs from this run's.
    """
    if cfg.init_from is None:
        return None
    path = resolve_checkpoint(cfg.init_from)
    ckpt = load_checkpoint(path)
    keys = [k for k in _INIT_KEYS if not (k == "input_size" and cfg.allow_input_size_change)]
    saved = {k: ckpt["config"].get(k, TrainConfig.model_fields[k].default) for k in keys}
    asked = cfg.model_dump(mode="json")
    changed = [k for k in keys if saved[k] != asked[k]]
    if changed:
        was = ", ".join(f"{k}={saved[k]!r}" for k in changed)
        now = ", ".join(f"{k}={asked[k]!r}" for k in changed)
        hint = (f"this run asks for {now}: train with the checkpoint's settings (on the command line, leave out "
                "--backbone, --color and --input-size and they are taken from it)")
        if changed == ["input_size"]:
            hint += "; to fine-tune it at another input size on purpose, add --allow-input-size-change"
        raise CheckpointError(f"checkpoint {path} was trained with different {', '.join(changed)} ({was})", hint=hint)
    return path, ckpt


def initial_model(cfg: TrainConfig, start: tuple[Path, dict] | None = None) -> nn.Module:
    """The network a run starts from: ImageNet (or --weights, or nothing), or the init_from checkpoint's weights.

    `start` is `init_checkpoint(cfg)` when the caller has it already; else it is loaded here.
    """
    if start is None:
        start = init_checkpoint(cfg)
    # With init_from the ImageNet weights would be overwritten at once: do not load them.
    model = build_model(cfg.backbone, 1 if cfg.color == "gray" else 3, cfg.input_size,
                        cfg.pretrained and start is None, cfg.weights, cfg.dropout)
    if start is not None:
        path, ckpt = start
        try:
            model.load_state_dict(ckpt["model_state"])
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {path} does not fit a {cfg.backbone} network ({exc})") from exc
    return model


def comparison_checkpoint(cfg: TrainConfig, start: tuple[Path, dict] | None = None) -> tuple[Path, dict] | None:
    """The previous model the report compares this run with, loaded; None for no comparison.

    compare_to names it (an error when it is unusable: found before training, not after); else the init_from
    checkpoint when it has an operating point (a run's final.pt; best.pt and last.pt have none).
    """
    if not cfg.compare:
        return None
    if cfg.compare_to is not None:
        path = resolve_checkpoint(cfg.compare_to)
        ckpt = load_checkpoint(path)
        if "decision" not in ckpt or "preprocess" not in ckpt:
            raise CheckpointError(f"checkpoint {path} has no operating point to compare at (it is not a run's "
                                  "final.pt)", hint="--compare-to RUN or RUN/final.pt of a finished run")
        return path, ckpt
    if start is None and cfg.init_from is not None:
        start = init_checkpoint(cfg)
    if start is None:
        return None
    path, ckpt = start
    if "decision" not in ckpt or "preprocess" not in ckpt:
        print(f"note: {path} has no operating point (it is not a final.pt): the report compares no previous "
              "model; --compare-to RUN names one")
        return None
    return path, ckpt


def trained_on_hashes(path: Path, ckpt: dict) -> tuple[set[str] | None, str]:
    """Content hashes of the images a run's model was trained and validated on, and how they were found.

    From the run's run.json (per-image sha256) and split.json when the checkpoint sits in its run folder; for
    a run written before run.json had them, by reading its data again from where its config says (its split
    checked against split.json; when that differs, all of its images count). None when neither works.
    """
    run = path.parent
    split = _read_json(run / "split.json")
    record = _read_json(run / "run.json")
    images = ((record or {}).get("data") or {}).get("images")
    if split and isinstance(images, dict) and ckpt["config"] == (record or {}).get("config"):
        names = [*split.get("train", []), *split.get("val", [])]
        if names and all("sha256" in (images.get(n) or {}) for n in names):
            return ({images[n]["sha256"] for n in names},
                    "by content hash of the decoded pixels, from the old run's run.json and split.json")
    try:
        old = TrainConfig.model_validate(dict(ckpt["config"], out_dir=str(run), device="cpu"))
        samples = load_samples(old)
    except Exception as exc:  # its data is elsewhere, or a config this version cannot read
        reason = exc.message if isinstance(exc, DatasetError) else f"{type(exc).__name__}: {exc}"
        return None, f"the old run's image hashes are not in {run / 'run.json'} and its data cannot be read: {reason}"
    splits = split_samples(old, samples)
    used = splits["train"] + splits["val"]
    where = ", ".join(map(str, old.data_dirs())) or old.dataset
    how = f"by content hash of the decoded pixels, reading the old run's data again ({where})"
    if split and any([s.name for s in splits[k]] != split.get(k) for k in ("train", "val")):
        used = samples
        how += "; its split.json differs from the split of that data, so all of its images count as trained on"
    return {content_hash(s.image) for s in used}, how


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def compare_with_previous(previous: tuple[Path, dict], cfg: TrainConfig, test: Sequence[Sample],
                          test_labels: np.ndarray, test_scores: np.ndarray, threshold: float,
                          device: torch.device) -> dict:
    """The report's comparison: the previous model and this one on this run's test split, each at its own
    operating point, leaving out test images the previous model was trained or validated on."""
    path, ckpt = previous
    old_cfg = ckpt["config"]
    old_spec = PreprocessSpec.model_validate(ckpt["preprocess"])
    old_model = build_model(old_cfg["backbone"], old_spec.channels, old_spec.input_width, pretrained=False,
                            dropout=old_cfg.get("dropout", 0.2))
    old_model.load_state_dict(ckpt["model_state"])
    old_model.to(device)
    old_scores = softmax_defect_score(predict_logits(old_model, test, old_spec, device))
    trained_on, how = trained_on_hashes(path, ckpt)
    if trained_on is None:
        compared = np.ones(len(test), dtype=bool)
    else:
        compared = np.array([content_hash(s.image) not in trained_on for s in test], dtype=bool)
    init = resolve_checkpoint(cfg.init_from) if cfg.init_from is not None else None
    return build_comparison(
        test_labels, old_scores, float(ckpt["decision"]["threshold"]), test_scores, threshold, compared,
        old={"checkpoint": str(path), "backbone": old_cfg.get("backbone"), "color": old_spec.color,
             "input_size": old_spec.input_width,
             "data_fingerprint": ckpt.get("training", {}).get("fingerprint_sha256")},
        new={"checkpoint": str(cfg.out_dir / "final.pt"), "backbone": cfg.backbone, "color": cfg.color,
             "input_size": cfg.input_size,
             "init_from_old": init is not None and init.resolve() == path.resolve()},
        overlap={"checked": trained_on is not None, "method": how},
    )


def _check_architecture(ckpt: dict, cfg: TrainConfig, path: Path, hint: str,
                        keys: Sequence[str] = _ARCHITECTURE_KEYS) -> None:
    # A checkpoint from before a field existed was trained with that field's default.
    saved = {k: ckpt["config"].get(k, TrainConfig.model_fields[k].default) for k in keys}
    changed = [k for k in keys if saved[k] != cfg.model_dump(mode="json")[k]]
    if changed:
        was = ", ".join(f"{k}={saved[k]!r}" for k in changed)
        raise CheckpointError(f"checkpoint {path} was trained with different {', '.join(changed)} ({was})", hint=hint)


def _lr_lambda(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _class_weights(train: Sequence[Sample]) -> torch.Tensor:
    n_ok, n_defect = class_counts(train)
    total = n_ok + n_defect
    return torch.tensor([total / (2 * n_ok), total / (2 * n_defect)], dtype=torch.float32)


def _make_loader(ds: PartsDataset, cfg: TrainConfig, device: torch.device) -> DataLoader:
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = None
    if cfg.balance == "sampler":
        labels = np.array([s.label for s in ds.samples])
        freq = np.bincount(labels, minlength=2).astype(np.float64)
        weights = torch.as_tensor(1.0 / freq[labels], dtype=torch.double)
        sampler = torch.utils.data.WeightedRandomSampler(weights, len(labels), generator=generator)
    return DataLoader(
        ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler, generator=generator,
        num_workers=cfg.num_workers, drop_last=len(ds) > cfg.batch_size, pin_memory=device.type == "cuda",
    )


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train, evaluate on the held-out split, and return the run directory."""
    from tqdm import tqdm

    started = time.time()
    # The checkpoints named (init_from, compare_to) are checked before any image is read or file written.
    start = init_checkpoint(cfg)
    previous = comparison_checkpoint(cfg, start)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    out = cfg.out_dir
    device = torch_device(cfg)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    spec = cfg.preprocess_spec()

    samples, combined = load_dataset(cfg)
    if combined is not None:
        _print_sources(combined)
    splits = split_samples(cfg, samples)
    out.mkdir(parents=True, exist_ok=True)
    (out / "split.json").write_text(json.dumps({k: [s.name for s in v] for k, v in splits.items()}, indent=1))

    model = initial_model(cfg, start)
    if start is not None:
        print(f"starting from the weights of {start[0]}")
    # channels_last: the layout oneDNN and cuDNN convolutions are fastest in (about 25 % per step on a CPU).
    model.to(device, memory_format=torch.channels_last)
    ema = WeightEma(model, cfg.ema_decay) if cfg.ema_decay is not None else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_ds = PartsDataset(splits["train"], spec, cfg.augment, cfg.seed, cfg.soft_labels)
    loader = _make_loader(train_ds, cfg, device)
    steps_per_epoch = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    )
    weight = _class_weights(splits["train"]).to(device) if cfg.balance == "weighted_loss" else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)

    state = {"epoch": 0, "best_auc": -1.0, "best_loss": math.inf, "best_epoch": 0, "stale": 0, "history": []}
    last = out / "last.pt"
    if resume and last.exists():
        ckpt = load_checkpoint(last)
        _check_architecture(
            ckpt, cfg, last, "use a new --out directory, or the same settings as the checkpoint"
        )
        model.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        scheduler.load_state_dict(ckpt["scheduler_state"])
        if ema is not None and "ema_state" in ckpt:
            ema.load_state_dict(ckpt["ema_state"])
        state = ckpt["state"]
        print(f"resuming {out} after epoch {state['epoch']} (best val AUC {state['best_auc']:.4f})")

    bf16 = use_bf16(cfg.precision, device)
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if state["stale"] >= cfg.patience:
            print(f"early stop: validation AUC has not improved for {cfg.patience} epochs")
            break
        model.train()
        train_ds.epoch = epoch
        epoch_started = time.time()
        running, seen = 0.0, 0
        bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress,
                   leave=False, unit="batch")
        for step, (x, target) in enumerate(bar):
            if step >= steps_per_epoch:
                break
            x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
            target = target.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            loss = loss_fn(logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            running += loss.item() * len(x)
            seen += len(x)
            bar.set_postfix(loss=f"{running / seen:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        bar.close()

        evaluated = ema.model if ema is not None else model
        val_logits = predict_logits(evaluated, splits["val"], spec, device)
        val_labels = np.array([s.label for s in splits["val"]])
        val_loss = float(nn.functional.cross_entropy(torch.from_numpy(val_logits), torch.from_numpy(val_labels)))
        val_auc = roc_auc(val_labels, softmax_defect_score(val_logits))
        improved = val_auc > state["best_auc"] or (val_auc == state["best_auc"] and val_loss < state["best_loss"])
        epoch_s = round(time.time() - epoch_started, 1)
        state["history"].append({"epoch": epoch, "train_loss": running / max(seen, 1), "val_loss": val_loss,
                                 "val_auc": val_auc, "seconds": epoch_s})
        state["epoch"] = epoch
        if improved:
            state.update(best_auc=val_auc, best_loss=val_loss, best_epoch=epoch, stale=0)
        else:
            state["stale"] += 1
        print(
            f"epoch {epoch:3d}  train loss {running / max(seen, 1):.4f}  val loss {val_loss:.4f}  "
            f"val AUC {val_auc:.4f}  {epoch_s:.0f} s{'  *' if improved else ''}",
            flush=True,
        )
        ckpt = {
            "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
            "scheduler_state": scheduler.state_dict(), "state": state, "config": cfg.model_dump(mode="json"),
        }
        if ema is not None:
            ckpt["ema_state"] = ema.state_dict()
        _atomic_save(ckpt, last)
        if improved:  # best.pt holds the weights that were validated (the average when EMA is on)
            _atomic_save({"model_state": evaluated.state_dict(), "config": ckpt["config"], "state": state},
                         out / "best.pt")

    best = load_checkpoint(out / "best.pt")
    model.load_state_dict(best["model_state"])
    final = finish(cfg, model, splits, spec, device, samples, state, time.time() - started, combined=combined,
                   previous=previous)
    return final.parent


def _print_sources(combined: CombinedDataset) -> None:
    for src in combined.sources:
        tag = f"{src['tag']}: " if src["tag"] else ""
        print(f"{tag}{src['folder']} ({src['kind']}): {src['images']} images, {src['kept']} kept "
              f"({src['ok']} ok, {src['defect']} defect)")
    d = combined.duplicates
    if d["duplicates_dropped"] or d["conflicting_labels_dropped"]:
        print(f"duplicates by content: {d['duplicates_dropped']} extra copies dropped, "
              f"{d['conflicting_labels_dropped']} images dropped whose copies disagree on the class")
    if d.get("duplicates_kept"):
        print(f"note: {d['duplicates_kept']} extra copies of a picture in the folder ({d['conflicting_labels_kept']} "
              "images whose copies disagree on the class), kept: a single folder is read whole")


def evaluate_run(run_dir: Path, data_dir: Path | Sequence[Path] | None = None, default_data: bool = False) -> Path:
    """Re-score a finished run's final.pt: operating point on validation, report on test, final.pt updated.

    `data_dir` points at a copy of the data elsewhere (a run on several folders: as many, in the same order);
    `default_data` goes back to the dataset's default source (ELPV: the installed package). Used when a model
    was trained on another machine. The comparison with a previous model is made again when that model's
    checkpoint is still where the run's config names it, and left out (with a note) when not.
    """
    started = time.time()
    final = load_checkpoint(run_dir / "final.pt")
    # Score on whatever this machine has (the run may come from a GPU machine).
    values = dict(final["config"], out_dir=str(run_dir), device="auto")
    if default_data:
        values["data_dir"] = None
        values["extra_data_dirs"] = []
    elif data_dir is not None:
        folders = [data_dir] if isinstance(data_dir, (str, Path)) else list(data_dir)
        trained_on = len(values.get("extra_data_dirs", [])) + 1
        if len(folders) != trained_on:
            raise DatasetError(f"run {run_dir} was trained on {trained_on} data folder(s), {len(folders)} given",
                               hint="give a copy of each, in the order of the training's --data")
        values["data_dir"], values["extra_data_dirs"] = str(folders[0]), [str(f) for f in folders[1:]]
    cfg = TrainConfig.model_validate(values)
    spec = cfg.preprocess_spec()
    model = build_model(cfg.backbone, spec.channels, cfg.input_size, pretrained=False, dropout=cfg.dropout)
    model.load_state_dict(final["model_state"])
    device = torch_device(cfg)
    model.to(device)
    samples, combined = load_dataset(cfg)
    try:
        previous = comparison_checkpoint(cfg)
    except ApplianceError as exc:
        print(f"note: no comparison with the previous model: {exc.message}")
        previous = None
    state = {"epoch": final["training"]["epochs_run"], "best_epoch": final["training"]["best_epoch"],
             "best_auc": final["training"]["best_val_auc"], "history": []}
    if (run_dir / "run.json").is_file():
        state["history"] = json.loads((run_dir / "run.json").read_text()).get("history", [])
    trained_s = float(final["training"].get("wall_time_s", 0.0))
    finish(cfg, model, split_samples(cfg, samples), spec, device, samples, state, trained_s,
           evaluated={"re_evaluated_s": round(time.time() - started, 1), "trained_on": final["training"]},
           combined=combined, previous=previous)
    return run_dir


def finish(cfg: TrainConfig, model: nn.Module, splits: dict[str, list[Sample]], spec: PreprocessSpec,
           device: torch.device, samples: Sequence[Sample], state: dict, seconds: float,
           evaluated: dict | None = None, combined: CombinedDataset | None = None,
           previous: tuple[Path, dict] | None = None) -> Path:
    """Choose the operating point on validation data, score the test split, write report and final.pt.

    `combined`: where the folder dataset's images came from (run.json keeps it per image); `previous`: the
    checkpoint (path, loaded) of a model to compare with on the same test parts.
    """
    out = cfg.out_dir
    val_labels = np.array([s.label for s in splits["val"]])
    val_scores = softmax_defect_score(predict_logits(model, splits["val"], spec, device))
    threshold, low, high = choose_operating_point(val_labels, val_scores, cfg.target_recall, cfg.max_manual_fraction)
    band = (low, high)

    test = splits["test"]
    test_labels = np.array([s.label for s in test])
    test_logits = predict_logits(model, test, spec, device)
    test_scores = softmax_defect_score(test_logits)
    four_class = None
    if all(s.fine_label >= 0 for s in test):
        # ELPV's four annotated levels, estimated from the defect probability (nearest level).
        pred_level = np.clip(np.rint(test_scores * 3), 0, 3).astype(int)
        four_class = (np.array([s.fine_label for s in test]), pred_level)
    n_ok, n_defect = class_counts(samples)
    training_info = {
        "dataset": cfg.dataset, "data_dir": str(cfg.data_dir) if cfg.data_dir else None,
        "images": len(samples), "no_defect": n_ok, "defect": n_defect,
        # How the images were read (camera.bit_depth, camera.max_pixels): the bundle carries this dict to the
        # station, which can compare it with its own camera settings.
        "bit_depth": cfg.bit_depth, "max_pixels": cfg.max_pixels,
        "fingerprint_sha256": fingerprint(samples), "split_sizes": {k: len(v) for k, v in splits.items()},
        "seed": cfg.seed, "epochs_run": state["epoch"], "best_epoch": state["best_epoch"],
        "best_val_auc": state["best_auc"], "wall_time_s": round(seconds, 1), "device": str(device),
        "torch": torch.__version__,
    }
    if combined is not None:
        # The summary (folders, counts, duplicates, a review export's station, models and labellers); run.json
        # has each image's entry.
        training_info["data_dirs"] = [str(d) for d in cfg.data_dirs()]
        training_info["data_sources"] = combined.sources
        training_info["duplicates"] = combined.duplicates
    if evaluated:
        training_info["evaluation"] = evaluated
    comparison = None
    if previous is not None:
        comparison = compare_with_previous(previous, cfg, test, test_labels, test_scores, threshold, device)
        c = comparison
        print(f"compared with {previous[0]} on {c['n_compared']} of {c['n_test']} test parts "
              f"({c['excluded_overlap']} left out: the old model trained on them): McNemar p = "
              f"{c['mcnemar']['all_parts']['p_value']:.4g}")
    report = write_report(
        out / "report", test_labels, test_scores, threshold, band, [s.name for s in test],
        title=f"{cfg.backbone} on {cfg.dataset} - held-out test split",
        extra={"training": training_info, "config": cfg.model_dump(mode="json"),
               "argmax_accuracy": float(np.mean((test_scores >= 0.5) == test_labels))},
        four_class=four_class, history=state["history"], comparison=comparison,
    )
    # Each image by name: its content hash (what a later run's comparison matches its test images against)
    # and, for folders, where it came from.
    images = combined.images if combined is not None else {s.name: {"sha256": content_hash(s.image)} for s in samples}
    data = {**(combined.summary() if combined is not None else {}), "images": images}
    (out / "run.json").write_text(json.dumps(
        {"config": cfg.model_dump(mode="json"), "training": training_info, "history": state["history"],
         "threshold": threshold, "band": list(band), "data": data}, indent=2))
    final = out / "final.pt"
    _atomic_save({
        "model_state": model.state_dict(), "config": cfg.model_dump(mode="json"),
        "preprocess": spec.model_dump(mode="json"), "class_names": list(CLASS_NAMES),
        "decision": {"threshold": float(threshold), "band_low": float(band[0]), "band_high": float(band[1]),
                     "target_recall": cfg.target_recall},
        "training": training_info, "metrics": _headline(report),
    }, final)
    return final


def _headline(report: dict) -> dict[str, float]:
    keys = ("accuracy", "recall", "false_positive_rate", "f1", "precision", "roc_auc")
    return {k: float(report[k]) for k in keys if isinstance(report.get(k), (int, float))}
