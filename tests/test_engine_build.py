"""`make engine` on a real GPU: build from the session's tiny bundle, validate, install, skip when fresh.

Marked `gpu`: they need TensorRT (JetPack's python3-libnvinfer), pycuda and an NVIDIA GPU, and skip with
that reason elsewhere. What does not need TensorRT (plans, keys, staleness, the validator, the error without
TensorRT) is tested in test_engine_plan.py; the logic around TensorRT's calls (flags, timing cache, DLA
placement) with a stand-in for TensorRT in test_engine_build_logic.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from bundle.errors import EngineBuildError
from engines.__main__ import main
from engines.manifest import load_manifest, manifest_path

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["fp16", "int8", "fp32"])
def test_build_validates_installs_and_then_has_nothing_to_do(trt: ModuleType, bundle_dir: Path, tmp_path: Path,
                                                             precision: str, capsys: pytest.CaptureFixture[str]):
    store = tmp_path / "store"
    assert main(["build", "--bundle", str(bundle_dir), "--precision", precision, "--store", str(store),
                 "--workspace-mb", "256"]) == 0
    engines = list(store.glob("*.engine"))
    assert len(engines) == 1 and f"-{precision}-trt{trt.__version__}-" in engines[0].name
    manifest = load_manifest(manifest_path(engines[0]))
    assert manifest.validation is not None and manifest.validation["passed"] is True
    assert manifest.tensorrt_version == trt.__version__ and manifest.precision == precision
    assert list((store / "timing-cache").glob("*.cache")), "timing cache not kept"
    out = capsys.readouterr().out
    assert "validation PASSED" in out and "installed" in out
    assert main(["build", "--bundle", str(bundle_dir), "--precision", precision, "--store", str(store)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_an_onnx_the_parser_rejects_names_the_nodes(trt: ModuleType, bundle_dir: Path, tmp_path: Path):
    import onnx

    from bundle.format import load_bundle
    from engines.build import build_serialized
    from engines.plan import BuildRequest, plan_build

    broken = tmp_path / "broken.onnx"
    model = onnx.load(str(load_bundle(bundle_dir).path("onnx_fp32")))
    model.graph.node[0].op_type = "NoSuchOp"
    onnx.save(model, str(broken))
    plan = plan_build(trt.__version__, BuildRequest("fp16"))
    with pytest.raises(EngineBuildError, match=r"NoSuchOp|node 0"):
        build_serialized(plan, broken, None)


def test_a_failed_validation_installs_nothing(trt: ModuleType, bundle_dir: Path, tmp_path: Path):
    import numpy as np

    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    # Golden logits that no correct engine reproduces (and metadata re-hashed so the bundle still loads).
    golden = dict(np.load(bundle / "golden.npz"))
    golden["logits_fp32"] = golden["logits_fp32"] + 1.0
    np.savez_compressed(bundle / "golden.npz", **golden)
    from bundle.format import describe_file, load_bundle, write_metadata

    meta = load_bundle(bundle, verify=False).metadata
    files = dict(meta.files)
    files["golden"] = describe_file(bundle, "golden.npz")
    write_metadata(bundle, meta.model_copy(update={"files": files}))
    store = tmp_path / "store"
    assert main(["build", "--bundle", str(bundle), "--precision", "fp32", "--store", str(store)]) == 9
    assert not list(store.glob("*.engine")) and not list(store.glob("*.candidate*"))
    report = json.loads(next(store.glob("*.rejected.json")).read_text())
    assert report["validation"]["passed"] is False


def test_a_dla_build_reports_where_its_layers_run(trt: ModuleType, bundle_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]):
    if int(trt.Builder(trt.Logger(trt.Logger.WARNING)).num_DLA_cores) == 0:
        pytest.skip("needs a DLA (Jetson AGX Orin or Xavier)")
    store = tmp_path / "store"
    assert main(["build", "--bundle", str(bundle_dir), "--precision", "fp16", "--store", str(store),
                 "--dla-core", "0", "--dla-min-share", "0"]) == 0
    assert "DLA placement:" in capsys.readouterr().out
    placement = load_manifest(manifest_path(next(store.glob("*-dla0.engine")))).build_options["dla_placement"]
    assert placement["dla_layers"] and 0.0 < placement["share"] <= 1.0
    if placement["share"] < 1.0:
        # a minimum above what TensorRT placed on the DLA fails the build and installs nothing
        other = tmp_path / "other"
        assert main(["build", "--bundle", str(bundle_dir), "--precision", "fp16", "--store", str(other),
                     "--dla-core", "0", "--dla-min-share", "1"]) == 9
        assert not list(other.glob("*.engine"))
