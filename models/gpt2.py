"""GPT-2's LayerNorm (the rest of GPT-2 is the Decoder with the parts `families.FAMILIES["gpt2"]` names).

GPT-2 (and Cerebras-GPT, which shares its architecture) differs from Llama in: LayerNorm with a
bias, a learned table of position embeddings, a GELU MLP without gate, biases on every projection,
and q/k/v fused into one Conv1D `c_attn` in its checkpoints (hf.py splits it into q/k/v).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moai_jax.models.config import ModelConfig


class LayerNorm(nnx.Module):
    """(x - mean) / sqrt(var + eps) · w + b over the hidden size, computed in float32."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype):
        e = config.hidden_size
        self.weight = nnx.Param(jnp.ones((e,), param_dtype), out_sharding=("embed",), eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((e,), param_dtype), out_sharding=("embed",), eager_sharding=False)
        self.eps, self.dtype = config.rms_norm_eps, dtype

    def __call__(self, x_BTE):
        x32_BTE = x_BTE.astype(jnp.float32)
        centered = x32_BTE - jnp.mean(x32_BTE, axis=-1, keepdims=True)
        normed = centered * jax.lax.rsqrt(jnp.mean(centered**2, axis=-1, keepdims=True) + self.eps)
        return (normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)
