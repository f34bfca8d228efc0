"""A grouped matmul that runs only the rows each group has: the experts' MLP of the sorted MoE path.

`jax.lax.ragged_dot` multiplies rows sorted by group, `sizes[g]` rows each, by their group's weight. TPUs
compile it to a grouped kernel; XLA's GPU compiler (jaxlib 0.10, with or without its experimental ragged-dot
flags) runs it as one dense dot over every group, each input copied and masked once per group (E× the FLOPs
and the memory: planner/experts.py's RAGGED_EXPANSION, measured on compile-only H100s), and XLA:CPU likewise.

`Blocks` lays the rows out in blocks of `block` rows, each group's rows padded to whole blocks, so that every
block belongs to one group; `matmul` multiplies each block by its group's weight, one [block, in] × [in, out]
matmul a step of a loop (`lax.fori_loop`) over the blocks the groups fill: the routed rows plus at most one
partial block a group, however many rows the static shapes leave room for (a dropless MoE's buffers are sized
for the worst case). The backward pass is written out (`jax.custom_vjp`): the input's gradient the same loop
on the transposed weights; the weights' gradient summed over each group's blocks in float32 (a dot's own
accumulation) and rounded once. A loop of dynamic length has no autodiff of its own.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

MAX_BLOCK = 512  # rows a block at most (tensor-core tiles are 64–256 rows; larger blocks mean fewer loop steps)
PADDING_SHARE = 4  # a block for every group is at most 1 / PADDING_SHARE of the rows (the padding's worst case)


def block_rows(rows: int, groups: int) -> int:
    """The block size for `rows` rows over `groups` groups: the largest power of two up to MAX_BLOCK with
    groups × block ≤ rows / PADDING_SHARE (the padding's worst case a quarter of the rows), at least 8."""
    fit = max(1, rows // (PADDING_SHARE * groups))
    return max(8, min(MAX_BLOCK, 2 ** int(math.log2(fit))))


def block_count(rows: int, groups: int, block: int) -> int:
    """Blocks enough for any sizes summing to at most `rows`: Σ ceil(s_g / block) ≤ rows // block + groups."""
    return rows // block + groups


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Where each of `rows` rows sorted by group goes in the padded blocks, and each block's group."""

    source_P: jax.Array  # the row each padded position takes (rows: none, a zero row)
    position_R: jax.Array  # the padded position of each row (blocks × block: a row of no group, output 0)
    group_N: jax.Array  # each block's group
    used: jax.Array  # how many blocks the groups fill (the rest are room for the worst case)
    block: int

    @classmethod
    def of(cls, sizes_G: jax.Array, rows: int, expected_rows: int | None = None) -> Blocks:
        """Blocks for `rows` rows sorted by group (`sizes_G` each, summing to at most `rows`), sized for the
        `expected_rows` (default: all) that the groups hold on average."""
        groups = sizes_G.shape[0]
        block = block_rows(expected_rows or rows, groups)
        n = block_count(rows, groups, block)
        sizes_G = sizes_G.astype(jnp.int32)
        blocks_G = -(-sizes_G // block)
        start_G, first_block_G = jnp.cumsum(sizes_G) - sizes_G, jnp.cumsum(blocks_G) - blocks_G
        group_N = jnp.minimum(_passed(jnp.cumsum(blocks_G), n), groups - 1)
        offset_P = jnp.arange(n * block) - (first_block_G * block)[jnp.repeat(group_N, block)]
        in_group_P = offset_P < sizes_G[jnp.repeat(group_N, block)]
        source_P = jnp.where(in_group_P, start_G[jnp.repeat(group_N, block)] + offset_P, rows)
        group_R = _passed(jnp.cumsum(sizes_G), rows)
        in_group_R = group_R < groups
        group_R = jnp.minimum(group_R, groups - 1)
        position_R = jnp.where(in_group_R, first_block_G[group_R] * block + jnp.arange(rows) - start_G[group_R],
                               n * block)
        return cls(source_P, position_R, group_N.astype(jnp.int32), jnp.sum(blocks_G), block)

    @property
    def count(self) -> int:
        return self.group_N.shape[0]

    def pad(self, x_RI: jax.Array) -> jax.Array:
        """The rows in blocks [blocks, block, in], zeros where a group's last block is not full."""
        padded_PI = jnp.take(x_RI, self.source_P, axis=0, mode="fill", fill_value=0)
        return padded_PI.reshape(self.count, self.block, -1)

    def unpad(self, y_NBO: jax.Array) -> jax.Array:
        """The blocks' rows back in the rows' order [rows, out] (0 for a row of no group)."""
        return jnp.take(y_NBO.reshape(-1, y_NBO.shape[-1]), self.position_R, axis=0, mode="fill", fill_value=0)


def _passed(ends_G: jax.Array, n: int) -> jax.Array:
    """For each i < n, how many of the ascending `ends_G` are ≤ i: the group of row (or block) i (a scatter and
    a cumsum: `jnp.searchsorted` does not trace inside a `jax.shard_map` in jax 0.10)."""
    return jnp.cumsum(jnp.zeros(n + 1, jnp.int32).at[jnp.minimum(ends_G, n)].add(1))[:n]


def matmul(x_NBI: jax.Array, w_GIO: jax.Array, blocks: Blocks) -> jax.Array:
    """Each of the first `blocks.used` blocks [block, in] times its group's weight [in, out] → [blocks, block,
    out] in x's dtype (the blocks past them, room the static shapes keep for the worst case, are left 0)."""
    return _matmul(*_vary_alike(x_NBI, w_GIO, blocks.group_N, blocks.used))


def _vary_alike(*arrays):
    """Inside a `jax.shard_map`, each array cast to vary over every manual axis any of them varies over (what
    JAX does for a primitive's operands; the cast's transpose sums the weights' gradient over those axes)."""
    varying = [_varying(a) for a in arrays]
    union = frozenset().union(*varying)
    return tuple(jax.lax.pcast(a, tuple(sorted(union - v)), to="varying") if union - v else a
                 for a, v in zip(arrays, varying))


def _varying(a) -> frozenset:
    aval = jax.typeof(a)
    mat = getattr(aval, "mat", None)  # jax 0.10: aval.mat.varying (aval.vma before it)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


@jax.custom_vjp
def _matmul(x_NBI, w_GIO, group_N, used):
    return _blockwise(x_NBI, w_GIO, group_N, used)


def _blockwise(x_NBI, w_GIO, group_N, used, transpose: bool = False):
    """The blocks' products in a loop of `used` steps, each written into its place in the output."""
    n, block, _ = x_NBI.shape
    width = w_GIO.shape[1 if transpose else 2]

    def one(j, y_NBO):
        w_IO = w_GIO[group_N[j]]
        y_BO = jnp.dot(x_NBI[j], w_IO.T if transpose else w_IO, preferred_element_type=jnp.float32)
        return y_NBO.at[j].set(y_BO.astype(y_NBO.dtype))

    return jax.lax.fori_loop(0, used, one, jnp.zeros_like(x_NBI, shape=(n, block, width)))


def _forward(x_NBI, w_GIO, group_N, used):
    return _blockwise(x_NBI, w_GIO, group_N, used), (x_NBI, w_GIO, group_N, used)


def _backward(residuals, dy_NBO):
    x_NBI, w_GIO, group_N, used = residuals
    dx_NBI = _blockwise(dy_NBO.astype(x_NBI.dtype), w_GIO, group_N, used, transpose=True)

    def accumulate(j, dw_GIO):
        return dw_GIO.at[group_N[j]].add(jnp.dot(x_NBI[j].T, dy_NBO[j], preferred_element_type=jnp.float32))

    dw_GIO = jax.lax.fori_loop(0, used, accumulate, jnp.zeros_like(w_GIO, jnp.float32))
    return dx_NBI, dw_GIO.astype(w_GIO.dtype), None, None


_matmul.defvjp(_forward, _backward)
