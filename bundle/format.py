"""The model bundle: one directory that carries a trained model from export to every station.

Layout (names fixed so engines/ and the runtime find them):

    metadata.json        BundleMetadata below: preprocessing, classes, threshold, metrics, file hashes
    model_fp32.onnx      FP32 ONNX (ONNX Runtime on CPU; weakly typed TensorRT FP16/FP32 builds)
    model_fp16.onnx      FP16 weights, FP32 inputs/outputs (strongly typed TensorRT FP16 builds)
    model_int8_qdq.onnx  explicit INT8 quantization, symmetric Q/DQ (TensorRT INT8 builds)
    golden.npz           golden inputs and ONNX Runtime reference logits (and defect maps), for engine validation

The models' outputs (`BundleMetadata.outputs`): `logits` (N, 2) first, then, from schema version 3,
`defect_map` (N, h, w) float32: the class activation map of Zhou et al. 2016 (see DEFECT_MAP_NAME).

The runtime only reads bundles; export/ writes them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bundle.errors import BundleError
from bundle.preprocess import PreprocessSpec

METADATA_FILE = "metadata.json"
# 2: decision_by_precision. Version 1 bundles still load (their one operating point serves every precision).
# 3: outputs (the defect map beside the logits). Older bundles still load: their models output logits only.
BUNDLE_SCHEMA_VERSION = 3
CLASS_NAMES = ("no_defect", "defect")
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
# The second output of bundles from schema version 3: where the model looked, as a class activation map
# (Zhou et al. 2016, "Learning Deep Features for Discriminative Localization", CVPR): the classifier head
# applied to the last feature maps before pooling, as the defect-vs-ok logit difference per location,
#   defect_map[n, y, x] = sum_c (W[defect, c] - W[ok, c]) * F[n, c, y, x] + (b[defect] - b[ok]),
# (N, h, w) float32 at the feature maps' resolution (input / 32: 7x7 for 224 px). With the bias difference
# included, the map's spatial mean is exactly the logit difference the part is judged on (export/onnx_export.py).
DEFECT_MAP_NAME = "defect_map"
BATCH_AXIS = "batch"

ModelRole = Literal["onnx_fp32", "onnx_fp16", "onnx_int8", "golden"]
ROLE_FILES: dict[str, str] = {
    "onnx_fp32": "model_fp32.onnx",
    "onnx_fp16": "model_fp16.onnx",
    "onnx_int8": "model_int8_qdq.onnx",
    "golden": "golden.npz",
}


class BundleFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class DecisionDefaults(BaseModel):
    """Operating point chosen at training time on the validation split (never on the test split)."""

    model_config = ConfigDict(extra="forbid")

    # A part whose defect probability is >= threshold fails.
    threshold: float = Field(ge=0.0, le=1.0)
    # Parts whose defect probability lies in [low, high] go to a human inspector.
    band_low: float = Field(ge=0.0, le=1.0)
    band_high: float = Field(ge=0.0, le=1.0)
    target_recall: float = Field(ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _band_around_threshold(self) -> DecisionDefaults:
        if not self.band_low <= self.threshold <= self.band_high:
            raise ValueError(
                f"uncertainty band [{self.band_low}, {self.band_high}] must contain threshold {self.threshold}"
            )
        return self


class TensorSpec(BaseModel):
    """One model output as the bundle's ONNX files declare it: name, shape ("batch" for the dynamic axis), dtype."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    shape: tuple[int | Literal["batch"], ...] = Field(min_length=1)
    dtype: Literal["float32"] = "float32"


def logits_spec(classes: int = len(CLASS_NAMES)) -> TensorSpec:
    return TensorSpec(name=OUTPUT_NAME, shape=(BATCH_AXIS, classes))


def defect_map_spec(height: int, width: int) -> TensorSpec:
    return TensorSpec(name=DEFECT_MAP_NAME, shape=(BATCH_AXIS, height, width))


class BundleMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = BUNDLE_SCHEMA_VERSION
    name: str
    created_utc: str
    backbone: str
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    # Every output of the ONNX models, in order: the logits first (`output_name`), then the defect map where the
    # model has one. Left out (bundles before schema version 3): the logits alone.
    outputs: tuple[TensorSpec, ...] = Field(default_factory=lambda: (logits_spec(),), min_length=1)
    class_names: tuple[str, ...] = CLASS_NAMES
    defect_index: int = 1
    preprocess: PreprocessSpec
    decision: DecisionDefaults  # FP32's, and the default for a precision not in decision_by_precision
    # Operating points of the reduced precisions, chosen by the same rule on the validation split from that
    # precision's ONNX scores: INT8 moves scores near the threshold, so FP32's threshold would cost INT8
    # engines defect recall.
    decision_by_precision: dict[Literal["fp32", "fp16", "int8"], DecisionDefaults] = Field(default_factory=dict)
    # What the model was trained on: dataset kind, source, image count, a content fingerprint.
    training: dict[str, object] = Field(default_factory=dict)
    # Held-out metrics per precision, e.g. {"fp32": {...}, "int8": {...}}.
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    export: dict[str, object] = Field(default_factory=dict)
    files: dict[str, BundleFile] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _logits_first(self) -> BundleMetadata:
        if self.outputs[0].name != self.output_name:
            raise ValueError(f"the first output must be the logits, {self.output_name!r}, not {self.outputs[0].name!r}")
        names = [o.name for o in self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"output names repeat: {names}")
        return self

    def decision_for(self, precision: str) -> DecisionDefaults:
        """The operating point for engines of `precision` ("fp32", "fp16", "int8")."""
        return self.decision_by_precision.get(precision, self.decision)  # type: ignore[arg-type]

    @property
    def defect_map(self) -> TensorSpec | None:
        """The defect map output, or None for a model without one (bundles before schema version 3)."""
        return next((o for o in self.outputs if o.name == DEFECT_MAP_NAME), None)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_file(bundle_dir: Path, name: str) -> BundleFile:
    p = bundle_dir / name
    return BundleFile(path=name, sha256=sha256_file(p), bytes=p.stat().st_size)


class Bundle:
    """A loaded, verified bundle: metadata plus absolute paths of its files."""

    def __init__(self, root: Path, metadata: BundleMetadata) -> None:
        self.root = root
        self.metadata = metadata

    def path(self, role: str) -> Path:
        entry = self.metadata.files.get(role)
        if entry is None:
            have = ", ".join(sorted(self.metadata.files)) or "none"
            raise BundleError(f"bundle {self.root} has no {role} file (it has: {have})")
        return self.root / entry.path

    def has(self, role: str) -> bool:
        return role in self.metadata.files

    @property
    def model_id(self) -> str:
        """Short identifier of the exact model: name plus the first hex digits of the FP32 ONNX hash."""
        entry = self.metadata.files.get("onnx_fp32")
        return f"{self.metadata.name}@{entry.sha256[:12]}" if entry else self.metadata.name


def write_metadata(bundle_dir: Path, metadata: BundleMetadata) -> Path:
    """Write metadata.json atomically (a crash leaves the old file or the new one, never half)."""
    target = bundle_dir / METADATA_FILE
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metadata.model_dump(mode="json"), indent=2) + "\n")
    tmp.replace(target)
    return target


def load_bundle(bundle_dir: str | Path, verify: bool = True) -> Bundle:
    """Load a bundle; with `verify`, check every listed file exists and matches its sha256."""
    root = Path(bundle_dir).resolve()
    meta_path = root / METADATA_FILE
    if not root.is_dir():
        raise BundleError(f"model bundle {root} does not exist", hint="run `make export` or set model.bundle")
    if not meta_path.is_file():
        raise BundleError(f"{meta_path} is missing: {root} is not a model bundle")
    try:
        raw = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{meta_path} is not valid JSON: {exc}") from exc
    # The version first: a newer bundle's new keys would otherwise read as unknown-key errors.
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if isinstance(version, int) and version > BUNDLE_SCHEMA_VERSION:
        raise BundleError(
            f"{meta_path} has schema_version {version}; this software reads up to {BUNDLE_SCHEMA_VERSION}",
            hint="update the appliance software",
        )
    try:
        metadata = BundleMetadata.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise BundleError(f"{meta_path} is invalid: {problems}") from exc
    if verify:
        for role, entry in metadata.files.items():
            p = root / entry.path
            if not p.is_file():
                raise BundleError(f"bundle file {p} ({role}) is missing")
            actual = sha256_file(p)
            if actual != entry.sha256:
                raise BundleError(
                    f"bundle file {p} ({role}) has sha256 {actual[:16]}..., metadata says "
                    f"{entry.sha256[:16]}...: the file changed after export",
                    hint="re-export the bundle or copy it again from the release",
                )
    return Bundle(root, metadata)
