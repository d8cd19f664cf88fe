#!/usr/bin/env bash
# Every GPU check and benchmark of the project, on one GPU, in parts that fit one device call
# each: the GPU tests, the GPAS overhead benchmark, and the throughput matrix of
# bench/RESULTS.md (local vs Transformer Engine, fused kernels on/off, micro-batch sizes, bf16
# vs FP8, pre vs pre_gpas) with kernel breakdowns. Each run has its own time limit and log, and
# a failing run does not stop the others.
#
#   bash bench/run_gpu_suite.sh OUT_DIR [PARTS]
#
# PARTS (default: all of them, in this order) picks parts:
#   tests     pytest -m gpu (TE tests skip themselves without Transformer Engine)
#   tetests   the Transformer Engine tests alone (tests/test_gpu_te.py)
#   overhead  bench/bench_gpas_overhead.py (local spec, fused GPAS kernel)
#   gemm      bench/bench_gemm_shapes.py: the 1b preset's GEMMs at FFN 5461 vs 5472 vs 5504
#   local     1b preset, local spec (no TE)
#   profile   1b preset, TE, kernel breakdowns with and without fused kernels, and with the
#             FFN widened to 5504 (a multiple of 64)
#   batch     1b preset, TE, micro-batch 64 and cross-entropy fusion
#   te7b      7b-shaped model (4 layers), TE, bf16
#   fp8       7b-shaped model, TE, FP8 delayed and tensorwise, micro-batch 8 and 16; the 1b
#             preset with FFN 5504 (FP8 GEMMs need multiples of 16), bf16 vs FP8
# Results: OUT_DIR/throughput.jsonl (one JSON line per run, as bench/results/*.jsonl),
# OUT_DIR/gemm.jsonl, OUT_DIR/profile.txt, OUT_DIR/<run>.log, OUT_DIR/summary.txt.
# Transformer Engine must be importable for the TE parts (tools/install_te_offline.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: $0 OUT_DIR [PARTS]}
PARTS=${2:-tests overhead gemm local profile batch te7b fp8}  # tests include tetests
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
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
  run "$name" "$limit" "$PYTHON" bench/bench_throughput.py --json "$JSON" --iters 5 --warmup 2 "$@"
}

has() { [[ " $PARTS " == *" $1 "* ]]; }
SEVEN_B=(--model-size 7b --num-layers 4)
ONE_B=(--model-size 1b)
TE=(--transformer-impl transformer_engine)
PROFILE=(--profile "$OUT/profile.txt")

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/device.txt" 2>&1
has tests && run tests 300 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests
has tetests && run tetests 240 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu_te.py
has overhead && run overhead 150 "$PYTHON" bench/bench_gpas_overhead.py --device cuda --bf16 \
  --repeats 30
has gemm && run gemm 120 "$PYTHON" bench/bench_gemm_shapes.py --model-size 1b \
  --ffn-hidden-sizes 5461,5472,5504 --json "$OUT/gemm.jsonl"
has local && throughput local_1b 200 "${ONE_B[@]}" --micro-batch-size 32 --num-microbatches 4
if has profile; then
  throughput te_1b 240 "${ONE_B[@]}" --micro-batch-size 32 --num-microbatches 4 "${TE[@]}" \
    "${PROFILE[@]}"
  throughput te_1b_unfused 120 "${ONE_B[@]}" --micro-batch-size 32 --num-microbatches 4 \
    "${TE[@]}" --fusion off --norm-types pre "${PROFILE[@]}"
  throughput te_1b_ffn5504 200 "${ONE_B[@]}" --ffn-hidden-size 5504 --micro-batch-size 32 \
    --num-microbatches 4 "${TE[@]}" "${PROFILE[@]}"
fi
if has batch; then
  throughput te_1b_mbs64 200 "${ONE_B[@]}" --micro-batch-size 64 --num-microbatches 2 "${TE[@]}"
  throughput te_1b_ce_fusion 120 "${ONE_B[@]}" --micro-batch-size 32 --num-microbatches 4 \
    "${TE[@]}" --fusion all --norm-types pre
fi
has te7b && throughput te_7b 180 "${SEVEN_B[@]}" --micro-batch-size 8 --num-microbatches 8 \
  "${TE[@]}" "${PROFILE[@]}"
if has fp8; then  # the 1b preset's FFN (5461) cannot run FP8 GEMMs: widened to 5504
  throughput bf16_1b_ffn5504 120 "${ONE_B[@]}" --ffn-hidden-size 5504 --micro-batch-size 32 \
    --num-microbatches 4 "${TE[@]}" --norm-types pre
  throughput fp8_1b_ffn5504 150 "${ONE_B[@]}" --ffn-hidden-size 5504 --micro-batch-size 32 \
    --num-microbatches 4 "${TE[@]}" --fp8-format hybrid --norm-types pre,pre_gpas
  throughput fp8_delayed_7b 150 "${SEVEN_B[@]}" --micro-batch-size 8 --num-microbatches 8 \
    "${TE[@]}" --fp8-format hybrid "${PROFILE[@]}"
  throughput fp8_tensorwise_7b 150 "${SEVEN_B[@]}" --micro-batch-size 8 --num-microbatches 8 \
    "${TE[@]}" --fp8-format hybrid --fp8-recipe tensorwise --norm-types pre
  throughput bf16_7b_mbs16 150 "${SEVEN_B[@]}" --micro-batch-size 16 --num-microbatches 4 \
    "${TE[@]}" --norm-types pre
  throughput fp8_7b_mbs16 150 "${SEVEN_B[@]}" --micro-batch-size 16 --num-microbatches 4 \
    "${TE[@]}" --fp8-format hybrid --norm-types pre
fi
echo "done: $SUMMARY, $JSON"
