"""The key/value cache of generation, and attention that reads it.

Generation runs the decoder twice over: a *prefill* of the left-padded prompts, which fills the first
slots of an empty cache, then *decode* steps of one token each, which append one slot and attend to
every filled one. Slot i of every row holds the i-th token of the padded batch; `valid` says which
slots hold a real token rather than left padding, so a query attends to the valid slots up to its own.

    cache = KVCache.empty(config, batch=4, slots=96, dtype=jnp.float32)
    hidden_BTE, cache = model.cached_hidden_states(prompt_ids_BT, positions_BT, cache)   # prefill
    hidden_B1E, cache = model.cached_hidden_states(next_ids_B1, positions_B1, cache)     # one step

A decoder supports generation by passing one layer's view of the cache (`KVCache` with key/value of
that layer) to `attend` in place of its usual attention, and returning the updated view.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moai_jax.models import attention as attention_lib
from moai_jax.sharding.annotate import constrain

_MASKED = -1e30
KV_NAMES = ("layers", "batch", "length", "kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer, or of one layer inside the decoder's layer scan."""

    key: jax.Array  # [layers, batch, slots, kv_heads, head_dim] (one layer: [batch, slots, kv_heads, head_dim])
    value: jax.Array
    valid: jax.Array  # [batch, slots] bool: the slot holds a real token, not left padding
    index: jax.Array  # int32 scalar: the slot of the next chunk's first token

    @classmethod
    def empty(cls, config, batch: int, slots: int, dtype, valid=None) -> KVCache:
        """A cache of `slots` zeros per row; `valid` [batch, slots] marks the slots of real tokens (default all)."""
        shape = (config.num_layers, batch, slots, config.num_kv_heads, config.head_dim)
        zeros = constrain(jnp.zeros(shape, dtype), KV_NAMES)
        valid = jnp.ones((batch, slots), bool) if valid is None else valid
        return cls(key=zeros, value=zeros, valid=valid, index=jnp.zeros((), jnp.int32))

    def layer(self, key, value) -> KVCache:
        """The view of one layer (its key and value, the shared `valid` and `index`)."""
        return dataclasses.replace(self, key=key, value=value)

    def advanced(self, key, value, length: int) -> KVCache:
        """The cache with every layer's updated key/value, after a chunk of `length` tokens."""
        return dataclasses.replace(self, key=key, value=value, index=self.index + length)


def attend(q_BTNH, k_BTKH, v_BTKH, cache: KVCache, *, implementation: str, scale: float | None = None,
           softcap: float | None = None, window=None, alibi_slopes=None):
    """Causal attention of a chunk of queries at slots [index, index + T) → (output [B, T, N, H], cache).

    The chunk's keys and values are written into its slots. A prefill (T > 1) starts at an empty
    cache, so it attends within itself, by the training kernels, with padding as its own segment;
    a decode step (T = 1) attends to the valid slots up to its own. `scale`, `softcap`, `window` and
    `alibi_slopes` are the family variants of `attention.attention`; slots stand for positions, which
    left padding keeps apart by the same distances.
    """
    length = q_BTNH.shape[1]
    names = KV_NAMES[1:]
    key_BSKH = jax.lax.dynamic_update_slice_in_dim(cache.key, k_BTKH.astype(cache.key.dtype), cache.index, axis=1)
    value_BSKH = jax.lax.dynamic_update_slice_in_dim(cache.value, v_BTKH.astype(cache.value.dtype), cache.index,
                                                     axis=1)
    cache = cache.layer(constrain(key_BSKH, names), constrain(value_BSKH, names))
    if length > 1:
        segment_ids_BT = jax.lax.dynamic_slice_in_dim(cache.valid, cache.index, length, axis=1).astype(jnp.int32)
        out_BTNH = attention_lib.attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, implementation=implementation,
                                           scale=scale, softcap=softcap, window=window, alibi_slopes=alibi_slopes)
        return out_BTNH, cache
    scores = attention_lib.Scores(q_BTNH.shape[-1] ** -0.5 if scale is None else scale, softcap,
                                  None if alibi_slopes is None else tuple(alibi_slopes))
    return _one_query(q_BTNH, cache, scores, window), cache


def _one_query(q_B1NH, cache: KVCache, scores, window):
    """Attention of one query per row over the valid slots up to its own (and within its window).
    Query head n reads key/value head n // G."""
    b, _, n, h = q_B1NH.shape
    kv_heads, slots = cache.key.shape[2], cache.key.shape[1]
    q_BKG1H = jnp.moveaxis(q_B1NH.reshape(b, 1, kv_heads, n // kv_heads, h), 1, 3)
    s_BKG1S = jnp.einsum("bkgth,bskh->bkgts", q_BKG1H, cache.key, preferred_element_type=jnp.float32)
    query_1, slots_S = cache.index[None], jnp.arange(slots)
    s_BKG1S = scores.apply(s_BKG1S, query_1, slots_S)
    visible_BS = cache.valid & (slots_S <= cache.index)[None, :]
    if window is not None:
        visible_BS = visible_BS & (cache.index - slots_S < window)[None, :]
    s_BKG1S = jnp.where(visible_BS[:, None, None, None, :], s_BKG1S, _MASKED)
    p_BKG1S = jax.nn.softmax(s_BKG1S, axis=-1)
    out_BKG1H = jnp.einsum("bkgts,bskh->bkgth", p_BKG1S.astype(cache.value.dtype), cache.value,
                           preferred_element_type=jnp.float32)
    return jnp.moveaxis(out_BKG1H, 3, 1).reshape(b, 1, n, h).astype(q_B1NH.dtype)
