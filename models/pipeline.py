"""Pipeline parallelism (GPipe) inside one jitted step: stacked layers as stages, micro-batches flowing.

The layers, stacked along their leading `layers` axis, are split into `stages` consecutive groups:
[layers, ...] → [stages, layers / stages, ...], the stage axis keeping the `layers` axis's sharding
(over the mesh's `stage` axis). The batch is split into micro-batches (micro-batch m takes rows m,
m + M, ..., as the train step's gradient accumulation does, so every device keeps its rows). One
`lax.scan` runs micro_batches + stages − 1 ticks; each tick runs every stage at once on the
micro-batch it holds (a `vmap` whose mapped axis is the mesh's stage axis) and shifts the outputs one
stage on (`jnp.roll`, which XLA turns into a collective-permute). Stage 0 takes micro-batch t at tick
t; the last stage finishes micro-batch t − (stages − 1). Backward is autodiff of the scan.

With `remat_stage` a tick keeps for backward only each stage's input and recomputes the stage from it
(its layers keep their own remat inside), so the micro-batches in flight cost one activation each per
stage instead of one per layer: GPipe's memory, at the price of one more forward pass.

The result is the same function of the same parameters as the plain layer scan: only the order of
the work changes. Nothing here names a mesh: the stage axis is whatever the active logical sharding
maps `layers` to (none outside a sharded step, where the stages simply run one after another).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from moai_jax.errors import ModelConfigError
from moai_jax.sharding.annotate import constrain, mapped_over, mesh_axis


def check_pipeline(num_layers: int, batch: int, stages: int, micro_batches: int) -> None:
    """A ModelConfigError saying what to change when the layers or the batch cannot be split so."""
    if stages < 1 or num_layers % stages:
        raise ModelConfigError(f"{stages} pipeline stages do not divide the model's {num_layers} layers; "
                               f"choose stages that divide {num_layers}")
    if micro_batches < 1 or batch % micro_batches:
        raise ModelConfigError(f"{micro_batches} micro-batches do not divide the batch of {batch} rows; "
                               f"choose micro-batches that divide {batch}")


def split_micro_batches(x, micro_batches: int):
    """[B, ...] → [M, B/M, ...], micro-batch m taking rows m, m + M, ... (every device keeps its rows)."""
    return x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)


def merge_micro_batches(x):
    """The inverse of split_micro_batches: [M, B/M, ...] → [B, ...]."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def pipelined_layers(layer: Callable[..., jax.Array], layer_state: Any, x_BTE: jax.Array, extras: tuple, *,
                     stages: int, micro_batches: int, remat_stage: bool = False) -> jax.Array:
    """`layer(x, state, *extras)` applied for every layer of `layer_state` (stacked along axis 0), as a
    pipeline of `stages` stages over `micro_batches` micro-batches. `extras` are per-row inputs
    ([B, ...] arrays or None, e.g. rotary tables and segment ids) that go with each micro-batch. `x_BTE` may
    be a tuple of per-row arrays (a Mixture-of-Experts model carries its router's statistics [B, 1, X] too)."""
    num_layers = jax.tree.leaves(layer_state)[0].shape[0]
    check_pipeline(num_layers, jax.tree.leaves(x_BTE)[0].shape[0], stages, micro_batches)
    tree = jax.tree.map
    S, M = stages, micro_batches

    # [layers, ...] → [stages, layers / stages, ...]: the stage axis keeps the layers' sharding over `stage`
    stage_state = jax.tree.map(lambda w: w.reshape(S, num_layers // S, *w.shape[1:]), layer_state)
    inputs_MBTE = tree(lambda a: split_micro_batches(a, M), x_BTE)
    extras_M = jax.tree.map(lambda a: split_micro_batches(a, M), extras)

    def on_stages(a):  # the leading axis of a per-stage array lies along the stage mesh axis
        return constrain(a, ("layers",) + ("batch", "length") + (None,) * (a.ndim - 3))

    def run_stage(state, x_BTE, extras):
        y_BTE, _ = jax.lax.scan(lambda x, st: (layer(x, st, *extras), None), x_BTE, state)
        return y_BTE

    if remat_stage:
        run_stage = jax.checkpoint(run_stage, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    stage_axis = mesh_axis("layers", S)
    all_stages = jax.vmap(run_stage, spmd_axis_name=stage_axis)

    def tick(carry, t):
        held_SBTE, outputs_MBTE = carry
        # Stage 0 takes micro-batch t (past the last one it repeats it: those results are never kept).
        held_SBTE = tree(lambda h, i: on_stages(h.at[0].set(i[jnp.minimum(t, M - 1)])), held_SBTE, inputs_MBTE)
        which_S = jnp.clip(t - jnp.arange(S), 0, M - 1)  # the micro-batch each stage holds
        extras_S = jax.tree.map(lambda a: on_stages(a[which_S]), extras_M)
        with mapped_over(stage_axis):  # a shard_map in a layer (context parallelism) is manual over stages too
            y_SBTE = tree(on_stages, all_stages(stage_state, held_SBTE, extras_S))
        # The last stage's output is micro-batch t − (S − 1); before it is real, index 0 is overwritten later.
        outputs_MBTE = tree(lambda o, y: jax.lax.dynamic_update_index_in_dim(o, y[S - 1], jnp.maximum(t - (S - 1), 0),
                                                                             0), outputs_MBTE, y_SBTE)
        return (tree(lambda y: jnp.roll(y, 1, axis=0), y_SBTE), outputs_MBTE), None

    held_SBTE = tree(lambda i: on_stages(jnp.zeros((S, *i.shape[1:]), i.dtype)), inputs_MBTE)
    (_, outputs_MBTE), _ = jax.lax.scan(tick, (held_SBTE, tree(jnp.zeros_like, inputs_MBTE)), jnp.arange(M + S - 1))
    return tree(merge_micro_batches, outputs_MBTE)
