#!/usr/bin/env bash
# The GPU checks, each sized for one short allocation (a debug partition, a preemptible node,
# a lent GPU): run one, read its verdict, commit the numbers.
#
#   bash bench/gpu_check.sh A OUT_DIR      # no Transformer Engine: ≤ 8 minutes on one GPU
#   bash bench/gpu_check.sh B OUT_DIR      # Transformer Engine and FP8 (TE importable)
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh A OUT_DIR   # the same commands on CPU, tiny
#
# A: megatron-core installed from a wheel when it is not importable (WHEEL_DIR, default .whl,
#    into OUT_DIR/site), then the GPU tests that need no TE; the 1b GEMMs at FFN 5461 vs 5504;
#    the 1b preset and its aligned twin (--ffn-hidden-size 5504) in bf16 on the no-TE fast path,
#    pre vs pre_gpas (GPAS's step-time overhead); the 1b preset with the fast path off (what it
#    buys); one profiled run (kernel breakdown); the 7b-shaped model (4 layers).
# B: the Transformer Engine tests; the 1b twin with TE; FP8 delayed and tensorwise on the
#    7b-shaped model at micro-batches giving each GEMM ≥ 8k tokens (32, 64 × 256), vs bf16.
# Results, at most 8 files: OUT_DIR/{device.txt,summary.txt,check.log,throughput.jsonl,
# gemm.jsonl,profile.txt}. Each run has a time limit; a failing run does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
CHECK=${1:?usage: $0 A|B OUT_DIR}
OUT=${2:?usage: $0 A|B OUT_DIR}
PYTHON=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/check.log"
SUMMARY="$OUT/summary.txt"
JSON="$OUT/throughput.jsonl"

if [[ $DRY == 1 ]]; then  # every command as on the GPU, at a tiny shape on CPU
  DEVICE=(--device cpu)
  ONE_B=(--model-size tiny --seq-length 32 --micro-batch-size 2 --num-microbatches 1)
  SEVEN_B=("${ONE_B[@]}")
  GEMM_SHAPE=(--model-size tiny --tokens 64 --repeats 1 --ffn-hidden-sizes 176,192)
  TWIN=(--ffn-hidden-size 192)
  ITERS=(--iters 1 --warmup 0)
  PYTEST_FILTER=(-m gpu)
else
  DEVICE=(--device cuda)
  ONE_B=(--model-size 1b --micro-batch-size 32 --num-microbatches 4)
  SEVEN_B=(--model-size 7b --num-layers 4 --micro-batch-size 8 --num-microbatches 8)
  GEMM_SHAPE=(--model-size 1b --ffn-hidden-sizes 5461,5504)
  TWIN=(--ffn-hidden-size 5504)
  ITERS=(--iters 5 --warmup 2)
  PYTEST_FILTER=(-m gpu)
fi

run() {  # run NAME SECONDS CMD...: output to the one log; outcome to the summary
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "=== $name: $*" >>"$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  printf '%-24s rc=%-3s %4ss  %s\n' "$name" "$rc" $((SECONDS - start)) "$*" | tee -a "$SUMMARY"
}

throughput() {  # throughput NAME SECONDS [bench_throughput.py flags]
  local name=$1 limit=$2
  shift 2
  run "$name" "$limit" "$PYTHON" bench/bench_throughput.py --json "$JSON" "${DEVICE[@]}" \
    "${ITERS[@]}" "$@"
}

ensure_megatron_core() {  # the GPU machine may lack it: install the carried wheel privately
  "$PYTHON" tools/check_env.py missing megatron.core || return 0
  local wheel
  wheel=$(ls "${WHEEL_DIR:-.whl}"/megatron_core-*.whl 2>/dev/null | head -n 1)
  if [[ -z $wheel ]]; then
    echo "megatron-core is not importable and no megatron_core-*.whl is in ${WHEEL_DIR:-.whl}" |
      tee -a "$SUMMARY"
    return 1
  fi
  run install 120 "$PYTHON" -m pip install --quiet --no-deps --target "$OUT/site" "$wheel"
  export PYTHONPATH="$OUT/site:$PYTHONPATH"
}

if [[ $DRY == 1 ]]; then
  echo "dry run on CPU (tiny shapes)" >"$OUT/device.txt"
else
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/device.txt" 2>&1
fi
ensure_megatron_core || exit 2

case $CHECK in
A)
  run tests 150 "$PYTHON" -m pytest -q -p no:cacheprovider "${PYTEST_FILTER[@]}" tests \
    --ignore=tests/test_gpu_te.py
  run gemm 90 "$PYTHON" bench/bench_gemm_shapes.py "${DEVICE[@]}" "${GEMM_SHAPE[@]}" \
    --json "$OUT/gemm.jsonl"
  throughput 1b_fast 120 "${ONE_B[@]}" --norm-types pre,pre_gpas
  throughput 1b_twin_fast 120 "${ONE_B[@]}" "${TWIN[@]}" --norm-types pre,pre_gpas
  throughput 1b_slow 90 "${ONE_B[@]}" --fast-path off --norm-types pre_gpas
  throughput 1b_twin_profile 90 "${ONE_B[@]}" "${TWIN[@]}" --norm-types pre_gpas \
    --profile "$OUT/profile.txt"
  throughput 7b_shape 90 "${SEVEN_B[@]}" --norm-types pre,pre_gpas
  ;;
B)
  TE=(--transformer-impl transformer_engine)
  run tetests 180 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu_te.py
  throughput te_1b_twin 150 "${ONE_B[@]}" "${TWIN[@]}" "${TE[@]}" --profile "$OUT/profile.txt"
  for mbs in 32 64; do  # tokens per GEMM: mbs × 256 = 8k, 16k
    throughput "te_7b_bf16_mbs$mbs" 120 "${SEVEN_B[@]}" --micro-batch-size "$mbs" \
      --num-microbatches 2 "${TE[@]}" --norm-types pre_gpas
    for recipe in delayed tensorwise; do
      throughput "te_7b_fp8_${recipe}_mbs$mbs" 120 "${SEVEN_B[@]}" --micro-batch-size "$mbs" \
        --num-microbatches 2 "${TE[@]}" --fp8-format hybrid --fp8-recipe "$recipe" \
        --norm-types pre_gpas
    done
  done
  ;;
*)
  echo "usage: $0 A|B OUT_DIR" >&2
  exit 2
  ;;
esac
echo "done: $(wc -l <"$SUMMARY") runs, $(grep -c 'rc=0 ' "$SUMMARY") succeeded" | tee -a "$SUMMARY"
