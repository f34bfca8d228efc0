"""Causal attention over packed sequences, by one of three implementations.

- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, fused flash attention on NVIDIA GPUs.
- "xla": `jax.nn.dot_product_attention(implementation="xla")` with a full `[length, length]` mask.
- "blockwise": an online softmax over key/value blocks in a `jax.custom_vjp` that keeps only the
  output and its log-sum-exp, so neither pass ever holds a whole `[length, length]` score matrix.
  It is the default off NVIDIA GPUs, so a step compiled on CPU has the memory shape of the GPU step.
- "auto": cuDNN where it can run (NVIDIA GPU, 16-bit compute, head_dim a multiple of 8 up to 128),
  blockwise elsewhere.

A token attends to itself and the earlier tokens of its own segment. Segment 0 (padding) is one
more segment, so padding tokens attend among themselves and stay finite.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from moai_jax.errors import ModelConfigError

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "blockwise")
_MASKED = -1e30


def resolve(implementation: str, dtype, head_dim: int) -> str:
    """The implementation "auto" stands for on this machine (others are returned as they are)."""
    if implementation not in IMPLEMENTATIONS:
        raise ModelConfigError(f"unknown attention {implementation!r}; use one of: {', '.join(IMPLEMENTATIONS)}")
    if implementation != "auto":
        return implementation
    device = jax.devices()[0]
    nvidia = device.platform == "gpu" and "nvidia" in device.device_kind.lower()  # e.g. "NVIDIA H100 80GB HBM3"
    sixteen_bit = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if nvidia and sixteen_bit and head_dim % 8 == 0 and head_dim <= 128 else "blockwise"


def attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, *, implementation: str, block_size: int = 128):
    """Causal attention of queries [B, T, N, H] over grouped keys/values [B, T, K, H] → [B, T, N, H].

    `segment_ids_BT` None means one document per row. cuDNN takes segments as a [B, 1, T, T] mask.
    The output (and the blockwise log-sum-exp) is named "attention" / "attention_lse" for remat.
    """
    implementation = resolve(implementation, q_BTNH.dtype, q_BTNH.shape[-1])
    if implementation == "blockwise":
        if segment_ids_BT is None:
            segment_ids_BT = jnp.zeros(q_BTNH.shape[:2], jnp.int32)
        return blockwise_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, block_size=block_size)
    same_segment_B1TT = None
    if segment_ids_BT is not None:
        same_segment_B1TT = segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :]
    out_BTNH = jax.nn.dot_product_attention(
        q_BTNH, k_BTKH, v_BTKH, mask=same_segment_B1TT, is_causal=True, implementation=implementation
    )
    return checkpoint_name(out_BTNH, "attention")


def blockwise_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, *, block_size: int = 128):
    """Causal attention by blocks of `block_size` keys; lengths not divisible by it are padded."""
    _, length, num_heads, head_dim = q_BTNH.shape
    num_kv_heads = k_BTKH.shape[2]
    block = min(block_size, length)
    padded = -(-length // block) * block
    pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    k_BSKH, v_BSKH = jnp.pad(k_BTKH, pad), jnp.pad(v_BTKH, pad)
    key_segments_BS = jnp.pad(segment_ids_BT, ((0, 0), (0, padded - length)), constant_values=-1)
    q_BKGTH = _grouped(q_BTNH, num_kv_heads)
    out_BKGTH = _blockwise(q_BKGTH, k_BSKH, v_BSKH, segment_ids_BT, key_segments_BS, block, head_dim**-0.5)
    return jnp.moveaxis(out_BKGTH, 3, 1).reshape(q_BTNH.shape[0], length, num_heads, head_dim)


def _grouped(q_BTNH, num_kv_heads):
    b, t, n, h = q_BTNH.shape
    return jnp.moveaxis(q_BTNH.reshape(b, t, num_kv_heads, n // num_kv_heads, h), 1, 3)


def _blocks(x_BS, block):
    """[B, S, ...] → [S/block, B, block, ...], the scan's leading axis."""
    return jnp.moveaxis(x_BS.reshape(x_BS.shape[0], -1, block, *x_BS.shape[2:]), 1, 0)


def _unblocks(x_nBb):
    x = jnp.moveaxis(x_nBb, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _scores(q_BKGTH, k_BbKH, query_segments_BT, key_segments_Bb, start, scale):
    """Scaled scores [B, K, G, T, b] of one key block, and where they are visible."""
    s_BKGTb = jnp.einsum("bkgth,bskh->bkgts", q_BKGTH, k_BbKH, preferred_element_type=jnp.float32) * scale
    query_index_T = jnp.arange(q_BKGTH.shape[3])
    key_index_b = start + jnp.arange(k_BbKH.shape[1])
    causal_Tb = query_index_T[:, None] >= key_index_b[None, :]
    same_segment_BTb = query_segments_BT[:, :, None] == key_segments_Bb[:, None, :]
    visible_B11Tb = (causal_Tb & same_segment_BTb)[:, None, None]
    return s_BKGTb, visible_B11Tb


def _forward(q_BKGTH, k_BSKH, v_BSKH, query_segments_BT, key_segments_BS, block, scale):
    """Online softmax over key blocks → output [B, K, G, T, H] (q's dtype) and log-sum-exp [B, K, G, T]."""
    b, k, g, t, h = q_BKGTH.shape

    def step(carry, xs):
        m_BKGT, l_BKGT, acc_BKGTH = carry
        start, k_BbKH, v_BbKH, key_segments_Bb = xs
        s_BKGTb, visible = _scores(q_BKGTH, k_BbKH, query_segments_BT, key_segments_Bb, start, scale)
        s_BKGTb = jnp.where(visible, s_BKGTb, _MASKED)
        m_new = jnp.maximum(m_BKGT, s_BKGTb.max(-1))
        p_BKGTb = jnp.where(visible, jnp.exp(s_BKGTb - m_new[..., None]), 0.0)
        alpha = jnp.exp(m_BKGT - m_new)
        l_new = alpha * l_BKGT + p_BKGTb.sum(-1)
        pv = jnp.einsum("bkgts,bskh->bkgth", p_BKGTb.astype(v_BbKH.dtype), v_BbKH, preferred_element_type=jnp.float32)
        return (m_new, l_new, alpha[..., None] * acc_BKGTH + pv), None

    starts = jnp.arange(0, k_BSKH.shape[1], block)
    xs = (starts, _blocks(k_BSKH, block), _blocks(v_BSKH, block), _blocks(key_segments_BS, block))
    init = (jnp.full((b, k, g, t), _MASKED, jnp.float32), jnp.zeros((b, k, g, t), jnp.float32),
            jnp.zeros((b, k, g, t, h), jnp.float32))
    (m_BKGT, l_BKGT, acc_BKGTH), _ = jax.lax.scan(step, init, xs)
    out_BKGTH = (acc_BKGTH / l_BKGT[..., None]).astype(q_BKGTH.dtype)
    return out_BKGTH, m_BKGT + jnp.log(l_BKGT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _blockwise(q_BKGTH, k_BSKH, v_BSKH, query_segments_BT, key_segments_BS, block, scale):
    return _forward(q_BKGTH, k_BSKH, v_BSKH, query_segments_BT, key_segments_BS, block, scale)[0]


def _blockwise_fwd(q_BKGTH, k_BSKH, v_BSKH, query_segments_BT, key_segments_BS, block, scale):
    out_BKGTH, lse_BKGT = _forward(q_BKGTH, k_BSKH, v_BSKH, query_segments_BT, key_segments_BS, block, scale)
    out_BKGTH, lse_BKGT = checkpoint_name(out_BKGTH, "attention"), checkpoint_name(lse_BKGT, "attention_lse")
    return out_BKGTH, (q_BKGTH, k_BSKH, v_BSKH, query_segments_BT, key_segments_BS, out_BKGTH, lse_BKGT)


def _blockwise_bwd(block, scale, residuals, dout_BKGTH):
    q_BKGTH, k_BSKH, v_BSKH, query_segments_BT, key_segments_BS, out_BKGTH, lse_BKGT = residuals
    dout_BKGTH = dout_BKGTH.astype(jnp.float32)
    q32_BKGTH = q_BKGTH.astype(jnp.float32)
    delta_BKGT = (dout_BKGTH * out_BKGTH.astype(jnp.float32)).sum(-1)

    def step(dq_BKGTH, xs):
        start, k_BbKH, v_BbKH, key_segments_Bb = xs
        k_BbKH, v_BbKH = k_BbKH.astype(jnp.float32), v_BbKH.astype(jnp.float32)
        s_BKGTb, visible = _scores(q32_BKGTH, k_BbKH, query_segments_BT, key_segments_Bb, start, scale)
        p_BKGTb = jnp.where(visible, jnp.exp(s_BKGTb - lse_BKGT[..., None]), 0.0)
        dv_BbKH = jnp.einsum("bkgts,bkgth->bskh", p_BKGTb, dout_BKGTH)
        dp_BKGTb = jnp.einsum("bkgth,bskh->bkgts", dout_BKGTH, v_BbKH)
        ds_BKGTb = p_BKGTb * (dp_BKGTb - delta_BKGT[..., None]) * scale
        dq_BKGTH = dq_BKGTH + jnp.einsum("bkgts,bskh->bkgth", ds_BKGTb, k_BbKH)
        dk_BbKH = jnp.einsum("bkgts,bkgth->bskh", ds_BKGTb, q32_BKGTH)
        return dq_BKGTH, (dk_BbKH, dv_BbKH)

    starts = jnp.arange(0, k_BSKH.shape[1], block)
    xs = (starts, _blocks(k_BSKH, block), _blocks(v_BSKH, block), _blocks(key_segments_BS, block))
    dq_BKGTH, (dk, dv) = jax.lax.scan(step, jnp.zeros(q_BKGTH.shape, jnp.float32), xs)
    return (dq_BKGTH.astype(q_BKGTH.dtype), _unblocks(dk).astype(k_BSKH.dtype), _unblocks(dv).astype(v_BSKH.dtype),
            None, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
