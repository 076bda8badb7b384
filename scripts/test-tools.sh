#!/usr/bin/env bash
# Tools the test suite uses beyond the virtualenv (run by `make test`, never by `make run`):
# Prometheus, for the monitoring test in tests/ray/test_repack_live.py. Installed from Debian's
# package where apt-get exists and this runs as root; elsewhere that test is skipped and says how
# to get it (any Prometheus 2.x on PATH will do).
set -euo pipefail
if command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[test-tools] installing Prometheus (Debian package prometheus, about 20 s)"
  export DEBIAN_FRONTEND=noninteractive
  if apt-get install -y --no-install-recommends prometheus >/dev/null \
     || { apt-get update >/dev/null && apt-get install -y --no-install-recommends prometheus >/dev/null; }; then
    exit 0
  fi
  echo "[test-tools] could not install Prometheus: the monitoring test will be skipped"
else
  echo "[test-tools] no prometheus on PATH and no root apt-get to install it: the monitoring test will be skipped"
fi
