#!/bin/bash
# The paper's second stage on a cluster, for the 1B Pre-LN and Pre-LN+GPAS models pretrained
# with examples/slurm/recipes/1b.yaml: one preprocessing job, one SFT job per model (one 8-GPU
# node each, requeued on preemption; a requeued job resumes from its own checkpoints, the first
# start loads the pretrained weights), then the downstream table on one GPU.
#
#   CS170K=/data/commonsense_170k.json TOKENIZER=/models/t5/spiece.model \
#   PRETRAINED=runs bash examples/sft/slurm/pipeline.sh
#
# PRETRAINED/1b_<norm>/checkpoints must hold the pretraining runs (train.sbatch's RUN layout);
# the SFT runs go to OUT/1b_<norm>_sft, the table to OUT/downstream (OUT defaults to runs).
# DRY_RUN=1 prints the sbatch commands instead of submitting them.
set -euo pipefail
cd "$(dirname "$0")/../../.."
CS170K=${CS170K:?set CS170K to commonsense_170k.json}
TOKENIZER=${TOKENIZER:?set TOKENIZER to the pretraining SentencePiece model}
PRETRAINED=${PRETRAINED:-runs}
OUT=${OUT:-runs}
NORMS=${NORMS:-pre pre_gpas}
PYTHON=${PYTHON:-python3}
DATA=$OUT/sft_data/cs170k
mkdir -p "$OUT/logs"

submit() {  # prints the job id
    if [[ ${DRY_RUN:-0} == 1 ]]; then echo "sbatch $*" >&2; echo "DRY$RANDOM"; return; fi
    sbatch --parsable "$@"
}

PRE=$(submit --job-name=sft-data --nodes=1 --ntasks=1 --cpus-per-task=16 --time=2:00:00 \
    --output="$OUT/logs/sft-data-%j.out" --wrap "$PYTHON tools/preprocess_sft.py \
    --input $CS170K --tokenizer-type SentencePieceTokenizer --tokenizer-model $TOKENIZER \
    --output-prefix $DATA --template llm-adapters --loss-on-prompt --pack --seq-length 512")
JOBS=()
MODELS=()
for NORM in $NORMS; do
    RUN=$OUT/1b_${NORM}_sft
    JOB=$(RECIPE=examples/slurm/recipes/sft_1b.yaml DATA=$DATA TOKENIZER=$TOKENIZER RUN=$RUN \
        submit --export=ALL --job-name="sft-$NORM" --dependency="afterok:$PRE" \
        examples/slurm/train.sbatch --norm-type "$NORM" \
        --pretrained-checkpoint "$PRETRAINED/1b_$NORM/checkpoints")
    JOBS+=("$JOB")
    MODELS+=(--model "$NORM=$RUN/checkpoints")
done
DEPS=$(IFS=:; echo "${JOBS[*]}")
submit --job-name=sft-eval --nodes=1 --ntasks=1 --gpus=1 --cpus-per-task=8 --time=8:00:00 \
    --dependency="afterok:$DEPS" --output="$OUT/logs/sft-eval-%j.out" \
    --wrap "$PYTHON tools/downstream_eval.py --out $OUT/downstream ${MODELS[*]} \
    --device cuda:0 --batch-size 16" >/dev/null
echo "submitted: preprocessing, SFT of $NORMS, then the downstream table in $OUT/downstream"
