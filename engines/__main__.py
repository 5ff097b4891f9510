"""`python -m engines` (`make engine`, `appliance engine`): build, validate and install TensorRT engines.

  build   bundle -> engine for THIS device (TensorRT version and GPU), validated against ONNX Runtime on
          the bundle's golden set before it is installed into the store; nothing happens when an engine
          for the same key is already there and valid
  list    the engines in the store, with what they were built from and their validation
  plan    how a build would be done with a given TensorRT version (no TensorRT needed: for planning)

Exit codes: 0 ok, 2 a request this device or TensorRT cannot do, 4 bundle problem, 7 no TensorRT / GPU,
9 build or validation failed, or a DLA build ran less than --dla-min-share on the DLA (nothing installed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bundle.errors import ApplianceError, ConfigError, EngineBuildError
from bundle.format import ROLE_FILES, Bundle, load_bundle
from engines.manifest import DeviceInfo, EngineManifest, manifest_path, write_manifest
from engines.plan import (
    DEFAULT_DLA_MIN_SHARE,
    DEFAULT_WORKSPACE_MB,
    BuildPlan,
    BuildRequest,
    PlanError,
    plan_build,
)
from engines.store import DEFAULT_STORE, EngineKey, list_engines, timing_cache_path, up_to_date
from engines.validate import Validation, validate

if TYPE_CHECKING:
    from engines.build import BuiltEngine
    from engines.device import BuildDevice


def _heartbeat(label: str, stop: threading.Event, every_s: float = 15.0) -> None:
    """TensorRT builds take minutes and print nothing: say it is still working."""
    started = time.monotonic()
    while not stop.wait(every_s):
        print(f"  {label}: {time.monotonic() - started:.0f} s ...", flush=True)


def _validate_engine(engine: Path, bundle: Bundle, plan: BuildPlan, device: DeviceInfo) -> Validation:
    from engines.runner import TensorRTBackend

    backend = TensorRTBackend(engine, slots=1, dla_core=plan.dla_core, device=device)
    try:
        def infer_one(x):
            backend.input_buffer(0)[...] = x
            # Logits and defect map (None from an engine without one: a failure when the bundle's model has it),
            # fresh arrays both.
            return backend.run_with_map(0)

        return validate(infer_one, bundle, plan.precision)
    finally:
        backend.close()


@dataclass(frozen=True)
class BuildSteps:
    """The three calls of `build` that need TensorRT, CUDA and a GPU; everything around them (plan, key, "up to
    date", candidate, validation before install, rejected report, atomic install) is plain Python.

    `default_build_steps()` gives the real ones; tests hand in stand-ins (tests/test_engine_cli_flow.py), so the
    flow of `make engine` runs on a CPU.
    """

    probe: Callable[[], BuildDevice]  # this device; GpuUnavailableError (exit 7) without TensorRT or a GPU
    # (plan, ONNX file, timing cache file or None) -> the serialized engine; EngineBuildError (exit 9) when it fails
    build: Callable[[BuildPlan, Path, Path | None], BuiltEngine]
    # (candidate engine file, bundle, plan, device) -> the golden-set comparison with ONNX Runtime
    validate_engine: Callable[[Path, Bundle, BuildPlan, DeviceInfo], Validation]


def default_build_steps() -> BuildSteps:
    """TensorRT's builder, the device probe (TensorRT + pycuda) and validation through the TensorRT backend."""
    from engines.build import build_serialized
    from engines.device import probe

    return BuildSteps(probe=probe, build=build_serialized, validate_engine=_validate_engine)


def cmd_build(args: argparse.Namespace, steps: BuildSteps | None = None) -> int:
    steps = steps if steps is not None else default_build_steps()
    bundle = load_bundle(args.bundle)
    request = BuildRequest(args.precision, args.workspace_mb, args.dla_core, args.max_batch, args.dla_min_share)
    device = steps.probe()
    roles = {role for role in ROLE_FILES if bundle.has(role)}
    try:
        plan = plan_build(device.tensorrt_version, request, dla_cores=device.dla_cores, available_roles=roles,
                          jetson_model=device.jetson_model)
    except PlanError as exc:
        raise ConfigError(str(exc)) from exc
    onnx = bundle.path(plan.onnx_role)
    key = EngineKey.for_plan(plan, bundle.model_id, bundle.metadata.files[plan.onnx_role].sha256,
                             device.compute_capability)
    store: Path = args.store
    target = store / key.file_name()
    fresh, why = up_to_date(target, key)
    if fresh and not args.force:
        print(f"{target}: up to date (model {bundle.model_id}, {plan.precision}, TensorRT {device.tensorrt_version}, "
              f"{device.gpu_name}); nothing to do")
        return 0
    print(f"building {target} ({'forced' if args.force and fresh else why})")
    print(f"  plan: {plan.onnx_role} ({onnx.name}), {'strongly typed' if plan.strongly_typed else 'weakly typed'}, "
          f"flags {list(plan.builder_flags) or 'none'}"
          + (f" (cleared: {list(plan.cleared_builder_flags)})" if plan.cleared_builder_flags else "")
          + (f", parser flags {list(plan.parser_flags)}" if plan.parser_flags else "")
          + f", workspace {plan.workspace_bytes // 2**20} MB, batch {plan.batch_profile}"
          + (f", DLA core {plan.dla_core} (at least {plan.dla_min_share:.0%} of the layers on it)"
             if plan.dla_core is not None else ""))
    store.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=("building", stop), daemon=True).start()
    started = time.monotonic()
    try:
        built = steps.build(plan, onnx, timing_cache_path(store, device.tensorrt_version, device.compute_capability,
                                                          device.gpu_name, device.gpu_multiprocessors))
    finally:
        stop.set()
    seconds = time.monotonic() - started
    options = plan.as_options()
    if built.dla_placement is not None:
        print(f"  DLA placement: {built.dla_placement.summary()}")
        options["dla_placement"] = built.dla_placement.as_dict()
    manifest = EngineManifest(
        bundle_name=bundle.metadata.name, bundle_model_id=bundle.model_id,
        onnx_sha256=key.onnx_sha256, precision=plan.precision, tensorrt_version=device.tensorrt_version,
        cuda_version=device.cuda_version, l4t_version=device.l4t_version, gpu_name=device.gpu_name,
        compute_capability=device.compute_capability, gpu_multiprocessors=device.gpu_multiprocessors,
        dla_core=plan.dla_core, build_options=options,
        built_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), build_seconds=round(seconds, 1),
        engine_sha256=hashlib.sha256(built.blob).hexdigest(), input_name=built.input_name,
        output_name=built.output_name, input_shape=built.input_shape,
    )
    # Validate a candidate beside the store's files; only a passing engine takes the real name.
    candidate = target.with_name(target.name + ".candidate")
    candidate.write_bytes(built.blob)
    write_manifest(manifest_path(candidate), manifest)
    try:
        info = DeviceInfo(tensorrt_version=device.tensorrt_version, gpu_name=device.gpu_name,
                          compute_capability=device.compute_capability,
                          gpu_multiprocessors=device.gpu_multiprocessors)
        rejected = target.with_name(target.name + ".rejected.json")
        try:
            result = steps.validate_engine(candidate, bundle, plan, info)
        except Exception as exc:  # an engine that cannot even be run fails validation like a wrong one
            problem = f"the engine could not be run on the golden set: {type(exc).__name__}: {exc}"
            manifest = manifest.model_copy(update={"validation": {"passed": False, "problems": [problem]}})
            rejected.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
            raise EngineBuildError(f"engine for {bundle.model_id} ({plan.precision}) was not installed: {problem} "
                                   f"(report: {rejected})") from exc
        print(f"  built in {seconds:.0f} s; {result.summary()}")
        manifest = manifest.model_copy(update={"validation": result.as_dict()})
        if not result.passed:
            rejected.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
            raise EngineBuildError(f"engine for {bundle.model_id} ({plan.precision}) failed validation and was not "
                                   f"installed: {'; '.join(result.problems)} (report: {rejected})")
        # Engine first, then its manifest: a crash in between leaves a manifest that no longer matches, which
        # `make engine` and the runtime both treat as "rebuild".
        candidate.replace(target)
        write_manifest(manifest_path(target), manifest)
        rejected.unlink(missing_ok=True)  # an earlier rejection's report no longer describes what is installed
    finally:
        candidate.unlink(missing_ok=True)
        manifest_path(candidate).unlink(missing_ok=True)
    print(f"installed {target} (+ {manifest_path(target).name})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    engines = list_engines(args.store)
    if not engines:
        print(f"no engines in {args.store}")
        return 0
    for engine, m, problem in engines:
        if m is None:
            print(f"{engine.name}: UNUSABLE: {problem}")
            continue
        v = m.validation or {}
        state = "validated" if v.get("passed") else "NOT validated"
        print(f"{engine.name}: {m.bundle_model_id} {m.precision}, TensorRT {m.tensorrt_version}, {m.gpu_name} "
              f"(sm {m.compute_capability}){'' if m.dla_core is None else f', DLA {m.dla_core}'}, built {m.built_utc} "
              f"in {m.build_seconds:.0f} s, {state}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    request = BuildRequest(args.precision, args.workspace_mb, args.dla_core, args.max_batch, args.dla_min_share)
    try:
        plan = plan_build(args.tensorrt_version, request, dla_cores=args.dla_cores, jetson_model=args.jetson_model)
    except PlanError as exc:
        raise ConfigError(str(exc)) from exc
    print(json.dumps(plan.as_options(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def request_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--precision", choices=["fp16", "int8", "fp32"], default="fp16",
                       help="fp16 (default; the line's choice), int8 (Q/DQ model), fp32")
        p.add_argument("--workspace-mb", type=int, default=DEFAULT_WORKSPACE_MB,
                       help=f"TensorRT builder workspace limit (default {DEFAULT_WORKSPACE_MB})")
        p.add_argument("--dla-core", type=int, help="build for this DLA core, GPU fallback on (AGX Orin, Xavier)")
        p.add_argument("--max-batch", type=int, help="dynamic batch 1..N (default: static batch 1)")
        p.add_argument("--dla-min-share", type=float, metavar="SHARE",
                       help=f"with --dla-core: fail the build when less than this share (0..1) of the network's "
                       f"layers runs on the DLA (default {DEFAULT_DLA_MIN_SHARE}; GPU fallback moves the rest "
                       "silently)")

    p = sub.add_parser("build", help="build, validate and install an engine for this device",
                       description="Build a TensorRT engine from the bundle ON the device that will run it, "
                       "validate it on the bundle's golden set against ONNX Runtime, and install it into the store "
                       "with its manifest. Does nothing when a valid engine for the same key exists.")
    p.add_argument("--bundle", type=Path, required=True, help="model bundle directory")
    p.add_argument("--store", type=Path, default=DEFAULT_STORE, help=f"engine folder (default {DEFAULT_STORE}; "
                   "the station reads model.engine_dir)")
    p.add_argument("--force", action="store_true", help="rebuild even when an up-to-date engine exists")
    request_options(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("list", help="engines in the store and their manifests")
    p.add_argument("--store", type=Path, default=DEFAULT_STORE)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("plan", help="print the build plan for a TensorRT version (no TensorRT needed)")
    p.add_argument("--tensorrt-version", required=True, help="e.g. 10.3.0 (JetPack 6.1), 8.5.2 (JetPack 5.1)")
    p.add_argument("--dla-cores", type=int, default=0, help="DLA cores of the device (AGX Orin: 2)")
    p.add_argument("--jetson-model", help="the board, as /proc/device-tree/model names it (DLA on TensorRT 11.4.1+ "
                   "needs \"NVIDIA Jetson AGX Orin ...\")")
    request_options(p)
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None, *, build_steps: BuildSteps | None = None) -> int:
    """The CLI. `build_steps` replaces `build`'s TensorRT/CUDA calls (tests); None: the real ones."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if args.func is cmd_build:
            return cmd_build(args, build_steps)
        return args.func(args)
    except ApplianceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
