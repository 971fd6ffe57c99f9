#!/usr/bin/env bash
# Run by Snakemake once, inside the new env: TensorFlow 2.8's pip wheel loads CUDA and cuDNN
# from LD_LIBRARY_PATH, so every activation of this env puts the env's own lib/ first.
set -euo pipefail
mkdir -p "$CONDA_PREFIX/etc/conda/activate.d"
cat > "$CONDA_PREFIX/etc/conda/activate.d/maskworks-cuda.sh" <<'SH'
export LD_LIBRARY_PATH="$CONDA_PREFIX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
SH
