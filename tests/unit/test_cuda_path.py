"""The CUDA path's pure parts: engine process start method, `--device cuda:N`, the profiling
engine's KV pool and batch clamp, non-KV overhead from NVML readings, the execution mode of a
profile request, and the broken-torchvision check."""

from __future__ import annotations

import pytest

from advisor.planner import kv_pool_bytes

from advisor.memory import ArchitectureFacts, MemoryModel
from advisor.profiler import WorkloadShape
from deployments.cli import restrict_to_device
from deployments.engine import engine_env
from deployments.install_check import torch_extras_problem
from deployments.profiling import (
    AdvisorError,
    AdvisorRequest,
    SweepMemoryRules,
    batch_pool_holds,
    cuda_kv_room,
    non_kv_overhead,
    nvml_engine_bytes,
    profiling_spec,
    sweep_kv_cap,
)
from tests.factories import make_spec
from tests.fake_nvml import FakeNvml

GIB = 1 << 30


def test_cuda_engines_spawn_and_number_gpus_like_nvml():
    env = engine_env(make_spec(device_kind="cuda"), None)
    assert env["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_cpu_engine_env_is_unchanged():
    env = engine_env(make_spec(device_kind="cpu", replicas_per_device=2), [0])
    assert env == {"VLLM_DISABLE_COMPILE_CACHE": "1", "VLLM_NO_USAGE_STATS": "1",
                   "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_OMP_THREADS_BIND": "0"}


# ---- --device cuda:N ------------------------------------------------------------------------
def test_device_cuda_1_restricts_the_process_to_gpu_1_and_nvml_reads_gpu_1():
    from advisor.nvml import cuda_device

    device, env = restrict_to_device("cuda:1", {})
    assert (device, env) == ("cuda", {"CUDA_VISIBLE_DEVICES": "1"})
    # what the engine will call cuda:0 is what NVML samples
    assert cuda_device(device, env, FakeNvml()).handle == ("gpu", 1)


def test_device_index_counts_the_already_visible_gpus():
    assert restrict_to_device("cuda:1", {"CUDA_VISIBLE_DEVICES": "2,3"}) == ("cuda", {"CUDA_VISIBLE_DEVICES": "3"})
    assert restrict_to_device("cuda", {"CUDA_VISIBLE_DEVICES": "GPU-ab,GPU-cd"}) == (
        "cuda", {"CUDA_VISIBLE_DEVICES": "GPU-ab"})
    assert restrict_to_device("cpu", {"CUDA_VISIBLE_DEVICES": "0"}) == ("cpu", {})


def test_cli_refuses_a_gpu_that_is_not_visible(capsys):
    from deployments.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUDA_VISIBLE_DEVICES", "0")
        mp.setenv("VLLM_LOGGING_LEVEL", "ERROR")  # main() sets it; restored after the test
        assert main(["profile", "smollm2-135m", "--device", "cuda:3"]) == 2
    assert "cuda:3" in capsys.readouterr().err


# ---- the profiling engine's KV pool ----------------------------------------------------------
def _memory(weight_bytes: int = 16 * GIB) -> MemoryModel:
    """An 8B-class model in bf16: 32 layers x 2 x 8 KV heads x 128 x 2 bytes = 128 KiB per token."""
    facts = ArchitectureFacts(model_type="llama", num_layers=32, hidden_size=4096, num_attention_heads=32,
                              num_kv_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
                              max_position_embeddings=8192, tie_word_embeddings=False, checkpoint_dtype="bfloat16")
    return MemoryModel(architecture=facts, dtype="bfloat16", device_kind="cuda", parameters=weight_bytes // 2,
                       weight_bytes=weight_bytes, kv_bytes_per_token=131072, kv_block_tokens=16, max_model_len=8192)


def test_cuda_pool_comes_from_free_device_memory():
    rules = SweepMemoryRules()
    room = cuda_kv_room(free_bytes=79 * GIB, weight_bytes=16 * GIB, rules=rules)
    assert room == int(79 * GIB * 0.9) - 16 * GIB - rules.cuda_reserve_bytes
    assert sweep_kv_cap("cuda", None, 16 * GIB, 79 * GIB) == room
    assert sweep_kv_cap("cuda", 4 * GIB, 16 * GIB, 79 * GIB) == 4 * GIB  # the user's cap still applies
    assert sweep_kv_cap("cpu", None, 16 * GIB, None) == 4 * GIB  # CPU default unchanged


def test_cuda_pool_without_room_is_an_error_that_says_why():
    with pytest.raises(AdvisorError, match="no room for a KV pool"):
        sweep_kv_cap("cuda", None, 16 * GIB, 18 * GIB)
    with pytest.raises(AdvisorError, match="--max-kv-bytes"):
        sweep_kv_cap("cuda", None, 16 * GIB, None)


def test_largest_batch_is_clamped_to_what_the_pool_holds():
    memory = _memory()
    shape = WorkloadShape(prompt_tokens=512, output_tokens=128)
    longest = 512 * 4 + 128
    per_seq = kv_pool_bytes(memory.kv_bytes_per_token, memory.kv_block_tokens, 1, longest)
    spec = profiling_spec("/m", memory, shape, 128, "cuda", 4 * GIB)
    assert spec.kv_cache_bytes == 4 * GIB
    assert spec.max_num_seqs == 4 * GIB // per_seq  # 14, not 128: past it the sweep measures KV admission
    assert spec.max_num_seqs * per_seq <= spec.kv_cache_bytes
    roomy = profiling_spec("/m", memory, shape, 8, "cuda", 40 * GIB)
    assert roomy.max_num_seqs == 8


def test_a_pool_that_holds_no_sequence_is_an_error():
    with pytest.raises(AdvisorError, match="holds no sequence"):
        batch_pool_holds(64, 100 << 20, 300 << 20)


def test_profiling_spec_runs_in_the_requested_mode():
    memory = _memory()
    shape = WorkloadShape()
    assert profiling_spec("/m", memory, shape, 8, "cuda", 8 * GIB, enforce_eager=False).enforce_eager is False
    assert profiling_spec("/m", memory, shape, 8, "cpu", 8 * GIB).enforce_eager is True


# ---- non-KV overhead -------------------------------------------------------------------------
def test_overhead_counts_only_what_the_engine_added_to_the_device():
    # 1.5 GiB were in use before the engine (another context, the display): not the engine's
    engine = nvml_engine_bytes(used_before=int(1.5 * GIB), used_after=int(1.5 * GIB) + 16 * GIB + 20 * GIB + GIB)
    assert engine == 37 * GIB
    assert non_kv_overhead(engine, weight_bytes=16 * GIB, kv_bytes=20 * GIB) == GIB
    assert nvml_engine_bytes(5 * GIB, 4 * GIB) == 0 and non_kv_overhead(GIB, 2 * GIB, 0) == 0


# ---- execution mode ---------------------------------------------------------------------------
def test_profile_requests_default_to_the_mode_replicas_serve_in():
    assert AdvisorRequest(model="m", device="cuda").mode == "graphs"
    assert AdvisorRequest(model="m", device="cpu").mode == "eager"
    assert AdvisorRequest(model="m", device="cuda:1", enforce_eager=True).mode == "eager"
    with pytest.raises(AdvisorError, match="cuda:x"):
        AdvisorRequest(model="m", device="cuda:x").kind


# ---- install check ----------------------------------------------------------------------------
def test_cuda_torchvision_next_to_cpu_torch_says_what_to_run():
    problem = torch_extras_problem(None, {"torchvision": "0.28.0+cu130", "torchaudio": "2.11.0+cu130"})
    assert "torchaudio 2.11.0+cu130, torchvision 0.28.0+cu130 are CUDA builds" in problem
    assert "pip uninstall -y torchvision torchaudio torchcodec" in problem


def test_matching_torch_builds_are_fine():
    assert torch_extras_problem("13.0", {"torchvision": "0.28.0+cu130"}) is None
    assert torch_extras_problem(None, {"torchvision": "0.28.0+cpu"}) is None
    assert torch_extras_problem(None, {}) is None


def test_shipped_gpu_config_serves_bf16_with_cuda_graphs_on_gpus():
    from pathlib import Path

    import yaml

    from deployments.config import parse_args

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "config.gpu.yaml").read_text())
    args = parse_args(doc["applications"][0]["args"])
    assert args.device == "cuda"
    assert [(m.dtype, m.enforce_eager) for m in args.models] == [("bfloat16", False)]


def test_version_files_are_read_as_torch_writes_them():
    from deployments.install_check import _assigned

    assert _assigned("__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\n", "cuda") is None
    assert _assigned("__version__ = '2.11.0'\ncuda: Optional[str] = '13.0'\n", "cuda") == "13.0"
    assert _assigned("__version__ = '0.28.0+cu130'\ngit_version = 'abc'\n", "__version__") == "0.28.0+cu130"
