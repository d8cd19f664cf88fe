#!/usr/bin/env bash
# Install Transformer Engine for PyTorch on a GPU machine without network access.
#
#   tools/install_te_offline.sh WHEEL_DIR TARGET
#
# WHEEL_DIR holds, downloaded elsewhere with `pip download`:
#   transformer_engine-V-py3-none-any.whl            (meta package)
#   transformer_engine_cuNN-V-*.whl                  (core library, NN = torch's CUDA major)
#   transformer_engine_torch-V.tar.gz                (PyTorch bindings, source only on PyPI)
#   nvidia_cudnn_frontend-*.whl, pydantic*, ...     (their dependencies, any other *.whl)
# TARGET is a directory to put on PYTHONPATH. The bindings are compiled here against the local
# torch (C++ only, no nvcc; a few minutes with MAX_JOBS cores). Needs torch with CUDA, its
# nvidia-* packages (cuDNN headers) and ninja.
#
# STEPS="unpack bindings check" (the default) may name a subset: e.g. start the compilation
# (bindings) while the large core wheel is still being copied, then unpack and check.
# BINDINGS_SO=path/transformer_engine_torch*.so reuses bindings compiled earlier against the
# same torch and TE versions instead of compiling them again.
set -euo pipefail
STEPS=${STEPS:-unpack bindings check}
has_step() { [[ " $STEPS " == *" $1 "* ]]; }

WHEELS=${1:?usage: $0 WHEEL_DIR TARGET}
TARGET=${2:?usage: $0 WHEEL_DIR TARGET}
PYTHON=${PYTHON:-python3}
HELPERS="$(cd "$(dirname "$0")" && pwd)/te_offline_helpers.py"

shopt -s nullglob
meta=("$WHEELS"/transformer_engine-*-py3-none-any.whl)
core=("$WHEELS"/transformer_engine_cu*.whl)
sdist=("$WHEELS"/transformer_engine_torch-*.tar.gz)
needed=()
has_step unpack && needed+=(meta core)
has_step bindings && [ -z "${BINDINGS_SO:-}" ] && needed+=(sdist)
declare -A pattern=([meta]="transformer_engine-*-py3-none-any.whl"
                     [core]="transformer_engine_cu*.whl" [sdist]="transformer_engine_torch-*.tar.gz")
for name in "${needed[@]}"; do
  declare -n found=$name
  if [ ${#found[@]} -ne 1 ]; then
    echo "error: $WHEELS must hold exactly one ${pattern[$name]} ($name), found ${#found[@]};" \
         "fetch it elsewhere with pip download (see the top of $0)" >&2
    exit 2
  fi
done
mkdir -p "$TARGET"
TARGET=$(cd "$TARGET" && pwd)
deps=()
for whl in "$WHEELS"/*.whl; do
  case $(basename "$whl") in transformer_engine*) ;; *) deps+=("$whl") ;; esac
done

# The meta and core wheels both ship the transformer_engine package: unpack the core last, as
# pip would, keeping both dist-infos (TE checks their versions at import).
if has_step unpack; then
  echo "unpacking ${meta[0]##*/} and ${core[0]##*/} into $TARGET"
  "$PYTHON" -m zipfile -e "${meta[0]}" "$TARGET"
  "$PYTHON" -m zipfile -e "${core[0]}" "$TARGET"
fi
if { has_step unpack || has_step bindings; } && [ ${#deps[@]} -gt 0 ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$TARGET" "${deps[@]}"
fi
export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"

build_bindings() {
  # Headers: the CUDA toolkit's, plus cuDNN / NCCL from torch's nvidia-* wheels, plus the cuDNN
  # frontend (a header-only wheel installed into TARGET/include).
  CPATH=$("$PYTHON" "$HELPERS" include-dirs "$TARGET")
  export CPATH="$CPATH${CPATH_EXTRA:+:$CPATH_EXTRA}"

  build=$(mktemp -d)
  tar xzf "${sdist[0]}" -C "$build"
  src=$(echo "$build"/transformer_engine_torch-*)
  echo "compiling the PyTorch bindings in $src (MAX_JOBS=${MAX_JOBS:=$(nproc)})"
  start=$(date +%s)
  (
    cd "$src"
    MAX_JOBS=$MAX_JOBS NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_WITH_NCCL_EP=${NVTE_WITH_NCCL_EP:-0} \
      "$PYTHON" setup.py -q build_ext --build-lib "$build/lib"
  )
  so=$(find "$build/lib" -name 'transformer_engine_torch*.so' | head -1)
  [ -n "$so" ] || { echo "error: the build produced no transformer_engine_torch*.so" >&2; exit 1; }
  mkdir -p "$TARGET/transformer_engine/wheel_lib"
  cp "$so" "$TARGET/transformer_engine/wheel_lib/"
  echo "compiled in $(( $(date +%s) - start )) s: $TARGET/transformer_engine/wheel_lib/${so##*/}"
  rm -rf "$build"
}
copy_bindings() {
  [ -f "$BINDINGS_SO" ] || { echo "error: BINDINGS_SO=$BINDINGS_SO is not a file" >&2; exit 2; }
  mkdir -p "$TARGET/transformer_engine/wheel_lib"
  cp "$BINDINGS_SO" "$TARGET/transformer_engine/wheel_lib/"
  echo "reused the compiled bindings $BINDINGS_SO"
}
if has_step bindings; then
  if [ -n "${BINDINGS_SO:-}" ]; then copy_bindings; else build_bindings; fi
fi

has_step check && "$PYTHON" "$HELPERS" check
