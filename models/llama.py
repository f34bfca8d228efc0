"""The decoder of the Llama, Mistral and Qwen2 families, in Flax NNX, written for one device.

RMSNorm, rotary positions (with Llama 3 scaling), grouped-query attention (q/k/v bias for Qwen2),
SwiGLU. Every parameter carries logical axis names and the layers are stacked along a leading
`layers` axis and run with one `jax.lax.scan`, so compile time does not grow with depth. Activations
at layer boundaries are constrained by logical name; the model never sees a mesh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from moai_jax.errors import ModelConfigError
from moai_jax.models import attention as attention_lib
from moai_jax.models.config import ModelConfig
from moai_jax.models.pipeline import pipelined_layers
from moai_jax.sharding.annotate import constrain

REMAT_POLICIES = ("none", "matmuls", "full")
# Outputs that remat="matmuls" keeps: the projections and the attention kernel's output (and log-sum-exp).
MATMUL_NAMES = ("query", "key", "value", "attention", "attention_lse", "out", "gate", "up", "down")
_INIT = nnx.initializers.normal(stddev=0.02)


def _param(rngs: nnx.Rngs, shape, names, param_dtype, init=_INIT) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, param_dtype), out_sharding=names, eager_sharding=False)


def rope_frequencies(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim / 2] of the rotary embedding, Llama 3 scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        scaled = np.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rotary(positions_BT, inv_freq_H2):
    """cos and sin [B, T, head_dim] of each position (halves repeated, as Hugging Face lays them out)."""
    angles_BTH2 = positions_BT[..., None].astype(jnp.float32) * inv_freq_H2
    angles_BTH = jnp.concatenate([angles_BTH2, angles_BTH2], axis=-1)
    return jnp.cos(angles_BTH), jnp.sin(angles_BTH)


def apply_rotary(x_BTNH, cos_BTH, sin_BTH):
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    rotated_BTNH = jnp.concatenate([-x2, x1], axis=-1)
    return x_BTNH * cos_BTH[:, :, None] + rotated_BTNH * sin_BTH[:, :, None]


class RMSNorm(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((config.hidden_size,), param_dtype), out_sharding=("embed",),
                                eager_sharding=False)
        self.eps, self.dtype = config.rms_norm_eps, dtype

    def __call__(self, x_BTE):
        x32_BTE = x_BTE.astype(jnp.float32)
        normed = x32_BTE * jax.lax.rsqrt(jnp.mean(x32_BTE**2, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * self.weight[...].astype(self.dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        e, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = _param(rngs, (e, n, h), ("embed", "heads", "head_dim"), param_dtype)
        self.k_proj = _param(rngs, (e, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.v_proj = _param(rngs, (e, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.o_proj = _param(rngs, (n, h, e), ("heads", "head_dim", "embed"), param_dtype)
        if config.attention_bias:
            zeros = nnx.initializers.zeros
            self.q_bias = _param(rngs, (n, h), ("heads", "head_dim"), param_dtype, zeros)
            self.k_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), param_dtype, zeros)
            self.v_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), param_dtype, zeros)
        self.attention_bias, self.dtype = config.attention_bias, dtype

    def _project(self, x_BTE, weight, bias, heads: str, name: str):
        y_BTNH = jnp.einsum("bte,enh->btnh", x_BTE, weight[...].astype(self.dtype))
        if self.attention_bias:
            y_BTNH = y_BTNH + bias[...].astype(self.dtype)
        return checkpoint_name(constrain(y_BTNH, ("batch", "length", heads, "head_dim")), name)

    def __call__(self, x_BTE, cos_BTH, sin_BTH, segment_ids_BT, implementation: str):
        bias = self.attention_bias
        q_BTNH = self._project(x_BTE, self.q_proj, self.q_bias if bias else None, "heads", "query")
        k_BTKH = self._project(x_BTE, self.k_proj, self.k_bias if bias else None, "kv_heads", "key")
        v_BTKH = self._project(x_BTE, self.v_proj, self.v_bias if bias else None, "kv_heads", "value")
        cos_BTH, sin_BTH = cos_BTH.astype(self.dtype), sin_BTH.astype(self.dtype)
        q_BTNH, k_BTKH = apply_rotary(q_BTNH, cos_BTH, sin_BTH), apply_rotary(k_BTKH, cos_BTH, sin_BTH)
        out_BTNH = attention_lib.attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, implementation=implementation)
        out_BTNH = constrain(out_BTNH, ("batch", "length", "heads", "head_dim"))
        y_BTE = jnp.einsum("btnh,nhe->bte", out_BTNH, self.o_proj[...].astype(self.dtype))
        return checkpoint_name(y_BTE, "out")


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        e, f = config.hidden_size, config.intermediate_size
        self.gate_proj = _param(rngs, (e, f), ("embed", "mlp"), param_dtype)
        self.up_proj = _param(rngs, (e, f), ("embed", "mlp"), param_dtype)
        self.down_proj = _param(rngs, (f, e), ("mlp", "embed"), param_dtype)
        self.dtype = dtype

    def __call__(self, x_BTE):
        gate_BTF = checkpoint_name(x_BTE @ self.gate_proj[...].astype(self.dtype), "gate")
        up_BTF = checkpoint_name(x_BTE @ self.up_proj[...].astype(self.dtype), "up")
        h_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "length", "mlp"))
        return checkpoint_name(h_BTF @ self.down_proj[...].astype(self.dtype), "down")


class Block(nnx.Module):
    """One decoder layer: pre-norm attention and pre-norm MLP, each added to the residual."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.input_norm = RMSNorm(config, dtype=dtype, param_dtype=param_dtype)
        self.attention = Attention(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.post_attention_norm = RMSNorm(config, dtype=dtype, param_dtype=param_dtype)
        self.mlp = MLP(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x_BTE, cos_BTH, sin_BTH, segment_ids_BT, implementation: str):
        x_BTE = x_BTE + self.attention(self.input_norm(x_BTE), cos_BTH, sin_BTH, segment_ids_BT, implementation)
        x_BTE = x_BTE + self.mlp(self.post_attention_norm(x_BTE))
        return constrain(x_BTE, ("batch", "length", "embed"))


def _stacked_blocks(config: ModelConfig, rngs: nnx.Rngs, dtype, param_dtype) -> Block:
    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs: nnx.Rngs) -> Block:
        return Block(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    return create(rngs)


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ModelConfigError(f"unknown {name} {value!r}; use one of: {', '.join(choices)}")


class Decoder(nnx.Module):
    """A decoder-only language model: `model(input_ids)` → float32 logits [batch, length, vocab].

    `dtype` is the compute dtype, `param_dtype` the storage dtype. `remat` ("none", "matmuls",
    "full") and `attention` ("auto", "xla", "cudnn", "blockwise") are plain attributes that may be
    changed before the model is split and jitted; so are `pipeline_stages` and
    `pipeline_micro_batches` (the step builder sets them from the plan: see models/pipeline.py).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: str = "none", attention: str = "auto"):
        _check_choice("remat", remat, REMAT_POLICIES)
        _check_choice("attention", attention, attention_lib.IMPLEMENTATIONS)
        self.config, self.dtype, self.param_dtype = config, dtype, param_dtype
        self.remat, self.attention = remat, attention
        self.pipeline_stages, self.pipeline_micro_batches = 1, 1
        self.embedding = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), param_dtype)
        self.layers = _stacked_blocks(config, rngs, dtype, param_dtype)
        self.final_norm = RMSNorm(config, dtype=dtype, param_dtype=param_dtype)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), param_dtype)

    def __call__(self, input_ids_BT, *, segment_ids=None, positions=None):
        return self.logits(self.hidden_states(input_ids_BT, segment_ids=segment_ids, positions=positions))

    def hidden_states(self, input_ids_BT, *, segment_ids=None, positions=None):
        """The final-normed hidden states [batch, length, embed] in the compute dtype."""
        c = self.config
        _check_choice("remat", self.remat, REMAT_POLICIES)
        implementation = attention_lib.resolve(self.attention, self.dtype, c.head_dim)
        batch, length = input_ids_BT.shape
        if c.sliding_window is not None and length > c.sliding_window:
            raise ModelConfigError(
                f"sequence length {length} exceeds {c.model_type}'s sliding window of {c.sliding_window}; "
                f"use seq_len <= {c.sliding_window}"
            )
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        cos_BTH, sin_BTH = rotary(positions, rope_frequencies(c))

        # Like every weight under FSDP, the table is gathered for its use (over fsdp, not over tensor):
        # looked up from embed-sharded rows, the result would need a reshuffle XLA only does by replicating it.
        table_VE = constrain(self.embedding[...].astype(self.dtype), ("vocab", None))
        x_BTE = jnp.take(table_VE, input_ids_BT, axis=0)
        x_BTE = constrain(x_BTE, ("batch", "length", "embed"))
        graphdef, layer_state = nnx.split(self.layers)

        def layer(x_BTE, state, cos_BTH, sin_BTH, segment_ids_BT):
            return nnx.merge(graphdef, state)(x_BTE, cos_BTH, sin_BTH, segment_ids_BT, implementation)

        if self.remat == "matmuls":
            layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.save_only_these_names(*MATMUL_NAMES),
                                   prevent_cse=False)
        elif self.remat == "full":
            layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
        if self.pipeline_stages > 1:
            x_BTE = pipelined_layers(layer, layer_state, x_BTE, (cos_BTH, sin_BTH, segment_ids),
                                     stages=self.pipeline_stages, micro_batches=self.pipeline_micro_batches)
        else:
            x_BTE, _ = jax.lax.scan(lambda x, state: (layer(x, state, cos_BTH, sin_BTH, segment_ids), None), x_BTE,
                                    layer_state)
        return self.final_norm(x_BTE)

    def logits(self, hidden_BTE):
        """float32 logits [batch, length, vocab] of hidden states."""
        if self.config.tie_word_embeddings:
            head_EV = self.embedding[...].T
        else:
            head_EV = self.lm_head[...]
        logits_BTV = jnp.einsum("bte,ev->btv", hidden_BTE, head_EV.astype(self.dtype),
                                preferred_element_type=jnp.float32)
        return constrain(logits_BTV, ("batch", "length", "vocab"))
