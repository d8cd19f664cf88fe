#!/usr/bin/env bash
# The GPU checks, each sized for one short allocation (a debug partition, a preemptible node,
# a lent GPU): run one, read its verdict, commit the numbers.
#
#   bash bench/gpu_check.sh A OUT_DIR      # no Transformer Engine: ≤ 8 minutes on one GPU
#   bash bench/gpu_check.sh B OUT_DIR      # Transformer Engine and FP8 (TE importable)
#   bash bench/gpu_check.sh C OUT_DIR      # SFT with LISA vs full; a hang drill on NCCL
#   bash bench/gpu_check.sh suite OUT_DIR [PARTS]   # the whole benchmark matrix, in parts
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh A OUT_DIR   # the same commands on CPU, tiny
#
# A: megatron-core installed from a wheel when it is not importable (WHEEL_DIR, default .whl,
#    into OUT_DIR/site), then the GPU tests that need no TE; the 1b GEMMs at FFN 5461 vs 5504;
#    the 1b preset and its aligned twin (--ffn-hidden-size 5504) in bf16 on the no-TE fast path,
#    pre vs pre_gpas (GPAS's step-time overhead); the 1b preset with the fast path off (what it
#    buys); one profiled run (kernel breakdown); the 7b-shaped model (4 layers).
# B: the Transformer Engine tests; the 1b twin with TE; FP8 delayed and tensorwise on the
#    7b-shaped model at micro-batches giving each GEMM ≥ 8k tokens (32, 64 × 256), vs bf16.
# C: one SFT step of the 1b preset with LISA on 4 layers against full fine-tuning (bf16,
#    --overlap-grad-reduce; bench/bench_sft.py); a rank frozen under --hang-timeout with
#    --calc-ft-timeouts on one GPU (NCCL): detected, restarted, the learned timeouts all-reduced
#    on CUDA and reloaded (bench/bench_faults.py --parts hang).
# suite: the matrix of bench/RESULTS.md, PARTS (default: all, in this order) of
#   tests     pytest -m gpu (TE tests skip themselves without Transformer Engine)
#   tetests   the Transformer Engine tests alone (tests/gpu/test_gpu_te.py)
#   overhead  bench/bench_gpas_overhead.py (local spec, fused GPAS kernel)
#   gemm      the 1b preset's GEMMs at FFN 5461 vs 5472 vs 5504
#   local     1b preset, local spec (no TE)
#   profile   1b preset, TE, kernel breakdowns with and without fused kernels, and FFN 5504
#   batch     1b preset, TE, micro-batch 64 and cross-entropy fusion
#   te7b      7b-shaped model (4 layers), TE, bf16
#   fp8       7b-shaped model, TE, FP8 delayed and tensorwise, micro-batch 8 and 16; the 1b
#             preset with FFN 5504 (FP8 GEMMs need multiples of 16), bf16 vs FP8
# Results, at most 8 files: OUT_DIR/{device.txt,summary.txt,check.log,throughput.jsonl,
# gemm.jsonl,profile.txt}. Each run has a time limit; a failing run does not stop the others.
# The dry run executes the CPU twins of the GPU tests (tests/unit/test_fast_path.py: the fast path
# against megatron-core's) and collects the GPU selection, which can only skip on CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
USAGE="usage: $0 A|B|C|suite OUT_DIR [PARTS]"
CHECK=${1:?$USAGE}
OUT=${2:?$USAGE}
PARTS=${3:-tests overhead gemm local profile batch te7b fp8}
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
  GPU_TESTS=(tests/unit/test_fast_path.py)
  SFT=(--num-layers 4 --hidden-size 64 --vocab-size 512 --seq-length 32 --micro-batch-size 2
    --iters 4 --lisa-layers 2)
  HANG_TIMEOUT=5
else
  DEVICE=(--device cuda)
  ONE_B=(--model-size 1b --micro-batch-size 32 --num-microbatches 4)
  SEVEN_B=(--model-size 7b --num-layers 4 --micro-batch-size 8 --num-microbatches 8)
  GEMM_SHAPE=(--model-size 1b --ffn-hidden-sizes 5461,5504)
  TWIN=(--ffn-hidden-size 5504)
  ITERS=(--iters 5 --warmup 2)
  GPU_TESTS=(-m gpu tests --ignore=tests/gpu/test_gpu_te.py)
  SFT=(--model-size 1b --seq-length 256 --micro-batch-size 8 --iters 20 --lisa-layers 4)
  HANG_TIMEOUT=20
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
  [[ $DRY == 1 ]] && run collect 60 "$PYTHON" -m pytest -q -p no:cacheprovider --collect-only \
    -m gpu tests
  run tests 150 "$PYTHON" -m pytest -q -p no:cacheprovider "${GPU_TESTS[@]}"
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
  run tetests 180 "$PYTHON" -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_te.py
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
C)
  run sft_lisa 300 "$PYTHON" bench/bench_sft.py "${DEVICE[@]}" "${SFT[@]}" --overlap-grad-reduce \
    --json "$OUT/sft.jsonl"
  run hang_nccl 240 "$PYTHON" bench/bench_faults.py "${DEVICE[@]}" --nproc 1 --parts hang \
    --hang-timeout "$HANG_TIMEOUT" --calc-ft-timeouts --json "$OUT/faults.jsonl"
  ;;
suite)
  has() { [[ " $PARTS " == *" $1 "* ]]; }
  TE=(--transformer-impl transformer_engine)
  PROFILE=(--profile "$OUT/profile.txt")
  M32=(--micro-batch-size 32 --num-microbatches 4)
  SEVEN=(--model-size 7b --num-layers 4)
  has tests && run tests 300 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests
  has tetests && run tetests 240 "$PYTHON" -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_te.py
  has overhead && run overhead 150 "$PYTHON" bench/bench_gpas_overhead.py --device cuda --bf16 \
    --repeats 30
  has gemm && run gemm 120 "$PYTHON" bench/bench_gemm_shapes.py --model-size 1b \
    --ffn-hidden-sizes 5461,5472,5504 --json "$OUT/gemm.jsonl"
  has local && throughput local_1b 200 --model-size 1b "${M32[@]}"
  if has profile; then
    throughput te_1b 240 --model-size 1b "${M32[@]}" "${TE[@]}" "${PROFILE[@]}"
    throughput te_1b_unfused 120 --model-size 1b "${M32[@]}" "${TE[@]}" --fusion off \
      --norm-types pre "${PROFILE[@]}"
    throughput te_1b_ffn5504 200 --model-size 1b --ffn-hidden-size 5504 "${M32[@]}" "${TE[@]}" \
      "${PROFILE[@]}"
  fi
  if has batch; then
    throughput te_1b_mbs64 200 --model-size 1b --micro-batch-size 64 --num-microbatches 2 \
      "${TE[@]}"
    throughput te_1b_ce_fusion 120 --model-size 1b "${M32[@]}" "${TE[@]}" --fusion all \
      --norm-types pre
  fi
  has te7b && throughput te_7b 180 "${SEVEN[@]}" --micro-batch-size 8 --num-microbatches 8 \
    "${TE[@]}" "${PROFILE[@]}"
  if has fp8; then  # the 1b preset's FFN (5461) cannot run FP8 GEMMs: widened to 5504
    throughput bf16_1b_ffn5504 120 --model-size 1b --ffn-hidden-size 5504 "${M32[@]}" "${TE[@]}" \
      --norm-types pre
    throughput fp8_1b_ffn5504 150 --model-size 1b --ffn-hidden-size 5504 "${M32[@]}" "${TE[@]}" \
      --fp8-format hybrid --norm-types pre,pre_gpas
    throughput fp8_delayed_7b 150 "${SEVEN[@]}" --micro-batch-size 8 --num-microbatches 8 \
      "${TE[@]}" --fp8-format hybrid "${PROFILE[@]}"
    throughput fp8_tensorwise_7b 150 "${SEVEN[@]}" --micro-batch-size 8 --num-microbatches 8 \
      "${TE[@]}" --fp8-format hybrid --fp8-recipe tensorwise --norm-types pre
    throughput bf16_7b_mbs16 150 "${SEVEN[@]}" --micro-batch-size 16 --num-microbatches 4 \
      "${TE[@]}" --norm-types pre
    throughput fp8_7b_mbs16 150 "${SEVEN[@]}" --micro-batch-size 16 --num-microbatches 4 \
      "${TE[@]}" --fp8-format hybrid --norm-types pre
  fi
  ;;
*)
  echo "$USAGE" >&2
  exit 2
  ;;
esac
echo "done: $(wc -l <"$SUMMARY") runs, $(grep -c 'rc=0 ' "$SUMMARY") succeeded" | tee -a "$SUMMARY"
