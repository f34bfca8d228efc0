"""Context parallelism: each sequence split over the `context` mesh axis, balanced for the causal mask.

The layout (MaxText's dual-chunk swap, torchtitan's head-tail load balancing): a sequence of length
T is cut into 2 × cp chunks and device d of the context axis holds chunks d and 2cp − 1 − d, so under
the causal mask every device scores the same number of query-key pairs (an early chunk sees few keys,
its partner from the end many). The Trainer reorders each batch once, at its input (`balanced_batch`):
every [batch, length] array, positions included (0 … T − 1 when the batch has none), so rotary
positions, segment ids and labels stay with their tokens; the loss is a sum over tokens, which their
order does not change. Per-token work (projections, MLP, norms, loss) then needs no communication.

Attention (`context_attention`): the queries stay on their device; keys, values and segment ids are
all-gathered over `context` inside a `jax.shard_map` manual over that axis only (cheap under grouped-
query attention, whose key/value heads are few), and the blockwise kernel computes only the (query
block, key block) pairs the causal mask leaves visible, each at its place in the original sequence,
so the result is one device's attention exactly. In backward the gather's transpose reduce-scatters
the keys' and values' gradients back to their devices.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from moai_jax.models import attention as attention_lib
from moai_jax.sharding.annotate import manual_axes


def balanced_order(length: int, cp: int) -> np.ndarray:
    """The positions of a sequence in the order the context axis holds them: chunk d, then chunk
    2cp − 1 − d, for d = 0 … cp − 1 (2 × cp must divide `length`)."""
    chunks = np.arange(length).reshape(2 * cp, -1)
    return np.concatenate([np.concatenate([chunks[d], chunks[2 * cp - 1 - d]]) for d in range(cp)])


def balanced_batch(batch: Mapping[str, np.ndarray], cp: int) -> dict[str, np.ndarray]:
    """A batch of [rows, length] arrays reordered for `cp` devices along the sequence, with the positions
    (0 … length − 1 when it had none) reordered alongside."""
    batch = dict(batch)
    rows, length = np.shape(batch["input_ids"])
    batch.setdefault("positions", np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)))
    order = balanced_order(length, cp)
    return {k: np.asarray(v)[:, order] if np.ndim(v) == 2 and np.shape(v)[1] == length else v
            for k, v in batch.items()}


def _places(length: int, cp: int, block: int) -> np.ndarray:
    """[cp, blocks per device]: where each device's blocks sit in the original sequence, in blocks."""
    per_chunk = length // (2 * cp) // block
    return balanced_order(length // block, cp).reshape(cp, 2 * per_chunk) if per_chunk else np.zeros((cp, 0), int)


def local_pairs(length: int, cp: int, block: int) -> np.ndarray:
    """int32 [cp, 4, P]: device d's visible pairs (local query block, its place, gathered key block, its
    place) for `attention.blockwise_core`. The balanced layout gives every device the same P."""
    places_DN = _places(length, cp, block)
    key_places = places_DN.reshape(-1)  # the gathered keys are the devices' blocks one after another
    by_place = np.argsort(key_places, kind="stable")
    tables = []
    for places in places_DN:
        i, k = np.nonzero(key_places[by_place][None, :] <= places[:, None])  # row by row, keys in order
        j = by_place[k]
        tables.append(np.stack([i, places[i], j, key_places[j]]).astype(np.int32))
    assert len({t.shape for t in tables}) == 1, "the balanced layout gives every device the same work"
    return np.stack(tables)


def chunk_block(length: int, cp: int, block_size: int) -> int:
    """The attention block under context parallelism: the largest divisor of one chunk up to `block_size`."""
    chunk = length // (2 * cp)
    return max(b for b in range(1, min(block_size, chunk) + 1) if chunk % b == 0)


def context_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, *, mesh: Mesh, axis: str, block_size: int,
                      scores: attention_lib.Scores, window=None):
    """Causal attention of length-sharded, balanced queries [B, T, N, H] over keys/values [B, T, K, H]
    gathered over the mesh's `axis` → [B, T, N, H], sharded as the queries are."""
    batch, length, num_heads, head_dim = q_BTNH.shape
    cp = mesh.shape[axis]
    block = chunk_block(length, cp, block_size)
    table = local_pairs(length, cp, block)
    if segment_ids_BT is None:
        segment_ids_BT = jnp.zeros((batch, length), jnp.int32)

    # Backward gathers the keys and values again rather than keeping every layer's gathered copy:
    # of the attention, only its output and log-sum-exp are kept (models/attention.py names them).
    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.save_only_these_names(
        "attention", "attention_lse"), prevent_cse=False)
    def local(q_BtNH, k_BtKH, v_BtKH, segments_Bt):
        gather = lambda x: _gathered(x, axis)  # noqa: E731
        pairs = tuple(jnp.asarray(table)[jax.lax.axis_index(axis)])
        q_BKGtH = attention_lib.grouped(q_BtNH, k_BtKH.shape[2])
        key_segments_BT = jax.lax.all_gather(segments_Bt, axis, axis=1, tiled=True)
        out_BKGtH = attention_lib.blockwise_core(q_BKGtH, gather(k_BtKH), gather(v_BtKH), segments_Bt,
                                                 key_segments_BT, pairs, window=window, block=block,
                                                 scores=scores)
        return jnp.moveaxis(out_BKGtH, 3, 1).reshape(q_BtNH.shape)

    along = PartitionSpec(None, axis)
    return jax.shard_map(local, mesh=mesh, axis_names=manual_axes(axis), in_specs=(along,) * 4, out_specs=along,
                         check_vma=False)(
        q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gathered(x_BtKH, axis: str):
    """[B, T / cp, ...] → [B, T, ...], all-gathered over `axis`; in backward the gradient is reduce-scattered
    in float32 (more exact, and XLA:CPU cannot reduce-scatter bfloat16)."""
    return jax.lax.all_gather(x_BtKH, axis, axis=1, tiled=True)


def _gathered_fwd(x_BtKH, axis):
    return _gathered(x_BtKH, axis), None


def _gathered_bwd(axis, _, grad_BTKH):
    summed = jax.lax.psum_scatter(grad_BTKH.astype(jnp.float32), axis, scatter_dimension=1, tiled=True)
    return (summed.astype(grad_BTKH.dtype),)


_gathered.defvjp(_gathered_fwd, _gathered_bwd)
