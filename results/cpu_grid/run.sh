#!/usr/bin/env bash
# The CPU-scale comparison committed in this directory: all 11 architectures × 2 seeds at
# 12 layers × hidden 128 on the real English corpus in ../shared/data/corpus (a 4,096-piece
# SentencePiece BPE trained on its train split; validation on its validation split), with the
# spec's 71M recipe scaled down in steps (Adam, lr 1e-3, 10% warmup, cosine to 0.1·lr, no
# clipping, no weight decay). Two cells at a time, one thread each.
#
#   bash results/cpu_grid/run.sh           # RUNS=runs/cpu_grid; re-run to resume
set -euo pipefail
cd "$(dirname "$0")/../.."

CORPUS=${CORPUS:-../shared/data/corpus}
RUNS=${RUNS:-runs/cpu_grid}
ITERS=${ITERS:-400}
HERE=results/cpu_grid
PY=${PYTHON:-python3}

if [[ ! -f "$RUNS/data/valid_text_document.idx" ]]; then
  "$PY" tools/train_tokenizer.py --input "$CORPUS"/corpus-train.*.json.gz \
    --vocab-size 4096 --output "$RUNS/tokenizer/spm4k.model"
  "$PY" tools/preprocess_data.py --input "$CORPUS/corpus-train.*" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$RUNS/tokenizer/spm4k.model" \
    --append-eod --output-prefix "$RUNS/data/train" --workers 2 --no-progress
  "$PY" tools/preprocess_data.py --input "$CORPUS/corpus-validation.*" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$RUNS/tokenizer/spm4k.model" \
    --append-eod --output-prefix "$RUNS/data/valid" --workers 2 --no-progress
fi

"$PY" tools/run_grid.py run --out "$RUNS/grid" --sizes 12x128 --norm-types all --seeds 1 2 \
  --parallel 2 --threads-per-cell 1 -- \
  --device cpu --seq-length 128 --max-position-embeddings 128 \
  --train-data-path "$RUNS/data/train_text_document" \
  --valid-data-path "$RUNS/data/valid_text_document" \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$RUNS/tokenizer/spm4k.model" \
  --micro-batch-size 16 --global-batch-size 16 --train-iters "$ITERS" \
  --lr 1e-3 --lr-warmup-iters $(( ITERS / 10 )) --lr-decay-style cosine \
  --clip-grad 0 --clip-gate-grad 0 --weight-decay 0 \
  --eval-interval $(( ITERS / 2 )) --eval-iters 32 --save-interval 100 --log-interval 20 \
  --telemetry-interval $(( ITERS / 2 )) --data-cache-path "$RUNS/data/cache" --num-workers 0

"$PY" tools/grid_table.py "$RUNS/grid" --out "$HERE"
