#!/usr/bin/env bash
# Prints 1 when this machine has an NVIDIA GPU the driver reports (nvidia-smi -L), else 0.
# GPU=1 or GPU=0 in the environment overrides the detection (e.g. a container without nvidia-smi).
if [ -n "${GPU:-}" ]; then echo "$GPU"; exit 0; fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  echo 1
else
  echo 0
fi
