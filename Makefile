# Inspection appliance: the two commands are `make demo` and `make test`.
# Every target installs what it needs into .venv (and Debian packages when run as root).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

# Knobs for the model targets (override on the command line: make train DATA=/data/parts RUN=runs/v1)
DATA      ?= data/parts
RUN       ?= runs/latest
BUNDLE    ?= artifacts/bundle
EPOCHS    ?= 20
ELPV_RUN  ?= runs/elpv
ELPV_BUNDLE ?= artifacts/elpv-bundle
ELPV_EPOCHS ?= 30

.PHONY: help demo test lint train train-elpv export augment-preview clean

help:
	@echo "make demo             train a small model on synthetic parts, export a bundle, run the station on sample frames (CPU)"
	@echo "                      reporting to a local Mosquitto, and print what the control room receives"
	@echo "make demo-review      after make demo: the inspector page for the parts it queued (http://127.0.0.1:8080)"
	@echo "make test             run the test suite"
	@echo "make train DATA=DIR   train on your parts (DIR/ok, DIR/defect) into RUN=$(RUN); DATA=\"DIR1 DIR2\" combines"
	@echo "                      folders (e.g. with appliance review export), INIT_FROM=RUN starts from that model"
	@echo "make export           RUN -> model bundle BUNDLE=$(BUNDLE) (FP32 + INT8 Q/DQ + FP16 ONNX)"
	@echo "make train-elpv       the ELPV benchmark training + export (report in $(ELPV_RUN)/report)"
	@echo "make engine BUNDLE=DIR PRECISION=fp16|int8|fp32 [DLA_CORE=0 [DLA_MIN_SHARE=0.5]] [MAX_BATCH=N] [WORKSPACE_MB=1024] [FORCE=1]"
	@echo "                      build + validate + install a TensorRT engine for this device (on the Jetson)"
	@echo "make provision STATION=ID SITE=S LINE=L [BROKER=host:port]   station.toml + systemd unit in provisioning/out/ID"
	@echo "make augment-preview  artifacts/augment_preview.png: each production-condition transform"
	@echo "make lint             ruff"

# --- environment -----------------------------------------------------------------------------
$(VENV)/.stamp-base: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[cpu,train,dev]"
	@touch $@

# The station's runtime alone (what a Jetson needs): no torch. On a Jetson provisioning/install-jetpack6.sh
# creates .venv with --system-site-packages first, so JetPack's TensorRT and OpenCV are seen.
$(VENV)/.stamp-runtime: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PIP) install -q -e ".[cpu]"
	@touch $@

$(VENV)/.stamp-bench: $(VENV)/.stamp-base
	$(PIP) install -q -e ".[cpu,train,dev,bench]"
	@touch $@

# Debian packages: Mosquitto for the MQTT tests and the demo broker (never for the station itself, which
# talks to the plant's broker), openssl for the TLS tests' certificates, Chromium and its WebDriver for the
# inspector page's browser test (Debian's packages: no browser download). Installed only when run as root.
SYSTEM_PACKAGES := mosquitto mosquitto-clients openssl chromium chromium-driver
.PHONY: system-packages
system-packages:
	@if { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; } && command -v chromium >/dev/null 2>&1 \
		&& command -v chromedriver >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing $(SYSTEM_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			$(SYSTEM_PACKAGES) >/dev/null; \
	else \
		echo "note: some of $(SYSTEM_PACKAGES) are missing and this is not root: the MQTT and browser tests that need"; \
		echo "      them skip, and without mosquitto the demo runs on the outbox alone"; \
		echo "      (sudo apt-get install $(SYSTEM_PACKAGES))"; \
	fi

# --- the two commands ---------------------------------------------------------------------------
demo: $(VENV)/.stamp-base system-packages
	$(PY) -m training --dataset synthetic --synthetic-ok 240 --synthetic-defect 160 --synthetic-severity 4 \
		--input-size 160 --epochs 10 --patience 10 --target-recall 0.8 --out runs/demo --quiet
	$(PY) -m export --run runs/demo --out artifacts/demo-bundle --calibration-images 64 --golden-images 16
	rm -rf artifacts/demo-frames artifacts/demo-var
	$(PY) -m training.synthetic --out artifacts/demo-frames --frames 24 --severity 4 --seed 4242
	$(VENV)/bin/appliance show-bundle artifacts/demo-bundle
	$(PY) -m tools.demo_station --config provisioning/demo-station.toml

# The demo station without a camera, serving its HTTP API and the inspector page for the parts `make demo` queued.
.PHONY: demo-review
demo-review: $(VENV)/.stamp-base
	@echo "inspector page: http://127.0.0.1:8080/inspector (token demo-inspector-token); Ctrl-C stops"
	APPLIANCE_CAMERA__SOURCE=none APPLIANCE_HTTP__ENABLED=true APPLIANCE_MQTT__ENABLED=false \
		$(VENV)/bin/appliance run --config provisioning/demo-station.toml

test: $(VENV)/.stamp-base system-packages
	$(PY) -m pytest -q

lint: $(VENV)/.stamp-base
	$(VENV)/bin/ruff check .

# --- model pipeline -----------------------------------------------------------------------------
# DATA may name several folders (DATA="data/parts review-export"); INIT_FROM=RUN starts from that run's model
# and compares the two in the report.
INIT_FROM ?=
train: $(VENV)/.stamp-base
	$(PY) -m training --dataset folder --data $(DATA) --out $(RUN) --epochs $(EPOCHS) \
		$(if $(INIT_FROM),--init-from $(INIT_FROM))

export: $(VENV)/.stamp-base
	$(PY) -m export --run $(RUN) --out $(BUNDLE)

train-elpv: $(VENV)/.stamp-bench
	$(PY) -m training --dataset elpv --out $(ELPV_RUN) --epochs $(ELPV_EPOCHS) --backbone efficientnet_lite0 \
		--input-size 300 --balance sampler --augment mild --target-recall 0.9 --patience 10
	$(PY) -m export --run $(ELPV_RUN) --out $(ELPV_BUNDLE)

# TensorRT engine for THIS device, validated and installed into ENGINE_STORE (run it on the Jetson).
PRECISION ?= fp16
ENGINE_STORE ?= engines/store
WORKSPACE_MB ?= 1024
ENGINE_ARGS = --bundle $(BUNDLE) --precision $(PRECISION) --store $(ENGINE_STORE) --workspace-mb $(WORKSPACE_MB) \
	$(if $(DLA_CORE),--dla-core $(DLA_CORE)) $(if $(DLA_MIN_SHARE),--dla-min-share $(DLA_MIN_SHARE)) \
	$(if $(MAX_BATCH),--max-batch $(MAX_BATCH)) $(if $(FORCE),--force)
.PHONY: engine
engine: $(VENV)/.stamp-runtime
	$(PY) -m engines build $(ENGINE_ARGS)

# A station's config and systemd unit into provisioning/out/STATION/ (see provisioning/README.md).
# make provision STATION=st-07 SITE=plant-a LINE=line-3 [BROKER=broker.plant:8883] [CAMERA=0] [FORCE=1]
# Rendering needs only the project's runtime packages: a .venv that already imports `provisioning` (as after
# `make test` or the install script) is used as it is, with no package index; only a .venv that cannot falls
# back to installing the runtime (.stamp-runtime). PROVISION_OUT: another output folder (tests).
STATION ?=
SITE ?= site
LINE ?= line
BROKER ?= broker.local:8883
CAMERA ?= 0
PROVISION_OUT ?= provisioning/out
.PHONY: provision
provision:
	@test -n "$(STATION)" || { echo "usage: make provision STATION=<id> SITE=<site> LINE=<line> [BROKER=host:port]"; exit 2; }
	@$(PY) -c "import provisioning.__main__" >/dev/null 2>&1 || $(MAKE) --no-print-directory -B $(VENV)/.stamp-runtime
	$(PY) -m provisioning all --station $(STATION) --site $(SITE) --line $(LINE) --broker $(BROKER) \
		--camera '$(CAMERA)' --out '$(PROVISION_OUT)' $(if $(FORCE),--force)

augment-preview: $(VENV)/.stamp-base
	$(PY) -m training.augment --out artifacts/augment_preview.png

# CPU benchmark: bare ONNX Runtime vs the appliance pipeline vs a naive PyTorch loop (artifacts/bench/bench.json),
# then MQTT reporting to a local Mosquitto: sustained results/s and the drain of a 10,000-result outbox
# (artifacts/bench/mqtt.json). Extra options: make bench BENCH_ARGS="--frames 100" BENCH_MQTT_ARGS="--drain 1000"
.PHONY: bench
bench: $(VENV)/.stamp-base system-packages
	$(PY) -m tools.bench $(BENCH_ARGS)
	$(PY) -m tools.bench.mqtt $(BENCH_MQTT_ARGS)

clean:
	rm -rf runs/demo artifacts/demo-bundle artifacts/demo-frames artifacts/demo-var
