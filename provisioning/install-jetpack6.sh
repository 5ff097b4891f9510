#!/usr/bin/env bash
# Turn a freshly flashed Jetson (JetPack 6.x: L4T R36, Ubuntu 22.04, Python 3.10, TensorRT 10.3) into an
# inspection station. Run from a checkout of this repository, as root:
#
#   sudo provisioning/install-jetpack6.sh STATION SITE LINE BROKER_HOST[:PORT]
#
# What it does, in order (each step is printed; DRY_RUN=1 prints them without doing anything):
#   1. Debian packages: Python venv/headers, build tools for pycuda, mosquitto-clients for field checks
#   2. the service user `appliance` (groups video and render: camera and GPU device nodes)
#   3. the project in /opt/appliance, a venv with --system-site-packages so JetPack's TensorRT
#      (python3-libnvinfer) and its GStreamer-enabled OpenCV are the ones used
#   4. pycuda built from source against this device's CUDA (/usr/local/cuda)
#   5. /etc/appliance (config, broker password, CA) and /var/lib/appliance (results, outbox, engines)
#   6. station.toml and the systemd unit (python -m provisioning), unit installed, not yet started
#
# Then, by hand (the script prints them): copy the model bundle, `make engine`, the broker password and CA,
# `appliance doctor`, `systemctl enable --now appliance`.
#
# JetPack 5.1.x (L4T R35, Python 3.8, TensorRT 8.5): not supported by this script, whose Python floor is 3.10.
# The runtime itself supports TensorRT 8.5 (engines/plan.py); on JetPack 5 install Python 3.10 from the
# deadsnakes PPA, create the venv with it and --system-site-packages, and build pycuda the same way.

set -euo pipefail

PREFIX=${PREFIX:-/opt/appliance}
CONFIG_DIR=${CONFIG_DIR:-/etc/appliance}
STATE_DIR=${STATE_DIR:-/var/lib/appliance}
SERVICE_USER=${SERVICE_USER:-appliance}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
DRY_RUN=${DRY_RUN:-}
SRC=$(cd "$(dirname "$0")/.." && pwd)

usage() { echo "usage: sudo $0 STATION SITE LINE BROKER_HOST[:PORT]" >&2; exit 2; }
[ $# -eq 4 ] || usage
STATION=$1 SITE=$2 LINE=$3 BROKER=$4

run() {
    echo "+ $*"
    if [ -z "$DRY_RUN" ]; then "$@"; fi
}
step() { echo; echo "== $*"; }
fail() { echo "error: $*" >&2; exit 1; }

if [ -z "$DRY_RUN" ]; then
    [ "$(id -u)" = 0 ] || fail "run as root (sudo): it installs packages, a user and a systemd unit"
    if [ -r /etc/nv_tegra_release ]; then
        grep -q "^# R36" /etc/nv_tegra_release || \
            echo "warning: $(head -1 /etc/nv_tegra_release) is not JetPack 6 (L4T R36); see the JetPack 5 note in $0" >&2
    else
        echo "warning: /etc/nv_tegra_release missing: this is not a Jetson; TensorRT steps will fail" >&2
    fi
    python3 -c 'import tensorrt' 2>/dev/null || \
        fail "JetPack's TensorRT Python bindings are missing: apt-get install python3-libnvinfer (nvidia-jetpack)"
    [ -x "$CUDA_HOME/bin/nvcc" ] || fail "$CUDA_HOME/bin/nvcc not found: install cuda-toolkit (nvidia-jetpack) or set CUDA_HOME"
fi

step "1/6 Debian packages"
run apt-get update
run apt-get install -y --no-install-recommends python3-venv python3-dev python3-pip build-essential \
    mosquitto-clients rsync

step "2/6 service user $SERVICE_USER"
if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    run useradd --system --home-dir "$STATE_DIR" --shell /usr/sbin/nologin "$SERVICE_USER"
fi
run usermod -aG video,render "$SERVICE_USER"

step "3/6 project in $PREFIX, venv with JetPack's system packages"
run mkdir -p "$PREFIX"
run rsync -a --delete --exclude .venv --exclude runs --exclude artifacts --exclude .git "$SRC/" "$PREFIX/"
run python3 -m venv --system-site-packages "$PREFIX/.venv"
run "$PREFIX/.venv/bin/pip" install --upgrade pip
# --no-deps, then the runtime's dependencies by name: PyPI's opencv-python-headless would shadow JetPack's
# OpenCV, which is the one built with GStreamer (CSI cameras via nvarguscamerasrc).
run "$PREFIX/.venv/bin/pip" install --no-deps -e "$PREFIX"
run "$PREFIX/.venv/bin/pip" install "numpy>=1.24,<2" "paho-mqtt>=2.0" "pydantic>=2.6" "pydantic-settings>=2.3" \
    tomli onnxruntime

step "4/6 pycuda against $CUDA_HOME"
run env "PATH=$CUDA_HOME/bin:$PATH" "CUDA_ROOT=$CUDA_HOME" "$PREFIX/.venv/bin/pip" install --no-binary pycuda pycuda

step "5/6 $CONFIG_DIR and $STATE_DIR"
run install -d -m 750 -o root -g "$SERVICE_USER" "$CONFIG_DIR"
run install -d -m 750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR" "$STATE_DIR/engines"

step "6/6 station config and systemd unit"
run "$PREFIX/.venv/bin/python" -m provisioning all --station "$STATION" --site "$SITE" --line "$LINE" \
    --broker "$BROKER" --prefix "$PREFIX" --config-dir "$CONFIG_DIR" --state-dir "$STATE_DIR" \
    --user "$SERVICE_USER" --out "$PREFIX/provisioning/out"
if [ -e "$CONFIG_DIR/station.toml" ]; then
    echo "keeping the existing $CONFIG_DIR/station.toml (the new one is in $PREFIX/provisioning/out/$STATION/)"
else
    run install -m 640 -o root -g "$SERVICE_USER" "$PREFIX/provisioning/out/$STATION/station.toml" "$CONFIG_DIR/station.toml"
fi
run install -m 644 "$PREFIX/provisioning/out/$STATION/appliance.service" /etc/systemd/system/appliance.service
run systemctl daemon-reload

cat <<EOF

Installed. To finish (see provisioning/README.md):
  1. the model bundle:     rsync -a BUNDLE_DIR/ $PREFIX/bundle/
  2. its engine, here:     sudo -u $SERVICE_USER $PREFIX/.venv/bin/appliance engine build --bundle $PREFIX/bundle --store $STATE_DIR/engines --precision fp16
  3. broker secret and CA: install -m 640 -g $SERVICE_USER PASSWORD_FILE $CONFIG_DIR/mqtt-password
                           install -m 644 CA_FILE $CONFIG_DIR/ca.crt
  4. check everything:     sudo -u $SERVICE_USER $PREFIX/.venv/bin/appliance doctor --config $CONFIG_DIR/station.toml
  5. start it:             systemctl enable --now appliance && journalctl -u appliance -f
EOF
