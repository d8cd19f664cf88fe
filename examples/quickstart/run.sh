#!/usr/bin/env bash
# Quickstart: GPAS against its Pre-LN baseline on a CPU, from nothing, in one command.
# Installs what is missing, writes a real-English corpus from the text every Python
# installation ships, trains a small SentencePiece tokenizer on it, preprocesses it, trains a
# 12-layer pre_gpas model and a 12-layer Pre-LN model side by side (one core each), and prints
# each model's validation loss, perplexity, GPAS scales and the gap (DEPTH=1 adds the per-layer
# depth analysis) and the elapsed time. About 6 minutes on 2 CPU cores; the same command uses
# a GPU if present.
#
#   bash examples/quickstart/run.sh      # OUT=runs/quickstart ITERS=500 SEED=1 LAYERS=12 HIDDEN=128
set -euo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)

OUT=${OUT:-runs/quickstart}
ITERS=${ITERS:-500}
SEED=${SEED:-1}
LAYERS=${LAYERS:-12}
HIDDEN=${HIDDEN:-128}
SEQ=${SEQ:-128}
BATCH=${BATCH:-8}
VOCAB=${VOCAB:-2048}
PY=${PYTHON:-python3}

step() { echo; echo "== $1  [$(( $(date +%s) - START ))s]"; }

step "1/5 install (only what is missing)"
missing() { $PY tools/check_env.py missing "$@"; }
if missing torch; then
  $PY -m pip install --quiet "torch==2.13.0"
fi
EXTRAS=plot
NEEDED=(megatron_ext megatron.core sentencepiece matplotlib yaml)
if [[ ${DEPTH:-0} == 1 ]]; then  # the depth analysis runs the Hugging Face modeling code
  EXTRAS=plot,hf
  NEEDED+=(transformers safetensors)
fi
if missing "${NEEDED[@]}"; then
  $PY -m pip install --quiet -e ".[$EXTRAS]"
fi
DEVICE=${DEVICE:-$($PY tools/check_env.py device)}
echo "ready: $($PY tools/check_env.py versions), device $DEVICE"

step "2/5 corpus and tokenizer"
$PY examples/quickstart/prepare_corpus.py --out "$OUT/corpus" >/dev/null
$PY tools/train_tokenizer.py --input "$OUT/corpus/train.jsonl" --vocab-size "$VOCAB" \
  --output "$OUT/tokenizer/spm.model"

step "3/5 preprocessing"
for SPLIT in train valid; do
  $PY tools/preprocess_data.py --input "$OUT/corpus/$SPLIT.jsonl" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer/spm.model" \
    --append-eod --output-prefix "$OUT/data/$SPLIT" --workers 2 --no-progress | tail -n 1
done

step "4/5 training pre and pre_gpas side by side: $LAYERS layers × $HIDDEN, $ITERS steps"
PARALLEL=2
[[ $DEVICE == cuda ]] && PARALLEL=1  # one GPU: one model at a time
$PY tools/run_grid.py run --out "$OUT/grid" --sizes "${LAYERS}x${HIDDEN}" \
  --norm-types pre pre_gpas --seeds "$SEED" --parallel "$PARALLEL" --status-every 30 -- \
  --device "$DEVICE" --seq-length "$SEQ" --max-position-embeddings "$SEQ" \
  --train-data-path "$OUT/data/train_text_document" \
  --valid-data-path "$OUT/data/valid_text_document" \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer/spm.model" \
  --micro-batch-size "$BATCH" --global-batch-size "$BATCH" --train-iters "$ITERS" \
  --lr 1e-3 --lr-warmup-iters $(( ITERS / 10 )) \
  --eval-interval $(( ITERS / 2 > 0 ? ITERS / 2 : 1 )) --eval-iters 16 \
  --log-interval $(( ITERS / 25 > 0 ? ITERS / 25 : 1 )) \
  --telemetry-interval $(( ITERS / 2 > 0 ? ITERS / 2 : 1 )) \
  --save-interval $(( ITERS / 2 > 0 ? ITERS / 2 : 1 )) \
  --data-cache-path "$OUT/data/cache" --num-workers 0

step "5/5 results"
CELLS="$OUT/grid/cells/${LAYERS}x${HIDDEN}"
$PY tools/plot_run.py "$CELLS/pre/seed$SEED/metrics.jsonl" "$CELLS/pre_gpas/seed$SEED/metrics.jsonl" \
  --labels pre pre_gpas --out "$OUT/comparison.png" >/dev/null
if [[ ${DEPTH:-0} == 1 ]]; then  # the per-layer depth analysis: a few more minutes on a CPU
  $PY tools/depth_analysis.py --model "$CELLS/pre/seed$SEED/checkpoints" \
    "$CELLS/pre_gpas/seed$SEED/checkpoints" --labels pre pre_gpas \
    --data-path "$OUT/data/valid_text_document" --num-sequences 16 --out "$OUT/depth" >/dev/null
fi
$PY examples/quickstart/summary.py --grid "$OUT/grid" --depth "$OUT/depth/depth.json"
PLOTS="$OUT/comparison.png (loss, variance vs depth, GPAS scales)"
[[ ${DEPTH:-0} == 1 ]] && PLOTS+=" and $OUT/depth/depth.png"
echo "    plots: $PLOTS"
ELAPSED=$(( $(date +%s) - START ))
echo "  elapsed: $(( ELAPSED / 60 ))m$(printf %02d $(( ELAPSED % 60 )))s"
