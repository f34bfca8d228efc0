"""Configs of published checkpoints, by name, plus `tiny` for tests and the built-in default run."""

from __future__ import annotations

import dataclasses

from moai_jax.models.config import ModelConfig


def _llama3_rope(factor: float) -> dict:
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


_LLAMA3_8B = ModelConfig(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    bos_token_id=128000,
    eos_token_id=128001,
)
_LLAMA3_70B = dataclasses.replace(
    _LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64
)
_LLAMA31 = {"max_position_embeddings": 131072, "rope_scaling": _llama3_rope(8.0)}
_LLAMA32 = {"max_position_embeddings": 131072, "rope_scaling": _llama3_rope(32.0), "tie_word_embeddings": True}

_LLAMA2_7B = ModelConfig(
    model_type="llama",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    head_dim=128,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)

PRESETS: dict[str, ModelConfig] = {
    "llama2-7b": _LLAMA2_7B,
    "llama3-8b": _LLAMA3_8B,
    "llama3-70b": _LLAMA3_70B,
    "llama3.1-8b": dataclasses.replace(_LLAMA3_8B, **_LLAMA31),
    "llama3.1-70b": dataclasses.replace(_LLAMA3_70B, **_LLAMA31),
    "llama3.2-1b": dataclasses.replace(
        _LLAMA3_8B, hidden_size=2048, intermediate_size=8192, num_layers=16, head_dim=64, **_LLAMA32
    ),
    "llama3.2-3b": dataclasses.replace(
        _LLAMA3_8B, hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24, **_LLAMA32
    ),
    "mistral-7b": dataclasses.replace(
        _LLAMA2_7B, model_type="mistral", intermediate_size=14336, num_kv_heads=8, max_position_embeddings=32768,
        sliding_window=4096,
    ),
    "qwen2.5-7b": ModelConfig(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        max_position_embeddings=131072,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        attention_bias=True,
        bos_token_id=151643,
        eos_token_id=151643,
    ),
    "tiny": ModelConfig(),
}
