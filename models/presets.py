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

_GPT2 = ModelConfig(
    model_type="gpt2",
    vocab_size=50257,
    hidden_size=768,
    intermediate_size=3072,
    num_layers=12,
    num_heads=12,
    num_kv_heads=12,
    head_dim=64,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    attention_bias=True,
    hidden_act="gelu_new",
    bos_token_id=50256,
    eos_token_id=50256,
)


def _gpt2(hidden: int, layers: int, heads: int, **changes) -> ModelConfig:
    return dataclasses.replace(_GPT2, hidden_size=hidden, intermediate_size=4 * hidden, num_layers=layers,
                               num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads, **changes)


_QWEN3_8B = ModelConfig(
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_layers=36,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    bos_token_id=151643,
    eos_token_id=151645,
)
_GEMMA2_9B = ModelConfig(
    model_type="gemma2",
    vocab_size=256000,
    hidden_size=3584,
    intermediate_size=14336,
    num_layers=42,
    num_heads=16,
    num_kv_heads=8,
    head_dim=256,
    max_position_embeddings=8192,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    sliding_window=4096,
    hidden_act="gelu_pytorch_tanh",
    query_pre_attn_scalar=256,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    bos_token_id=2,
    eos_token_id=1,
)
_BAICHUAN2_7B = ModelConfig(
    model_type="baichuan",
    vocab_size=125696,
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    head_dim=128,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)

# Mixture-of-Experts models: the config.json values of mistralai/Mixtral-8x7B-v0.1, Qwen/Qwen3-30B-A3B,
# Qwen/Qwen3-235B-A22B and allenai/OLMoE-1B-7B-0924 (every layer sparse, no shared expert)
_MIXTRAL_8X7B = dataclasses.replace(
    _LLAMA2_7B, model_type="mixtral", intermediate_size=14336, num_kv_heads=8, max_position_embeddings=32768,
    rope_theta=1000000.0, num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02,
)
_QWEN3_30B_A3B = dataclasses.replace(
    _QWEN3_8B, model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32,
    num_kv_heads=4, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, router_aux_loss_coef=0.001,
)
_QWEN3_235B_A22B = dataclasses.replace(
    _QWEN3_30B_A3B, hidden_size=4096, intermediate_size=12288, num_layers=94, num_heads=64, moe_intermediate_size=1536,
)
_OLMOE_1B_7B = ModelConfig(
    model_type="olmoe",
    vocab_size=50304,
    hidden_size=2048,
    intermediate_size=1024,
    num_layers=16,
    num_heads=16,
    num_kv_heads=16,
    head_dim=128,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=50279,
    num_experts=64,
    num_experts_per_tok=8,
    norm_topk_prob=False,
    router_aux_loss_coef=0.01,
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
    "qwen3-0.6b": dataclasses.replace(_QWEN3_8B, hidden_size=1024, intermediate_size=3072, num_layers=28,
                                      num_heads=16, tie_word_embeddings=True),
    "qwen3-1.7b": dataclasses.replace(_QWEN3_8B, hidden_size=2048, intermediate_size=6144, num_layers=28,
                                      num_heads=16, tie_word_embeddings=True),
    "qwen3-4b": dataclasses.replace(_QWEN3_8B, hidden_size=2560, intermediate_size=9728, tie_word_embeddings=True),
    "qwen3-8b": _QWEN3_8B,
    "qwen3-14b": dataclasses.replace(_QWEN3_8B, hidden_size=5120, intermediate_size=17408, num_layers=40,
                                     num_heads=40),
    "qwen3-32b": dataclasses.replace(_QWEN3_8B, hidden_size=5120, intermediate_size=25600, num_layers=64,
                                     num_heads=64),
    "gemma2-2b": dataclasses.replace(_GEMMA2_9B, hidden_size=2304, intermediate_size=9216, num_layers=26,
                                     num_heads=8, num_kv_heads=4),
    "gemma2-9b": _GEMMA2_9B,
    "gemma2-27b": dataclasses.replace(_GEMMA2_9B, hidden_size=4608, intermediate_size=36864, num_layers=46,
                                      num_heads=32, num_kv_heads=16, head_dim=128, query_pre_attn_scalar=144),
    "gpt2": _GPT2,
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
    "cerebras-gpt-13b": _gpt2(5120, 40, 40, max_position_embeddings=2048, hidden_act="gelu"),
    "baichuan2-7b": _BAICHUAN2_7B,
    "baichuan2-13b": dataclasses.replace(_BAICHUAN2_7B, hidden_size=5120, intermediate_size=13696, num_layers=40,
                                         num_heads=40, num_kv_heads=40, alibi=True),
    "mixtral-8x7b": _MIXTRAL_8X7B,
    "qwen3-30b-a3b": _QWEN3_30B_A3B,
    "qwen3-235b-a22b": _QWEN3_235B_A22B,
    "olmoe-1b-7b": _OLMOE_1B_7B,
    "tiny": ModelConfig(),
}
