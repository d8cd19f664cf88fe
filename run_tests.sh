#!/usr/bin/env bash
# Install everything the tests need, then run them all: `bash run_tests.sh [pytest args]`.
# CI (.ci/run) runs exactly this. CPU only: torch 2.13.0's CPU build, megatron-core 0.16.1.
# Nothing but the GPU tests may skip (GPAS_NO_SKIPS=1, tests/conftest.py); GPAS_NO_SKIPS=0
# lets tests whose optional system pieces are missing (Slurm) skip with their reason instead.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
START=$(date +%s)
report_time() {
  local t=$(( $(date +%s) - START ))
  echo "run_tests.sh: $(( t / 60 )) min $(( t % 60 )) s in all (installs $(( INSTALLED - START )) s)"
}

$PY -m pip install --quiet --upgrade pip
$PY -m pip install --quiet "torch==2.13.0"
$PY -m pip install --quiet -e ".[test]"
# Only the real SentencePiece model file inside mistral-common is used; its own dependencies
# (pydantic, an older numpy, …) are not needed.
$PY -m pip install --quiet --no-deps mistral-common
# Triton (no GPU needed): its interpreter runs the fused GPAS kernels on CPU in the tests.
$PY -m pip install --quiet triton

# Slurm (slurmctld, slurmd, client) and munge for the local-cluster tests.
if ! command -v slurmctld >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  { $SUDO apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq slurm-wlm munge >/dev/null; } ||
    echo "warning: could not install slurm-wlm and munge: the Slurm cluster tests will fail" \
         "(GPAS_NO_SKIPS=0 bash run_tests.sh lets them skip)" >&2
fi

INSTALLED=$(date +%s)
trap report_time EXIT
$PY -m ruff check .
# Two pytest-xdist workers, one thread each; a multi-process test takes both cores alone
# (tests/helpers/cpu_share.py); each file runs on one worker, so its module fixtures (parity
# runs, export checkpoints, the Slurm cluster) are built once. `bash run_tests.sh -n 0 …` runs
# in one process.
GPAS_NO_SKIPS=${GPAS_NO_SKIPS:-1} $PY -m pytest -q -n 2 --dist loadfile "$@"
