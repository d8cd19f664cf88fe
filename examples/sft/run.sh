#!/usr/bin/env bash
# The paper's whole pipeline at tiny size on a CPU: pretrain Pre-LN and Pre-LN+GPAS, fine-tune
# each with LISA (gates frozen) on Commonsense170K-format data, export both to Hugging Face and
# evaluate them with lm-evaluation-harness into one table. A few minutes on 2 CPU cores.
#
#   bash examples/sft/run.sh   # OUT=runs/sft ITERS=200 SFT_EPOCHS=2 LAYERS=4 HIDDEN=64 SEQ=256
#
# With the real data: replace the generated sample by commonsense_170k.json and the local task
# by the paper's tasks (tools/downstream_eval.py's defaults); examples/sft/slurm/ has the 1B
# jobs.
set -euo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
OUT=${OUT:-runs/sft}
ITERS=${ITERS:-200}
SFT_EPOCHS=${SFT_EPOCHS:-2}
LAYERS=${LAYERS:-4}
HIDDEN=${HIDDEN:-64}
SEQ=${SEQ:-256}
VOCAB=${VOCAB:-1024}
RECORDS=${RECORDS:-400}
PY=${PYTHON:-python3}
step() { echo; echo "== $1  [$(( $(date +%s) - START ))s]"; }

step "0/5 install (only what is missing)"
if $PY tools/check_env.py missing torch; then
  $PY -m pip install --quiet "torch==2.13.0"
fi
if $PY tools/check_env.py missing megatron_ext megatron.core sentencepiece transformers \
    safetensors lm_eval accelerate; then
  $PY -m pip install --quiet -e ".[hf,eval]"
fi
echo "ready: $($PY tools/check_env.py versions)"

step "1/5 data: a corpus to pretrain on, SFT records, a held-out task"
$PY examples/quickstart/prepare_corpus.py --out "$OUT/corpus" >/dev/null
$PY tools/train_tokenizer.py --input "$OUT/corpus/train.jsonl" --vocab-size "$VOCAB" \
  --output "$OUT/tokenizer/spm.model"
TOK=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer/spm.model")
for SPLIT in train valid; do
  $PY tools/preprocess_data.py --input "$OUT/corpus/$SPLIT.jsonl" "${TOK[@]}" --append-eod \
    --output-prefix "$OUT/data/$SPLIT" --workers 2 --no-progress | tail -n 1
done
$PY examples/sft/make_data.py --out "$OUT/sft_data" --records "$RECORDS"
$PY tools/preprocess_sft.py --input "$OUT/sft_data/commonsense_sample.json" "${TOK[@]}" \
  --output-prefix "$OUT/sft_data/cs" --seq-length "$SEQ" --loss-on-prompt

MODEL=(--device cpu --num-layers "$LAYERS" --hidden-size "$HIDDEN" --num-attention-heads 4
       --ffn-hidden-size $(( HIDDEN * 8 / 3 / 8 * 8 )) --seq-length "$SEQ" "${TOK[@]}"
       --num-workers 0 --log-interval 50)
for NORM in pre pre_gpas; do
  step "2/5 pretrain $NORM: $ITERS steps"
  $PY pretrain_gpas.py "${MODEL[@]}" --norm-type "$NORM" \
    --train-data-path "$OUT/data/train_text_document" \
    --valid-data-path "$OUT/data/valid_text_document" --micro-batch-size 8 \
    --global-batch-size 8 --train-iters "$ITERS" --lr 3e-3 --lr-warmup-iters 20 \
    --eval-interval "$ITERS" --eval-iters 4 --save "$OUT/$NORM/pretrain" 2>&1 |
    grep -E "validation|error" || true

  step "3/5 SFT $NORM with LISA (2 of $LAYERS layers, interval 3), gates frozen, $SFT_EPOCHS epochs"
  $PY pretrain_gpas.py "${MODEL[@]}" --norm-type "$NORM" --sft \
    --data-path "$OUT/sft_data/cs" --split 95,5,0 --epochs "$SFT_EPOCHS" \
    --micro-batch-size 8 --global-batch-size 8 --lr 3e-4 --lr-warmup-iters 5 \
    --lisa-layers 2 --lisa-interval 3 --eval-interval 10000 --eval-iters 2 --log-interval 1 \
    --pretrained-checkpoint "$OUT/$NORM/pretrain" --save "$OUT/$NORM/sft" \
    --load "$OUT/$NORM/sft" 2>&1 | grep -E "epochs|validation|froze|error" || true
  $PY - "$OUT/$NORM/sft/metrics.jsonl" "$NORM" <<'PYEOF'
import sys
from megatron_ext.metrics_file import MetricsFile
m = MetricsFile.read(sys.argv[1])
train, val = m.train_losses(), m.validation_losses()
print(f"{sys.argv[2]}: SFT training loss {train[0][1]:.4f} at step 1 -> {train[-1][1]:.4f} at "
      f"step {train[-1][0]}; held-out SFT loss {val[-1][1]:.4f}")
PYEOF
done

step "4/5 export and 5/5 the downstream table (lm-evaluation-harness, held-out task)"
$PY tools/downstream_eval.py --out "$OUT/downstream" --model "pre=$OUT/pre/sft" \
  --model "pre_gpas=$OUT/pre_gpas/sft" --tasks sft_local_mc --num-fewshot 0 \
  --include-path "$OUT/sft_data/task" --device cpu --dtype float32 --batch-size 8
echo "elapsed: $(( $(date +%s) - START ))s"
