"""Exact memory model of one model, read from its Hugging Face `config.json`.

Weight bytes from the architecture (parameter count x dtype size), KV bytes per token the way
vLLM sizes its pool (layers x 2 x kv_heads x head_dim x dtype size), and the token capacity of a
KV budget in whole vLLM blocks. Pure: no engine, no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
# vLLM's default KV block size per platform (tokens per block).
KV_BLOCK_TOKENS = {"cuda": 16, "cpu": 128}
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "granite", "olmo2", "smollm3"}
SUPPORTED = sorted(LLAMA_LIKE | {"opt", "gpt2"})


class ModelConfigError(ValueError):
    """A model folder or config the memory model cannot use."""


class ArchitectureFacts(BaseModel):
    """The numbers from config.json the memory model uses."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model_type: str = Field(description="HF model_type, e.g. llama, qwen2, opt, gpt2.")
    num_layers: int = Field(description="Transformer layers.")
    hidden_size: int = Field(description="Model width.")
    num_attention_heads: int = Field(description="Query heads.")
    num_kv_heads: int = Field(description="Key/value heads (GQA/MQA: fewer than query heads).")
    head_dim: int = Field(description="Width of one head (explicit head_dim or hidden/heads).")
    intermediate_size: int = Field(description="MLP width.")
    vocab_size: int = Field(description="Vocabulary size.")
    max_position_embeddings: int = Field(description="Longest context the model supports.")
    tie_word_embeddings: bool = Field(description="LM head shares the embedding matrix.")
    checkpoint_dtype: str = Field(description="dtype the checkpoint declares.")


class MemoryModel(BaseModel):
    """Bytes a model needs on a device, as `plateau memory` prints them."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    architecture: ArchitectureFacts
    dtype: str = Field(description="dtype the engine runs (auto resolved the way vLLM does).")
    device_kind: Literal["cuda", "cpu"]
    parameters: int = Field(description="Parameter count.")
    weight_bytes: int = Field(description="parameters x dtype bytes.")
    kv_bytes_per_token: int = Field(description="layers x 2 x kv_heads x head_dim x dtype bytes.")
    kv_block_tokens: int = Field(description="Tokens per vLLM KV block on this device kind.")
    max_model_len: int = Field(description="Context length the engine will use.")

    @property
    def kv_block_bytes(self) -> int:
        return self.kv_bytes_per_token * self.kv_block_tokens

    def kv_capacity_tokens(self, kv_bytes: int) -> int:
        """Tokens a KV pool of `kv_bytes` holds: whole blocks only, as vLLM allocates them."""
        return (kv_bytes // self.kv_block_bytes) * self.kv_block_tokens


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelConfigError(f"{model_dir}: no config.json found; point at a Hugging Face model folder")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ModelConfigError(f"{path}: expected a JSON object")
    return cfg


def architecture(cfg: dict) -> ArchitectureFacts:
    """Normalize the config keys of the supported families."""
    mt = str(cfg.get("model_type", "")).lower()
    if mt not in SUPPORTED:
        raise ModelConfigError(
            f"model_type {mt or '(missing)'!r} is not one the memory model knows; supported: {', '.join(SUPPORTED)}"
        )

    def need(*keys: str) -> int:
        for k in keys:
            if cfg.get(k) is not None:
                return int(cfg[k])
        raise ModelConfigError(f"config.json ({mt}) lacks {' / '.join(keys)}")

    if mt == "gpt2":
        hidden = need("n_embd", "hidden_size")
        heads = need("n_head", "num_attention_heads")
        return ArchitectureFacts(
            model_type=mt, num_layers=need("n_layer", "num_hidden_layers"), hidden_size=hidden,
            num_attention_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
            intermediate_size=int(cfg.get("n_inner") or 4 * hidden), vocab_size=need("vocab_size"),
            max_position_embeddings=need("n_positions", "max_position_embeddings"), tie_word_embeddings=True,
            checkpoint_dtype=_ckpt_dtype(cfg),
        )
    hidden = need("hidden_size")
    heads = need("num_attention_heads")
    if mt == "opt":
        return ArchitectureFacts(
            model_type=mt, num_layers=need("num_hidden_layers"), hidden_size=hidden, num_attention_heads=heads,
            num_kv_heads=heads, head_dim=hidden // heads, intermediate_size=need("ffn_dim"),
            vocab_size=need("vocab_size"), max_position_embeddings=need("max_position_embeddings"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)), checkpoint_dtype=_ckpt_dtype(cfg),
        )
    return ArchitectureFacts(
        model_type=mt, num_layers=need("num_hidden_layers"), hidden_size=hidden, num_attention_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads), intermediate_size=need("intermediate_size"),
        vocab_size=need("vocab_size"), max_position_embeddings=need("max_position_embeddings"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", mt.startswith("gemma"))),
        checkpoint_dtype=_ckpt_dtype(cfg),
    )


def _ckpt_dtype(cfg: dict) -> str:
    return str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")


def parameter_count(a: ArchitectureFacts, cfg: dict) -> int:
    h, L, v = a.hidden_size, a.num_layers, a.vocab_size
    if a.model_type == "gpt2":
        per_layer = 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + 2 * h + (h * a.intermediate_size + a.intermediate_size) + (a.intermediate_size * h + h)
        return v * h + a.max_position_embeddings * h + L * per_layer + 2 * h
    if a.model_type == "opt":
        proj = int(cfg.get("word_embed_proj_dim") or h)
        embed = v * proj + (a.max_position_embeddings + 2) * h + (2 * proj * h if proj != h else 0)
        attn = 4 * (h * h + h)
        mlp = h * a.intermediate_size + a.intermediate_size + a.intermediate_size * h + h
        final_norm = 2 * h if cfg.get("do_layer_norm_before", True) else 0
        return embed + L * (attn + mlp + 4 * h) + final_norm + (0 if a.tie_word_embeddings else v * proj)
    q = a.num_attention_heads * a.head_dim
    kv = a.num_kv_heads * a.head_dim
    attn = h * q + 2 * h * kv + q * h
    if a.model_type.startswith("qwen2") or cfg.get("attention_bias"):
        attn += q + 2 * kv
    norms = (4 if a.model_type == "gemma2" else 2) * h
    per_layer = attn + 3 * h * a.intermediate_size + norms
    return v * h + L * per_layer + h + (0 if a.tie_word_embeddings else v * h)


def resolve_dtype(dtype: str, checkpoint_dtype: str) -> str:
    """vLLM's `auto`: the checkpoint dtype, except that float32 checkpoints run in bfloat16."""
    if dtype != "auto":
        if dtype not in DTYPE_BYTES:
            raise ModelConfigError(f"dtype {dtype!r} unknown; use auto, {', '.join(DTYPE_BYTES)}")
        return {"float": "float32", "half": "float16"}.get(dtype, dtype)
    ckpt = checkpoint_dtype if checkpoint_dtype in DTYPE_BYTES else "float32"
    return "bfloat16" if DTYPE_BYTES[ckpt] == 4 else ckpt


def memory_model(
    model_dir: str | Path,
    dtype: str = "auto",
    device_kind: Literal["cuda", "cpu"] = "cuda",
    max_model_len: Optional[int] = None,
) -> MemoryModel:
    cfg = read_config(model_dir)
    arch = architecture(cfg)
    run_dtype = resolve_dtype(dtype, arch.checkpoint_dtype)
    size = DTYPE_BYTES[run_dtype]
    params = parameter_count(arch, cfg)
    if max_model_len is not None and max_model_len > arch.max_position_embeddings:
        raise ModelConfigError(
            f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
            f"{arch.max_position_embeddings}; lower it"
        )
    return MemoryModel(
        architecture=arch,
        dtype=run_dtype,
        device_kind=device_kind,
        parameters=params,
        weight_bytes=params * size,
        kv_bytes_per_token=arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * size,
        kv_block_tokens=KV_BLOCK_TOKENS[device_kind],
        max_model_len=max_model_len or arch.max_position_embeddings,
    )
