"""Causal attention over packed sequences, by one of three implementations.

- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, fused flash attention on NVIDIA GPUs.
- "xla": `jax.nn.dot_product_attention(implementation="xla")` with a full `[length, length]` mask.
- "blockwise": an online softmax over key/value blocks in a `jax.custom_vjp` that keeps only the
  output and its log-sum-exp, so neither pass ever holds a whole `[length, length]` score matrix;
  key blocks the causal mask hides from a whole query block are skipped, forward and backward.
  It is the default off NVIDIA GPUs, so a step compiled on CPU has the memory shape of the GPU step.
- "auto": cuDNN where it can run (NVIDIA GPU, 16-bit compute, head_dim a multiple of 8 up to 128),
  blockwise elsewhere.

Under context parallelism (the sequence split over the `context` mesh axis) every implementation runs
as blockwise over all-gathered keys and values (models/context.py): cuDNN's fused kernel in JAX refuses
a sharded sequence.

A token attends to itself and the earlier tokens of its own segment. Segment 0 (padding) is one
more segment, so padding tokens attend among themselves and stay finite.

Family variants, in every implementation: a `scale` other than head_dim^-1/2, soft-capped scores
(Gemma 2: cap · tanh(s / cap); cuDNN has none, so it falls back to blockwise), a sliding `window`
(a token sees the `window` latest tokens, itself included; may be a traced per-layer value) and
ALiBi biases (Baichuan 2 13B: slope_n · (key position - query position)).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from moai_jax.errors import ModelConfigError
from moai_jax.models import context as context_lib
from moai_jax.sharding.annotate import active_mesh, mesh_axis

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "blockwise")
_MASKED = -1e30


def resolve(implementation: str, dtype, head_dim: int, device=None) -> str:
    """The implementation "auto" stands for on `device` (default: this machine's first; others are
    returned as they are)."""
    if implementation not in IMPLEMENTATIONS:
        raise ModelConfigError(f"unknown attention {implementation!r}; use one of: {', '.join(IMPLEMENTATIONS)}")
    if implementation != "auto":
        return implementation
    device = device or jax.devices()[0]
    nvidia = device.platform == "gpu" and "nvidia" in device.device_kind.lower()  # e.g. "NVIDIA H100 80GB HBM3"
    sixteen_bit = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if nvidia and sixteen_bit and head_dim % 8 == 0 and head_dim <= 128 else "blockwise"


def cudnn_fits(config, tensor: int = 1, stage: int = 1, context: int = 1) -> bool:
    """Whether cuDNN's fused attention can take a model `config` split `tensor` ways in `stage` pipeline
    stages over `context` sequence shards (beyond what `resolve` asks of the device, dtype and head_dim):
    its queries, keys and values split alike (a tensor axis that divides the key/value heads), no
    soft-capped scores, no pipeline (JAX 0.10's cuDNN attention cannot be vmapped over stages with a
    segment mask), the sequence whole."""
    return (config.num_kv_heads % tensor == 0 and config.attn_logit_softcapping is None and stage == 1
            and context == 1)


@dataclasses.dataclass(frozen=True)
class Scores:
    """How raw q·k scores become attention logits: scaled, then soft-capped or ALiBi-biased (not both)."""

    scale: float
    softcap: float | None = None
    alibi_slopes: tuple[float, ...] | None = None  # one per query head

    def __post_init__(self):
        if self.softcap is not None and self.alibi_slopes is not None:
            raise ModelConfigError("attention with both soft-capping and ALiBi is not supported")

    def apply(self, s_BKGTS, query_index_T, key_index_S):
        """Scores [B, K, G, T, S] as the softmax sees them (before the mask)."""
        s_BKGTS = s_BKGTS * self.scale
        if self.softcap is not None:
            s_BKGTS = self.softcap * jnp.tanh(s_BKGTS / self.softcap)
        if self.alibi_slopes is not None:
            s_BKGTS = s_BKGTS + self.alibi_bias(query_index_T, key_index_S, s_BKGTS.shape[1])
        return s_BKGTS

    def alibi_bias(self, query_index_T, key_index_S, num_kv_heads: int):
        """slope · (key position - query position), [K, G, T, S] (query head n = k · G + g)."""
        slopes_KG = np.asarray(self.alibi_slopes, np.float32).reshape(num_kv_heads, -1)
        distance_TS = (key_index_S[None, :] - query_index_T[:, None]).astype(jnp.float32)
        return slopes_KG[:, :, None, None] * distance_TS

    def capped_slope(self, s):
        """d(capped score)/d(scaled score) at capped scores `s` (1 without soft-capping)."""
        return 1.0 if self.softcap is None else 1.0 - (s / self.softcap) ** 2


def alibi_slopes(num_heads: int) -> tuple[float, ...]:
    """ALiBi slopes per head, as Baichuan (and BLOOM) compute them: 2^(-8/n) powers, interleaved off powers of 2."""
    def powers(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return tuple(powers(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    return tuple(powers(closest) + list(alibi_slopes(2 * closest))[0::2][: num_heads - closest])


def attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, *, implementation: str, block_size: int = 128,
              scale: float | None = None, softcap: float | None = None, window=None, alibi_slopes=None):
    """Causal attention of queries [B, T, N, H] over grouped keys/values [B, T, K, H] → [B, T, N, H].

    `segment_ids_BT` None means one document per row. cuDNN takes segments as a [B, 1, T, T] mask.
    The output (and the blockwise log-sum-exp) is named "attention" / "attention_lse" for remat.
    `scale` (default head_dim^-1/2), `softcap`, `window` and `alibi_slopes` are the family variants.
    """
    implementation = resolve(implementation, q_BTNH.dtype, q_BTNH.shape[-1])
    scores = Scores(q_BTNH.shape[-1] ** -0.5 if scale is None else scale, softcap,
                    None if alibi_slopes is None else tuple(alibi_slopes))
    if implementation == "cudnn" and softcap is not None:
        implementation = "blockwise"  # cuDNN cannot soft-cap scores
    context_axis = mesh_axis("length", q_BTNH.shape[1])
    if context_axis is not None:  # the sequence is split over devices: blockwise over gathered keys and values
        return context_lib.context_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, mesh=active_mesh(),
                                             axis=context_axis, block_size=block_size, scores=scores, window=window)
    if implementation == "blockwise":
        if segment_ids_BT is None:
            segment_ids_BT = jnp.zeros(q_BTNH.shape[:2], jnp.int32)
        return blockwise_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, block_size=block_size, scores=scores,
                                   window=window)
    if softcap is not None:  # xla: scores written out, as jax.nn.dot_product_attention would
        return checkpoint_name(_softcapped(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, scores, window), "attention")
    length = q_BTNH.shape[1]
    index_T = jnp.arange(length)
    mask_B1TT = None
    if segment_ids_BT is not None:
        mask_B1TT = segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :]
    if window is not None:
        in_window_11TT = (index_T[:, None] - index_T[None, :] < window)[None, None]
        mask_B1TT = in_window_11TT if mask_B1TT is None else mask_B1TT & in_window_11TT
    bias_1NTT = None
    if scores.alibi_slopes is not None:
        num_heads = q_BTNH.shape[2]
        bias_1NTT = scores.alibi_bias(index_T, index_T, num_heads).reshape(1, num_heads, length, length)
        bias_1NTT = bias_1NTT.astype(q_BTNH.dtype)
    out_BTNH = jax.nn.dot_product_attention(
        q_BTNH, k_BTKH, v_BTKH, bias=bias_1NTT, mask=mask_B1TT, scale=scores.scale, is_causal=True,
        implementation=implementation,
    )
    return checkpoint_name(out_BTNH, "attention")


def _softcapped(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, scores: Scores, window):
    """Attention with whole [T, T] soft-capped scores (the "xla" implementation of Gemma 2)."""
    b, length, n, h = q_BTNH.shape
    segments_BT = jnp.zeros((b, length), jnp.int32) if segment_ids_BT is None else segment_ids_BT
    q_BKGTH = grouped(q_BTNH, k_BTKH.shape[2])
    s_BKGTS, visible = _scores(q_BKGTH, k_BTKH, segments_BT, segments_BT, 0, 0, scores, window)
    p_BKGTS = jax.nn.softmax(jnp.where(visible, s_BKGTS, _MASKED), axis=-1)
    out_BKGTH = jnp.einsum("bkgts,bskh->bkgth", p_BKGTS.astype(v_BTKH.dtype), v_BTKH)
    return jnp.moveaxis(out_BKGTH, 3, 1).reshape(b, length, n, h)


def blockwise_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, *, block_size: int = 128, scores: Scores | None = None,
                        window=None):
    """Causal attention by blocks of `block_size` queries and keys; lengths not divisible by it are padded.

    Only the pairs (query block i, key block j ≤ i) are computed: the blocks above the diagonal,
    which the causal mask hides completely, are skipped forward and backward (about half the work
    at long sequences). `scores` (default: scale head_dim^-1/2 only) and `window` (a sliding window,
    or None) as in `attention`."""
    batch, length, num_heads, head_dim = q_BTNH.shape
    num_kv_heads = k_BTKH.shape[2]
    block = min(block_size, length)
    padded = -(-length // block) * block
    pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    q_BSNH, k_BSKH, v_BSKH = jnp.pad(q_BTNH, pad), jnp.pad(k_BTKH, pad), jnp.pad(v_BTKH, pad)
    segments_BS = jnp.pad(segment_ids_BT, ((0, 0), (0, padded - length)), constant_values=-1)
    q_BKGSH = grouped(q_BSNH, num_kv_heads)
    scores = Scores(head_dim**-0.5) if scores is None else scores
    out_BKGSH = blockwise_core(q_BKGSH, k_BSKH, v_BSKH, segments_BS, segments_BS, causal_pairs(padded // block),
                               window=window, block=block, scores=scores)
    out_BSNH = jnp.moveaxis(out_BKGSH, 3, 1).reshape(batch, padded, num_heads, head_dim)
    return out_BSNH[:, :length]


def blockwise_core(q_BKGSH, k_BSKH, v_BSKH, query_segments_BS, key_segments_BS, pairs, *, window, block: int,
                   scores: Scores):
    """The blockwise kernel on grouped queries [B, K, G, Sq, H] and keys/values [B, Sk, K, H] (both
    multiples of `block`): only the block `pairs` are computed, each (query block, its place in the
    sequence, key block, its place) as four int32 [P] arrays (`causal_pairs`; under context parallelism
    the local queries' pairs over the gathered keys, `models/context.py`). The causal mask, windows and
    ALiBi use the places, so any order of blocks gives the same attention as one device."""
    return _blockwise(q_BKGSH, k_BSKH, v_BSKH, query_segments_BS, key_segments_BS, window, pairs, block, scores)


def grouped(q_BTNH, num_kv_heads):
    """Queries [B, T, N, H] → [B, K, G, T, H]: the G query heads that share each of the K key/value heads."""
    b, t, n, h = q_BTNH.shape
    return jnp.moveaxis(q_BTNH.reshape(b, t, num_kv_heads, n // num_kv_heads, h), 1, 3)


def _blocks(x_BS, block):
    """[B, S, ...] → [S/block, B, block, ...]: block i is `x[i]`."""
    return jnp.moveaxis(x_BS.reshape(x_BS.shape[0], -1, block, *x_BS.shape[2:]), 1, 0)


def _unblocks(x_nBb):
    x = jnp.moveaxis(x_nBb, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _query_blocks(x_BKGS, block):
    """[B, K, G, S, ...] → [S/block, B, K, G, block, ...]."""
    b, k, g, s = x_BKGS.shape[:4]
    return jnp.moveaxis(x_BKGS.reshape(b, k, g, s // block, block, *x_BKGS.shape[4:]), 3, 0)


def _query_unblocks(x_nBKGb):
    x = jnp.moveaxis(x_nBKGb, 0, 3)
    return x.reshape(*x.shape[:3], -1, *x.shape[5:])


def causal_pairs(num_blocks: int):
    """The visible pairs of `blockwise_core` in a sequence of `num_blocks` blocks in order: every key
    block at or before its query block, row by row."""
    i, j = np.tril_indices(num_blocks)
    return tuple(jnp.asarray(x, jnp.int32) for x in (i, i, j, j))


def _at(x_n, i):
    return jax.lax.dynamic_index_in_dim(x_n, i, keepdims=False)


def _put(x_n, value, i):
    return jax.lax.dynamic_update_index_in_dim(x_n, value, i, 0)


def _scores(q_BKGbH, k_BbKH, query_segments_Bb, key_segments_Bb, query_start, key_start, scores: Scores,
            window=None):
    """Scores [B, K, G, b, b] of one query block over one key block (scaled, capped, biased), and where
    they are visible."""
    s_BKGqk = jnp.einsum("bkgqh,bskh->bkgqs", q_BKGbH, k_BbKH, preferred_element_type=jnp.float32)
    query_index_q = query_start + jnp.arange(q_BKGbH.shape[3])
    key_index_k = key_start + jnp.arange(k_BbKH.shape[1])
    s_BKGqk = scores.apply(s_BKGqk, query_index_q, key_index_k)
    causal_qk = query_index_q[:, None] >= key_index_k[None, :]
    if window is not None:
        causal_qk = causal_qk & (query_index_q[:, None] - key_index_k[None, :] < window)
    same_segment_Bqk = query_segments_Bb[:, :, None] == key_segments_Bb[:, None, :]
    visible_B11qk = (causal_qk & same_segment_Bqk)[:, None, None]
    return s_BKGqk, visible_B11qk


def _forward(q_BKGSH, k_BSKH, v_BSKH, query_segments_BS, key_segments_BS, window, pairs, block, scores):
    """Online softmax over the visible blocks → output [B, K, G, S, H] (q's dtype) and log-sum-exp [B, K, G, S]."""
    q_nBKGbH, k_nBbKH, v_nBbKH = _query_blocks(q_BKGSH, block), _blocks(k_BSKH, block), _blocks(v_BSKH, block)
    query_segments_nBb, key_segments_nBb = _blocks(query_segments_BS, block), _blocks(key_segments_BS, block)

    def step(carry, pair):
        m_nBKGb, l_nBKGb, acc_nBKGbH = carry
        i, query_place, j, key_place = pair
        v_BbKH = _at(v_nBbKH, j)
        s_BKGqk, visible = _scores(_at(q_nBKGbH, i), _at(k_nBbKH, j), _at(query_segments_nBb, i),
                                   _at(key_segments_nBb, j), query_place * block, key_place * block, scores, window)
        s_BKGqk = jnp.where(visible, s_BKGqk, _MASKED)
        m_BKGb = _at(m_nBKGb, i)
        m_new = jnp.maximum(m_BKGb, s_BKGqk.max(-1))
        p_BKGqk = jnp.where(visible, jnp.exp(s_BKGqk - m_new[..., None]), 0.0)
        alpha = jnp.exp(m_BKGb - m_new)
        l_new = alpha * _at(l_nBKGb, i) + p_BKGqk.sum(-1)
        pv = jnp.einsum("bkgqs,bskh->bkgqh", p_BKGqk.astype(v_BbKH.dtype), v_BbKH, preferred_element_type=jnp.float32)
        acc_new = alpha[..., None] * _at(acc_nBKGbH, i) + pv
        return (_put(m_nBKGb, m_new, i), _put(l_nBKGb, l_new, i), _put(acc_nBKGbH, acc_new, i)), None

    shape = q_nBKGbH.shape[:-1]
    init = (jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(q_nBKGbH.shape, jnp.float32))
    (m_nBKGb, l_nBKGb, acc_nBKGbH), _ = jax.lax.scan(step, init, pairs)
    out_BKGSH = _query_unblocks(acc_nBKGbH / l_nBKGb[..., None]).astype(q_BKGSH.dtype)
    return out_BKGSH, _query_unblocks(m_nBKGb + jnp.log(l_nBKGb))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _blockwise(q_BKGSH, k_BSKH, v_BSKH, query_segments_BS, key_segments_BS, window, pairs, block, scores):
    return _forward(q_BKGSH, k_BSKH, v_BSKH, query_segments_BS, key_segments_BS, window, pairs, block, scores)[0]


def _blockwise_fwd(q_BKGSH, k_BSKH, v_BSKH, query_segments_BS, key_segments_BS, window, pairs, block, scores):
    out_BKGSH, lse_BKGS = _forward(q_BKGSH, k_BSKH, v_BSKH, query_segments_BS, key_segments_BS, window, pairs, block,
                                   scores)
    out_BKGSH, lse_BKGS = checkpoint_name(out_BKGSH, "attention"), checkpoint_name(lse_BKGS, "attention_lse")
    return out_BKGSH, (q_BKGSH, k_BSKH, v_BSKH, query_segments_BS, key_segments_BS, window, pairs, out_BKGSH,
                       lse_BKGS)


def _blockwise_bwd(block, scores, residuals, dout_BKGSH):
    q_BKGSH, k_BSKH, v_BSKH, query_segments_BS, key_segments_BS, window, pairs, out_BKGSH, lse_BKGS = residuals
    dout_BKGSH = dout_BKGSH.astype(jnp.float32)
    delta_BKGS = (dout_BKGSH * out_BKGSH.astype(jnp.float32)).sum(-1)
    q_nBKGbH = _query_blocks(q_BKGSH.astype(jnp.float32), block)
    k_nBbKH, v_nBbKH = _blocks(k_BSKH.astype(jnp.float32), block), _blocks(v_BSKH.astype(jnp.float32), block)
    dout_nBKGbH, lse_nBKGb, delta_nBKGb = (_query_blocks(x, block) for x in (dout_BKGSH, lse_BKGS, delta_BKGS))
    query_segments_nBb, key_segments_nBb = _blocks(query_segments_BS, block), _blocks(key_segments_BS, block)

    def step(carry, pair):
        dq_nBKGbH, dk_nBbKH, dv_nBbKH = carry
        i, query_place, j, key_place = pair
        q_BKGbH, k_BbKH, v_BbKH, dout_BKGbH = _at(q_nBKGbH, i), _at(k_nBbKH, j), _at(v_nBbKH, j), _at(dout_nBKGbH, i)
        s_BKGqk, visible = _scores(q_BKGbH, k_BbKH, _at(query_segments_nBb, i), _at(key_segments_nBb, j),
                                   query_place * block, key_place * block, scores, window)
        p_BKGqk = jnp.where(visible, jnp.exp(s_BKGqk - _at(lse_nBKGb, i)[..., None]), 0.0)
        dv_BbKH = jnp.einsum("bkgqs,bkgqh->bskh", p_BKGqk, dout_BKGbH)
        dp_BKGqk = jnp.einsum("bkgqh,bskh->bkgqs", dout_BKGbH, v_BbKH)
        ds_BKGqk = p_BKGqk * (dp_BKGqk - _at(delta_nBKGb, i)[..., None]) * scores.capped_slope(s_BKGqk)
        ds_BKGqk = ds_BKGqk * scores.scale
        dq_BKGbH = jnp.einsum("bkgqs,bskh->bkgqh", ds_BKGqk, k_BbKH)
        dk_BbKH = jnp.einsum("bkgqs,bkgqh->bskh", ds_BKGqk, q_BKGbH)
        return (_put(dq_nBKGbH, _at(dq_nBKGbH, i) + dq_BKGbH, i), _put(dk_nBbKH, _at(dk_nBbKH, j) + dk_BbKH, j),
                _put(dv_nBbKH, _at(dv_nBbKH, j) + dv_BbKH, j)), None

    init = (jnp.zeros_like(q_nBKGbH), jnp.zeros_like(k_nBbKH), jnp.zeros_like(v_nBbKH))
    (dq_nBKGbH, dk_nBbKH, dv_nBbKH), _ = jax.lax.scan(step, init, pairs)
    return (_query_unblocks(dq_nBKGbH).astype(q_BKGSH.dtype), _unblocks(dk_nBbKH).astype(k_BSKH.dtype),
            _unblocks(dv_nBbKH).astype(v_BSKH.dtype), None, None, None, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
