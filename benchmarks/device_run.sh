#!/usr/bin/env bash
# One prepared run on a GPU machine: the CUDA tests, the GPU benchmarks, and the raw-pixel
# Web News classification at full length with the controls (base_matched, random_teacher,
# random_teacher_offline, shuffled_teacher_offline; the sum loss form, as the feature runs).
#
#   OUT=/tmp/gpu WINDOW=540 bash benchmarks/device_run.sh
#   OUT=/tmp/gpu PIXEL_TRUNK=effnet_lite0 EPOCHS=30 bash benchmarks/device_run.sh   # fine-tune the ImageNet
#       EfficientNet-Lite0 at 224 px instead (make the data with make_devdata.py --short-side 224: 56 MiB)
#
# Phases (each under its own `timeout`, so one failure does not cost the others):
#   1. bench_mixing, bench_online and bench_gmm on a quiet GPU (the figures we report);
#   2. classification.py --student-space pixels --device cuda, JOBS runs at a time, in the
#      background; it starts no run after the window's end minus a margin and reports the
#      seeds every method finished;
#   3. meanwhile `pytest -m needs_cuda` (correctness only, so sharing the GPU is fine).
# Everything lands in $OUT (8 files, the tool's limit): log.txt (with the pixel run's log), pytest.log, the three benchmark JSONs
# and the pixel run's JSON / Markdown / PNG (or its .partial.jsonl if it was cut short).
# Data: $CMDA_DATA_DIR (default ./.devdata, made by benchmarks/make_devdata.py: ../shared/data/webnews without the
# captions and with the photos pre-shrunk to 80 px on the short side, for the transfer).
set -u
OUT=${OUT:-/tmp/cmda_gpu}
WINDOW=${WINDOW:-540}          # seconds this script may take in all
JOBS=${JOBS:-8}
EPOCHS=${EPOCHS:-60}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}         # DEVICE=cpu PIXEL_ARGS=--smoke MIXING_ARGS="--quick --cases vec1024" tries the plumbing
PIXEL_ARGS=${PIXEL_ARGS:-}
PIXEL_TRUNK=${PIXEL_TRUNK:-resnet18}  # or effnet_lite0 (the teacher-study pixel run of docs/when-it-helps.md)
MIXING_ARGS=${MIXING_ARGS:-}
GMM_ARGS=${GMM_ARGS:-}
ONLINE_ARGS=${ONLINE_ARGS:-}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 TQDM_DISABLE=1
export CMDA_DATA_DIR=${CMDA_DATA_DIR:-$PWD/.devdata}
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
LOG=$OUT/log.txt

{
  echo "== machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c "import sys, os, torch, numpy; print(sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda', 'cpus', os.cpu_count())"
  echo "== bench_mixing ($DEVICE) at $(elapsed) s"
  timeout 110 $PY benchmarks/bench_mixing.py --device "$DEVICE" --threads 4 $MIXING_ARGS --out "$OUT/bench_mixing-$DEVICE.json" 2>&1 | grep -v '^\s*$'
  echo "== bench_online ($DEVICE) at $(elapsed) s"
  timeout 90 $PY benchmarks/bench_online.py --device "$DEVICE" $ONLINE_ARGS --out "$OUT/bench_online-$DEVICE.json" 2>&1
  echo "== bench_gmm (cpu + cuda when present) at $(elapsed) s"
  timeout 110 $PY benchmarks/bench_gmm.py $GMM_ARGS --out "$OUT/bench_gmm-$DEVICE.json" 2>&1
} >>"$LOG" 2>&1

# the pixel run: starts no run later than MARGIN seconds before the window closes
MARGIN=${MARGIN:-150}
LEFT=$(( WINDOW - $(elapsed) - 15 ))
MAXMIN=$($PY -c "print(max(0.5, ($LEFT - $MARGIN) / 60))")
echo "== pixels at $(elapsed) s: $LEFT s left, --max-minutes $MAXMIN, --jobs $JOBS, --epochs $EPOCHS" >>"$LOG"
timeout "$LEFT" $PY benchmarks/classification.py --student-space pixels --pixel-trunk "$PIXEL_TRUNK" \
  --device "$DEVICE" --epochs "$EPOCHS" \
  --jobs "$JOBS" --max-minutes "$MAXMIN" --no-progress --out "$OUT" $PIXEL_ARGS >"$OUT/pixels.log" 2>&1 &
PIXELS=$!

{
  echo "== pytest -m needs_cuda at $(elapsed) s"
  timeout 300 $PY -m pytest tests -m needs_cuda -q -n 4 -p no:cacheprovider --continue-on-collection-errors \
    -W ignore::DeprecationWarning >"$OUT/pytest.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -40
  echo "== pytest done at $(elapsed) s"
} >>"$LOG" 2>&1

wait $PIXELS
echo "== pixels exit $? at $(elapsed) s" >>"$LOG"
cat "$OUT/pixels.log" >>"$LOG" && rm "$OUT/pixels.log"  # the tool returns 8 files at most
ls -la "$OUT" >>"$LOG"
# the end of the log is what a remote caller sees first
grep -E "passed|failed|error" "$LOG" | tail -5
grep -E "PASS|FAIL|/mixup_step|host reads" "$LOG" | tail -30
grep -E "acc |wrote" "$LOG" | tail -8
echo "total $(elapsed) s"
