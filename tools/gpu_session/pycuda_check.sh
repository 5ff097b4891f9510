#!/usr/bin/env bash
# pycuda on a lent NVIDIA GPU machine: build it from the carried sdist against that machine's CUDA, then run
# the gpu-marked tests of engines/cuda_memory.py (pinned and device buffers, streams, context ownership, a
# kernel between the copies). No TensorRT there, so tests/test_trt_backend.py does not run here.
#
# Prepared here:  .carry/pycuda-2026.1.tar.gz   the pycuda sdist (no pycuda wheels exist: it is always built)
#                 .whl/                         its pure-python deps as wheels: pytools, platformdirs, mako,
#                                               siphash24 (a cp312 manylinux wheel), typing-extensions
# Run there:      bash tools/gpu_session/pycuda_check.sh   (carry .whl and .carry/pycuda-2026.1.tar.gz)
# Needs there:    python3 with numpy, setuptools and pytest; nvcc and the CUDA headers; gcc/g++; the NVIDIA
#                 driver (libcuda.so.1). $OUT collects pycuda_check.log (this output) and pycuda_build.log.
# Knobs:          CUDA_ROOT (toolkit root, else found from nvcc), CUDA_DRIVER_LIB_DIR (folder holding libcuda.so
#                 or libcuda.so.1), PY, SITE, SDIST, WHEELS (default .whl), SKIP_TESTS=1 (build only).
set -uo pipefail
OUT=${OUT:-/tmp/out}
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
SDIST=${SDIST:-.carry/pycuda-2026.1.tar.gz}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT" "$SITE"
say() { echo "== $*"; }
fail() { echo "FAILED: $*"; exit 1; }

main() {
start=$(date +%s)
say "machine"
uname -srm
$PY -c 'import sys, numpy, setuptools; print("python", sys.version.split()[0], "numpy", numpy.__version__, "setuptools", setuptools.__version__)' \
  || fail "$PY needs numpy and setuptools to build pycuda"
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader || echo "(nvidia-smi not available)"
# nvcc may be missing from PATH while the toolkit is installed.
command -v nvcc >/dev/null || export PATH="$PATH:${CUDA_ROOT:-/usr/local/cuda}/bin"
nvcc --version || fail "nvcc not found: pycuda's build and SourceModule both need it (set CUDA_ROOT)"

say "carried wheels"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || fail "installing $WHEELS/*.whl into $SITE"
  ls "$WHEELS"
else
  echo "(no $WHEELS/ folder: pycuda's deps pytools, platformdirs, mako, siphash24 must already be installed)"
fi
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1

say "CUDA toolkit root"
# setup.py takes CUDA_ROOT from `nvcc` on PATH, which is wrong when nvcc is a wrapper script (/usr/local/bin/nvcc
# exec-ing the real one): ask nvcc itself where it lives, and insist on finding cuda.h there.
cuda_root=""
for candidate in "${CUDA_ROOT:-}" "${CUDA_HOME:-}" "${CUDA_PATH:-}" \
    "$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)" \
    "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" /usr/local/cuda; do
  if [ -n "$candidate" ] && [ -f "$candidate/include/cuda.h" ]; then
    cuda_root=$(readlink -f "$candidate"); break
  fi
done
[ -n "$cuda_root" ] || fail "no CUDA toolkit with include/cuda.h found (set CUDA_ROOT)"
echo "CUDA_ROOT=$cuda_root"

say "CUDA driver library"
# pycuda links -lcuda: it needs a libcuda.so (the driver's, or the toolkit's stub) at link time, and the driver's
# libcuda.so.1 at run time. Container images often ship only libcuda.so.1: link through a symlink then.
driver_dir=""
for candidate in "${CUDA_DRIVER_LIB_DIR:-}" \
    $(ldconfig -p 2>/dev/null | sed -n 's/.*libcuda\.so\.1 .*=> \(.*\)\/libcuda\.so\.1$/\1/p' | sort -u) \
    /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib/wsl/lib \
    "$cuda_root/lib64/stubs" "$cuda_root/lib/stubs" "$cuda_root/targets/x86_64-linux/lib/stubs"; do
  if [ -n "$candidate" ] && { [ -e "$candidate/libcuda.so" ] || [ -e "$candidate/libcuda.so.1" ]; }; then
    driver_dir=$candidate; break
  fi
done
[ -n "$driver_dir" ] || fail "no libcuda.so or libcuda.so.1 found (set CUDA_DRIVER_LIB_DIR)"
link_dir=$driver_dir
if [ ! -e "$driver_dir/libcuda.so" ]; then
  link_dir=/tmp/pycuda_link
  mkdir -p "$link_dir" && ln -sf "$driver_dir/libcuda.so.1" "$link_dir/libcuda.so"
fi
echo "libcuda from $driver_dir (linking through $link_dir)"
case "$driver_dir" in
  */stubs) ;;  # a stub is for linking only; the loader finds the real driver at run time
  *) ldconfig -p 2>/dev/null | grep -q "$driver_dir/libcuda.so.1" \
       || export LD_LIBRARY_PATH="$driver_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
esac

say "building pycuda from $SDIST"
[ -f "$SDIST" ] || fail "$SDIST is missing: carry it (see the header of this script)"
# aksetup (pycuda's setup.py) reads ~/.aksetup-defaults.py; a private HOME keeps it off the real one and skips
# its 10 s "you have not run configure.py" countdown. CURAND is off: nothing here uses it, and pip-style CUDA
# layouts have no libcurand.so in the toolkit root.
build_home=/tmp/pycuda_home
mkdir -p "$build_home"
cat > "$build_home/.aksetup-defaults.py" <<EOF
CUDA_ROOT = "$cuda_root"
CUDA_INC_DIR = ["$cuda_root/include"]
CUDADRV_LIB_DIR = ["$link_dir"]
CUDADRV_LIBNAME = ["cuda"]
CUDA_ENABLE_CURAND = False
CUDA_ENABLE_GL = False
USE_SHIPPED_BOOST = True
EOF
cat "$build_home/.aksetup-defaults.py"
build_start=$(date +%s)
if ! HOME=$build_home CUDA_ROOT=$cuda_root PATH="$cuda_root/bin:$PATH" \
    $PY -m pip install -v --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" \
    "$SDIST" > "$OUT/pycuda_build.log" 2>&1; then
  tail -n 60 "$OUT/pycuda_build.log"
  fail "pycuda build (full log: pycuda_build.log)"
fi
echo "pycuda built in $(( $(date +%s) - build_start )) s"
$PY - <<'PY' || fail "pycuda does not import or see a GPU"
import pycuda, pycuda.driver as cuda
cuda.init()
print("pycuda", pycuda.VERSION_TEXT, "from", pycuda.__file__)
print("built for CUDA", cuda.get_version(), "driver", cuda.get_driver_version(), "devices", cuda.Device.count())
for i in range(cuda.Device.count()):
    print(" ", i, cuda.Device(i).name(), "compute capability %d.%d" % cuda.Device(i).compute_capability())
PY

if [ -n "${SKIP_TESTS:-}" ]; then
  say "SKIP_TESTS set: build only"; exit 0
fi
say "gpu-marked tests of engines/cuda_memory.py"
$PY -m pytest -q -m gpu tests/test_cuda_memory.py -rs -p no:cacheprovider
status=$?
say "done in $(( $(date +%s) - start )) s, pytest exit $status"
exit $status
}

# A pipeline rather than `exec > >(tee ...)`: the script ends only once the log is complete.
main 2>&1 | tee "$OUT/pycuda_check.log"
exit "${PIPESTATUS[0]}"
