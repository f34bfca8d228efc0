"""The decoder of the Llama, Mistral and Qwen2 families, in Flax NNX, written for one device.

RMSNorm, rotary positions (with Llama 3 scaling), grouped-query attention (q/k/v bias for Qwen2),
SwiGLU. The other families (Qwen3, Gemma 2, GPT-2, Baichuan 2) change the parts `config.family`
names (families.py); GPT-2's LayerNorm and position table live in gpt2.py. Every parameter carries logical axis names and the layers are stacked along a leading
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
from moai_jax.models import kv_cache
from moai_jax.models import lora
from moai_jax.models import moe as moe_lib
from moai_jax.models.config import ModelConfig
from moai_jax.models.dense import dense
from moai_jax.models.families import ACTIVATIONS
from moai_jax.models.moe import MoE
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
    """Over the hidden size, or over each head (`per_head`, Qwen3's q/k norms), or over all of a projection's
    heads (`heads`: ("heads" or "kv_heads", how many), OLMoE's q/k norms). Gemma scales by 1 + w."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, per_head: bool = False,
                 heads: tuple[str, int] | None = None):
        size, names = (config.head_dim, ("head_dim",)) if per_head else (config.hidden_size, ("embed",))
        if heads is not None:
            size, names = (heads[1], config.head_dim), (heads[0], "head_dim")
        self.plus_one = config.family.norm == "rms_plus_one"
        init = jnp.zeros if self.plus_one else jnp.ones
        self.weight = nnx.Param(init(size, param_dtype), out_sharding=names, eager_sharding=False)
        self.eps, self.dtype, self.axes = config.rms_norm_eps, dtype, (-1,) if heads is None else (-2, -1)

    def __call__(self, x_BTE):
        x32_BTE = x_BTE.astype(jnp.float32)
        normed = x32_BTE * jax.lax.rsqrt(jnp.mean(x32_BTE**2, axis=self.axes, keepdims=True) + self.eps)
        if self.plus_one:  # Gemma multiplies in float32, then casts
            return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(self.dtype)
        return normed.astype(self.dtype) * self.weight[...].astype(self.dtype)


def _norm(config: ModelConfig, *, dtype, param_dtype):
    """The family's normalization over the hidden size: RMSNorm, or GPT-2's LayerNorm."""
    if config.family.norm == "layer":
        from moai_jax.models.gpt2 import LayerNorm

        return LayerNorm(config, dtype=dtype, param_dtype=param_dtype)
    return RMSNorm(config, dtype=dtype, param_dtype=param_dtype)


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
        if config.family.output_bias:
            self.o_bias = _param(rngs, (e,), ("embed",), param_dtype, nnx.initializers.zeros)
        if config.family.qk_norm:
            whole = config.family.qk_norm_whole  # OLMoE: over the whole projection, not each head
            self.q_norm = RMSNorm(config, dtype=dtype, param_dtype=param_dtype, per_head=True,
                                  heads=("heads", n) if whole else None)
            self.k_norm = RMSNorm(config, dtype=dtype, param_dtype=param_dtype, per_head=True,
                                  heads=("kv_heads", k) if whole else None)
        self.attention_bias, self.dtype, self.config = config.attention_bias, dtype, config

    def _project(self, x_BTE, weight, bias, heads: str, name: str):
        y_BTNH = dense(x_BTE, weight[...].astype(self.dtype))
        y_BTNH = lora.adapt(self, name, x_BTE, y_BTNH)
        if self.attention_bias:
            y_BTNH = y_BTNH + bias[...].astype(self.dtype)
        return checkpoint_name(constrain(y_BTNH, ("batch", "length", heads, "head_dim")), name)

    def __call__(self, x_BTE, cos_BTH, sin_BTH, segment_ids_BT, implementation: str, window=None, cache=None):
        """`cos_BTH`/`sin_BTH` None: no rotary positions (GPT-2, ALiBi). `window`: this layer's sliding window.
        With a `cache` (one layer's KVCache, in generation) → (y, the updated cache)."""
        bias, c = self.attention_bias, self.config
        q_BTNH = self._project(x_BTE, self.q_proj, self.q_bias if bias else None, "heads", "query")
        k_BTKH = self._project(x_BTE, self.k_proj, self.k_bias if bias else None, "kv_heads", "key")
        v_BTKH = self._project(x_BTE, self.v_proj, self.v_bias if bias else None, "kv_heads", "value")
        if c.family.qk_norm:
            q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
        if cos_BTH is not None:
            cos_BTH, sin_BTH = cos_BTH.astype(self.dtype), sin_BTH.astype(self.dtype)
            q_BTNH, k_BTKH = apply_rotary(q_BTNH, cos_BTH, sin_BTH), apply_rotary(k_BTKH, cos_BTH, sin_BTH)
        variants = dict(scale=(c.query_pre_attn_scalar or c.head_dim) ** -0.5, softcap=c.attn_logit_softcapping,
                        window=window, alibi_slopes=attention_lib.alibi_slopes(c.num_heads) if c.alibi else None)
        if cache is not None:
            out_BTNH, cache = kv_cache.attend(q_BTNH, k_BTKH, v_BTKH, cache, implementation=implementation, **variants)
        else:
            out_BTNH = attention_lib.attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, implementation=implementation,
                                               **variants)
        out_BTNH = constrain(out_BTNH, ("batch", "length", "heads", "head_dim"))
        y_BTE = dense(out_BTNH, self.o_proj[...].astype(self.dtype), 2)
        y_BTE = lora.adapt(self, "out", out_BTNH, y_BTE)
        if c.family.output_bias:
            y_BTE = y_BTE + self.o_bias[...].astype(self.dtype)
        y_BTE = checkpoint_name(y_BTE, "out")
        return y_BTE if cache is None else (y_BTE, cache)


class MLP(nnx.Module):
    """Gated: down(act(gate x) · up x). Not gated (GPT-2): down(act(up x + b)) + b."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        e, f = config.hidden_size, config.intermediate_size
        self.gated = config.family.gated_mlp
        if self.gated:
            self.gate_proj = _param(rngs, (e, f), ("embed", "mlp"), param_dtype)
        self.up_proj = _param(rngs, (e, f), ("embed", "mlp"), param_dtype)
        self.down_proj = _param(rngs, (f, e), ("mlp", "embed"), param_dtype)
        if not self.gated:
            self.up_bias = _param(rngs, (f,), ("mlp",), param_dtype, nnx.initializers.zeros)
            self.down_bias = _param(rngs, (e,), ("embed",), param_dtype, nnx.initializers.zeros)
        self.dtype, self.activation = dtype, ACTIVATIONS[config.hidden_act]

    def __call__(self, x_BTE):
        up_BTF = checkpoint_name(
            lora.adapt(self, "up", x_BTE, dense(x_BTE, self.up_proj[...].astype(self.dtype))), "up")
        if self.gated:
            gate_BTF = checkpoint_name(
                lora.adapt(self, "gate", x_BTE, dense(x_BTE, self.gate_proj[...].astype(self.dtype))), "gate")
            h_BTF = self.activation(gate_BTF) * up_BTF
        else:
            h_BTF = self.activation(up_BTF + self.up_bias[...].astype(self.dtype))
        h_BTF = constrain(h_BTF, ("batch", "length", "mlp"))
        y_BTE = checkpoint_name(lora.adapt(self, "down", h_BTF, dense(h_BTF, self.down_proj[...].astype(self.dtype))),
                                "down")
        return y_BTE if self.gated else y_BTE + self.down_bias[...].astype(self.dtype)


class Block(nnx.Module):
    """One decoder layer: pre-norm attention and pre-norm MLP, each added to the residual.

    With sandwich norms (Gemma 2) the attention's and the MLP's outputs are normed too before the add.
    A Mixture-of-Experts model's MLP is an `MoE` (models/moe.py); the block then also returns its router's
    statistics per row (None otherwise), and the cache (None without one).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.input_norm = _norm(config, dtype=dtype, param_dtype=param_dtype)
        self.attention = Attention(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.post_attention_norm = _norm(config, dtype=dtype, param_dtype=param_dtype)
        self.sparse = bool(config.num_experts)
        if self.sparse:
            self.mlp = MoE(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        else:
            self.mlp = MLP(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.sandwich = config.family.sandwich_norms
        if self.sandwich:
            self.attention_output_norm = _norm(config, dtype=dtype, param_dtype=param_dtype)
            self.mlp_output_norm = _norm(config, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x_BTE, cos_BTH, sin_BTH, segment_ids_BT, implementation: str, window=None, cache=None,
                 moe_implementation: str = "auto"):
        """→ (x, the updated cache or None, router statistics [B, 1, 2E + 3] or None)."""
        y_BTE = self.attention(self.input_norm(x_BTE), cos_BTH, sin_BTH, segment_ids_BT, implementation, window, cache)
        if cache is not None:
            y_BTE, cache = y_BTE
        x_BTE = x_BTE + (self.attention_output_norm(y_BTE) if self.sandwich else y_BTE)
        router_stats = None
        if self.sparse:
            y_BTE, router_stats = self.mlp(self.post_attention_norm(x_BTE), segment_ids_BT, moe_implementation)
        else:
            y_BTE = self.mlp(self.post_attention_norm(x_BTE))
        x_BTE = x_BTE + (self.mlp_output_norm(y_BTE) if self.sandwich else y_BTE)
        x_BTE = constrain(x_BTE, ("batch", "length", "embed"))
        return x_BTE, cache, router_stats


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
    `pipeline_micro_batches` (the step builder sets them from the plan: see models/pipeline.py), and
    `moe_implementation` ("auto", "dense", "sorted": see models/moe.py) for Mixture-of-Experts models.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: str = "none", attention: str = "auto", moe_implementation: str = "auto"):
        _check_choice("remat", remat, REMAT_POLICIES)
        _check_choice("attention", attention, attention_lib.IMPLEMENTATIONS)
        _check_choice("moe_implementation", moe_implementation, moe_lib.IMPLEMENTATIONS)
        if config.num_experts and not all(config.sparse_layers):
            raise ModelConfigError("Mixture-of-Experts models whose layers mix dense MLPs and experts (mlp_only_layers, "
                                   "decoder_sparse_step > 1) are not supported yet; every layer must be sparse")
        self.config, self.dtype, self.param_dtype = config, dtype, param_dtype
        self.remat, self.attention, self.moe_implementation = remat, attention, moe_implementation
        self.pipeline_stages, self.pipeline_micro_batches = 1, 1
        self.embedding = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), param_dtype)
        if config.family.learned_positions:
            self.position_embedding = _param(rngs, (config.max_position_embeddings, config.hidden_size),
                                             (None, "embed"), param_dtype)
        self.layers = _stacked_blocks(config, rngs, dtype, param_dtype)
        self.final_norm = _norm(config, dtype=dtype, param_dtype=param_dtype)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), param_dtype)

    def __call__(self, input_ids_BT, *, segment_ids=None, positions=None):
        return self.logits(self.hidden_states(input_ids_BT, segment_ids=segment_ids, positions=positions))

    def hidden_states(self, input_ids_BT, *, segment_ids=None, positions=None):
        """The final-normed hidden states [batch, length, embed] in the compute dtype."""
        return self.hidden_states_and_router(input_ids_BT, segment_ids=segment_ids, positions=positions)[0]

    def hidden_states_and_router(self, input_ids_BT, *, segment_ids=None, positions=None):
        """(final-normed hidden states, the router's statistics summed over layers and rows [2E + 3], or None
        for a dense model: `moe.router_losses` turns them into the load-balancing loss)."""
        c = self.config
        _check_choice("remat", self.remat, REMAT_POLICIES)
        implementation = attention_lib.resolve(self.attention, self.dtype, c.head_dim)
        batch, length = input_ids_BT.shape
        if c.sliding_window is not None and length > c.sliding_window and not c.family.alternating_window:
            raise ModelConfigError(
                f"sequence length {length} exceeds {c.model_type}'s sliding window of {c.sliding_window}; "
                f"use seq_len <= {c.sliding_window}"
            )
        if c.family.learned_positions and length > c.max_position_embeddings:
            raise ModelConfigError(f"sequence length {length} exceeds {c.model_type}'s {c.max_position_embeddings} "
                                   f"learned positions; use seq_len <= {c.max_position_embeddings}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        x_BTE, cos_BTH, sin_BTH = self._inputs(input_ids_BT, positions)
        graphdef, layer_state = nnx.split(self.layers)
        layer_state = lora.frozen_as_bits(lora.seed_dropout(layer_state, input_ids_BT))
        windows_L = self._windows(length)

        sparse = bool(c.num_experts)

        def layer(carry, state_and_window, cos_BTH, sin_BTH, segment_ids_BT):
            """One layer; a sparse model's carry is (x, router statistics per row [B, 1, 2E + 3] so far)."""
            state, window = state_and_window
            state = lora.frozen_from_bits(state, self.dtype)
            x_BTE, stats_B1X = carry if sparse else (carry, None)
            x_BTE, _, layer_stats = nnx.merge(graphdef, state)(x_BTE, cos_BTH, sin_BTH, segment_ids_BT, implementation,
                                                               window, moe_implementation=self.moe_implementation)
            return (x_BTE, stats_B1X + layer_stats) if sparse else x_BTE

        if self.remat == "matmuls":
            layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.save_only_these_names(*MATMUL_NAMES),
                                   prevent_cse=False)
        elif self.remat == "full":
            layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
        layer_state = (layer_state, windows_L)  # the windows go with their layers, through the stages too
        carry = (x_BTE, jnp.zeros((batch, 1, moe_lib.stats_width(c.num_experts)), jnp.float32)) if sparse else x_BTE
        if self.pipeline_stages > 1:
            carry = pipelined_layers(layer, layer_state, carry, (cos_BTH, sin_BTH, segment_ids),
                                     stages=self.pipeline_stages, micro_batches=self.pipeline_micro_batches,
                                     remat_stage=self.remat == "full")
        else:
            carry, _ = jax.lax.scan(lambda x, state: (layer(x, state, cos_BTH, sin_BTH, segment_ids), None), carry,
                                    layer_state)
        x_BTE, stats_B1X = carry if sparse else (carry, None)
        return self.final_norm(x_BTE), None if stats_B1X is None else jnp.sum(stats_B1X, axis=(0, 1))

    def _inputs(self, input_ids_BT, positions_BT):
        """The embedded tokens [B, T, E] and the rotary cos/sin of their positions (None without rotary)."""
        c = self.config
        rotary_positions = not (c.family.learned_positions or c.alibi)
        cos_BTH, sin_BTH = rotary(positions_BT, rope_frequencies(c)) if rotary_positions else (None, None)

        # Like every weight under FSDP, the table is gathered for its use (over fsdp, not over tensor):
        # looked up from embed-sharded rows, the result would need a reshuffle XLA only does by replicating it.
        table_VE = constrain(self.embedding[...].astype(self.dtype), ("vocab", None))
        x_BTE = jnp.take(table_VE, input_ids_BT, axis=0)
        if c.family.scaled_embeddings:
            x_BTE = x_BTE * jnp.asarray(c.hidden_size**0.5, self.dtype)
        if c.family.learned_positions:
            positions_PE = constrain(self.position_embedding[...].astype(self.dtype), (None, None))  # gathered, as above
            x_BTE = x_BTE + jnp.take(positions_PE, positions_BT, axis=0)
        return constrain(x_BTE, ("batch", "length", "embed")), cos_BTH, sin_BTH

    def _windows(self, length: int):
        """Gemma 2: each layer's sliding window, scanned with its weights (global: longer than any row); else None."""
        c = self.config
        if c.family.alternating_window and c.sliding_window is not None:
            return jnp.asarray([c.sliding_window if i % 2 == 0 else length + 1 for i in range(c.num_layers)])
        return None

    def cached_hidden_states(self, input_ids_BT, positions_BT, cache: kv_cache.KVCache):
        """Generation's pass over a chunk of tokens at their positions: the final-normed hidden states and
        the cache with the chunk's keys and values added (a prefill, then one token at a time; see kv_cache.py)."""
        implementation = attention_lib.resolve(self.attention, self.dtype, self.config.head_dim)
        x_BTE, cos_BTH, sin_BTH = self._inputs(input_ids_BT, positions_BT)
        graphdef, layer_state = nnx.split(self.layers)

        def layer(x_BTE, xs):
            state, window, key, value = xs
            block = nnx.merge(graphdef, state)
            x_BTE, updated, _ = block(x_BTE, cos_BTH, sin_BTH, None, implementation, window, cache.layer(key, value),
                                      moe_implementation=self.moe_implementation)
            return x_BTE, (updated.key, updated.value)

        xs = (layer_state, self._windows(cache.valid.shape[1]), cache.key, cache.value)
        x_BTE, (key, value) = jax.lax.scan(layer, x_BTE, xs)
        return self.final_norm(x_BTE), cache.advanced(key, value, input_ids_BT.shape[1])

    def logits(self, hidden_BTE):
        """float32 logits [batch, length, vocab] of hidden states."""
        c = self.config
        if c.tie_word_embeddings:
            head_EV = self.embedding[...].T
        else:
            head_EV = self.lm_head[...]
        if c.family.normalized_head:  # Baichuan 2: F.normalize of each vocab row
            head_EV = head_EV / jnp.maximum(jnp.linalg.norm(head_EV, axis=0, keepdims=True), 1e-12)
        logits_BTV = jnp.einsum("bte,ev->btv", hidden_BTE, head_EV.astype(self.dtype),
                                preferred_element_type=jnp.float32)
        if c.final_logit_softcapping is not None:
            logits_BTV = c.final_logit_softcapping * jnp.tanh(logits_BTV / c.final_logit_softcapping)
        return constrain(logits_BTV, ("batch", "length", "vocab"))
