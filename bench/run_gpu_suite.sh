#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one go, on one GPU: the GPU tests, then the
# throughput matrix of bench/RESULTS.md (local vs Transformer Engine, bf16 vs FP8, pre vs
# pre_gpas), then the GPAS overhead benchmark. Each part has its own time limit and its own
# log, and a failing part does not stop the others.
#
#   bash bench/run_gpu_suite.sh OUT_DIR [PARTS]
#
# PARTS (default "tests te local fp8 overhead") picks parts. Results: OUT_DIR/throughput.jsonl
# (one JSON line per run, as bench/results/*.jsonl), OUT_DIR/<part>.log, OUT_DIR/summary.txt.
# Transformer Engine must be importable for the te and fp8 parts (tools/install_te_offline.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: $0 OUT_DIR [PARTS]}
PARTS=${2:-tests te local fp8 overhead}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
JSON="$OUT/throughput.jsonl"
SUMMARY="$OUT/summary.txt"

run() {  # run NAME SECONDS CMD...: log to OUT/NAME.log, record the outcome in the summary
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-28s rc=%-3s %4ss  %s\n' "$name" "$rc" $((SECONDS - start)) "$*" | tee -a "$SUMMARY"
}

throughput() {  # throughput NAME SECONDS [bench_throughput.py flags]
  local name=$1 limit=$2
  shift 2
  run "$name" "$limit" "$PYTHON" bench/bench_throughput.py --json "$JSON" --iters 6 --warmup 2 "$@"
}

has() { [[ " $PARTS " == *" $1 "* ]]; }
SEVEN_B=(--model-size 7b --num-layers 4 --micro-batch-size 8 --num-microbatches 8)
ONE_B=(--model-size 1b --micro-batch-size 32 --num-microbatches 4)
TE=(--transformer-impl transformer_engine)

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/device.txt" 2>&1
has tests && run tests 420 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests
has te && throughput te_1b 240 "${ONE_B[@]}" "${TE[@]}"
has te && throughput te_7b 180 "${SEVEN_B[@]}" "${TE[@]}"
has local && throughput local_1b 240 "${ONE_B[@]}"
has local && throughput local_7b 180 "${SEVEN_B[@]}"
if has fp8; then  # the 1b preset's FFN (5461) cannot run FP8 GEMMs: 7b-shaped only
  throughput fp8_delayed_7b 180 "${SEVEN_B[@]}" "${TE[@]}" --fp8-format hybrid
  throughput fp8_tensorwise_7b 180 "${SEVEN_B[@]}" "${TE[@]}" --fp8-format hybrid \
    --fp8-recipe tensorwise
  throughput bf16_7b_mbs16 180 --model-size 7b --num-layers 4 --micro-batch-size 16 \
    --num-microbatches 4 "${TE[@]}"
  throughput fp8_7b_mbs16 180 --model-size 7b --num-layers 4 --micro-batch-size 16 \
    --num-microbatches 4 "${TE[@]}" --fp8-format hybrid
fi
has overhead && run overhead 240 "$PYTHON" bench/bench_gpas_overhead.py --device cuda --bf16 \
  --repeats 30
echo "done: $SUMMARY, $JSON"
