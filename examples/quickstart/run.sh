#!/usr/bin/env bash
# Quickstart: real text and a real tokenizer from the package registries, preprocessing, a tiny
# pre_gpas model and a tiny Pre-LN baseline trained side by side, evaluated, and plotted.
# Runs on a laptop CPU in minutes; the same command uses the GPU when there is one.
#
#   bash examples/quickstart/run.sh                # ITERS=300 OUT=runs/quickstart
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-runs/quickstart}
ITERS=${ITERS:-300}
MODEL=${MODEL:-small}
SEQ=${SEQ:-128}
DEVICE=${DEVICE:-$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('mistral_common') is None)" \
  || python3 -m pip install --quiet --no-deps mistral-common

echo "== corpus and tokenizer"
TOKENIZER=$(python3 examples/quickstart/prepare_corpus.py --out "$OUT/corpus")
echo "tokenizer: $TOKENIZER"

echo "== preprocessing"
for SPLIT in train valid; do
  python3 tools/preprocess_data.py --input "$OUT/corpus/$SPLIT.jsonl" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER" --append-eod \
    --output-prefix "$OUT/data/$SPLIT" --workers 2 --no-progress
done

for NORM in pre pre_gpas; do
  echo "== training $NORM on $DEVICE"
  python3 pretrain_gpas.py --device "$DEVICE" --model-size "$MODEL" --norm-type "$NORM" \
    --train-data-path "$OUT/data/train_text_document" \
    --valid-data-path "$OUT/data/valid_text_document" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER" \
    --seq-length "$SEQ" --micro-batch-size 8 --global-batch-size 16 \
    --train-iters "$ITERS" --lr 3e-3 --lr-warmup-iters $(( ITERS / 10 )) \
    --eval-interval $(( ITERS / 3 > 0 ? ITERS / 3 : 1 )) --eval-iters 4 \
    --log-interval $(( ITERS / 15 > 0 ? ITERS / 15 : 1 )) \
    --telemetry-interval $(( ITERS / 3 > 0 ? ITERS / 3 : 1 )) \
    --data-cache-path "$OUT/data/cache" --num-workers 0 --save "$OUT/$NORM" --seed 1234
done

echo "== plot"
python3 tools/plot_run.py "$OUT/pre/metrics.jsonl" "$OUT/pre_gpas/metrics.jsonl" \
  --labels pre pre_gpas --out "$OUT/comparison.png"
