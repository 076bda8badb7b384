"""tests/gpu must decide its skip without touching torch (so without initialising CUDA): a CUDA
context in the pytest process would break every vLLM engine forked from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys, types

class Poisoned(types.ModuleType):
    def __getattr__(self, name):
        raise AssertionError(f"torch.{name} used while importing tests/gpu")

sys.modules["torch"] = Poisoned("torch")
import importlib
for name in sys.argv[1:]:
    module = importlib.import_module(name)
    assert any(m.name == "gpu" for m in module.pytestmark), name
print("imported", len(sys.argv) - 1)
"""


def test_gpu_test_modules_import_without_touching_torch():
    modules = sorted(f"tests.gpu.{p.stem}" for p in (ROOT / "tests" / "gpu").glob("test_*.py"))
    assert modules
    done = subprocess.run([sys.executable, "-c", PROBE, *modules], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"imported {len(modules)}" in done.stdout
