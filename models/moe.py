"""A Mixture-of-Experts MLP: a float32 router picks k experts per token; the experts are gated MLPs.

The router is Mixtral's, Qwen3-MoE's and OLMoE's: float32 logits, softmax, top-k, the k probabilities
renormalised to sum to 1 where the family does (`norm_topk_prob`). Each expert is a SwiGLU MLP
[experts, embed, mlp]; a token's output is the weighted sum of its k experts' outputs. Under LoRA each expert's
projection has its own adapter (A [experts, in, r], B [experts, r, out], split over the experts like the weights).

Three ways to compute it, the same function (up to rounding) when nothing is dropped:
- "dense": every expert on every token, weighted by the router (zero for the experts not chosen).
  E/k times the FLOPs of the routed work, but plain einsums: on XLA:CPU, where `jax.lax.ragged_dot` is
  lowered as a masked dense dot over all groups (k times more still), it is the faster one (measured in
  docs/moe.md), so "auto" picks it on CPU.
- "sorted": the token-expert pairs sorted by expert and run as a grouped matmul, dropless; "auto" picks it on
  GPU and TPU. The grouped matmul is `jax.lax.ragged_dot` on a TPU (its grouped kernel) and in a pipeline's
  stages; elsewhere the blocks of models/grouped_matmul.py, which run only the routed rows (XLA's GPU
  `ragged_dot` is one dense dot over every expert). Under data or fsdp it runs in a `jax.shard_map` over them, on each
  device's own tokens (GSPMD cannot split ragged_dot's rows: it would gather them and run every token everywhere).
- expert parallelism, whenever the active logical sharding splits `experts` over a mesh axis: inside a
  `jax.shard_map` manual over the axes that split the batch (data, fsdp, expert) and a pipeline's stages (the rest
  stays with GSPMD), each device routes its own tokens, sends each pair to the device holding its expert with
  one `all_to_all`, runs its experts on what it received (sorted, as above) and sends the results back with a
  second `all_to_all`. The buffers have static shapes: dropless, each destination has room for every pair a
  device could send it (tokens × min(k, experts per device)). GSPMD alone would all-gather the experts' weights.

With `capacity_factor` an expert takes at most ceil(tokens · k / experts · factor) pairs of a device's
tokens, in token order, and drops the rest (their share of the output is 0); the sorted path and
expert parallelism do this, and count the drops.

Each call also returns the router's statistics per batch row, [B, 1, 2E + 3]: assignments per expert,
router probabilities summed per expert, tokens, summed squared log-sum-exp of the logits (z-loss) and
dropped pairs, over the tokens the mask counts (segment id ≠ 0). They add up over layers, rows,
devices and micro-batches, so `router_losses` computes the load-balancing loss exactly as transformers'
`load_balancing_loss_func` does over all layers and tokens of the batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from moai_jax.errors import ModelConfigError
from moai_jax.models import grouped_matmul
from moai_jax.models.config import ModelConfig
from moai_jax.models.families import ACTIVATIONS
from moai_jax.sharding.annotate import active_mesh, constrain, manual_axes, mesh_axis

IMPLEMENTATIONS = ("auto", "dense", "sorted")
_INIT = nnx.initializers.normal(stddev=0.02)


def resolve(implementation: str, config: ModelConfig, device=None) -> str:
    """The implementation "auto" stands for on `device` (default: this machine's first): dense on CPU, sorted
    elsewhere (and whenever tokens may be dropped: only the sorted path has capacities)."""
    if implementation not in IMPLEMENTATIONS:
        raise ModelConfigError(f"unknown moe_implementation {implementation!r}; "
                               f"use one of: {', '.join(IMPLEMENTATIONS)}")
    if config.capacity_factor is not None:
        return "sorted"
    if implementation != "auto":
        return implementation
    return "dense" if (device or jax.devices()[0]).platform == "cpu" else "sorted"


def stats_width(num_experts: int) -> int:
    return 2 * num_experts + 3


def router_losses(stats_X: jax.Array, config: ModelConfig) -> dict[str, jax.Array]:
    """The batch's router losses from its summed statistics [2E + 3] (all layers, rows and devices).

    router_loss: transformers' load-balancing loss, E · Σ_e (assignments_e / N) · (probability_e / N),
    N the tokens counted times the MoE layers. router_z_loss: mean squared log-sum-exp of the router's
    logits. dropped_fraction: the token-expert pairs dropped by capacity."""
    e = config.num_experts
    counts_E, probs_E = stats_X[:e], stats_X[e:2 * e]
    rows, z, dropped = stats_X[2 * e], stats_X[2 * e + 1], stats_X[2 * e + 2]
    n = jnp.maximum(rows, 1.0)
    return {"router_loss": e * jnp.sum(counts_E / n * probs_E / n), "router_z_loss": z / n,
            "dropped_fraction": dropped / (n * config.num_experts_per_tok)}


def _param(rngs: nnx.Rngs, shape, names, param_dtype) -> nnx.Param:
    return nnx.Param(_INIT(rngs.params(), shape, param_dtype), out_sharding=names, eager_sharding=False)


class MoE(nnx.Module):
    """`moe(x [B, T, E], segment_ids [B, T] or None)` → (y [B, T, E], router statistics [B, 1, 2E + 3])."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        e, h, f = config.num_experts, config.hidden_size, config.expert_size
        self.router = _param(rngs, (h, e), ("embed", None), param_dtype)  # small: never split over experts
        self.gate_proj = _param(rngs, (e, h, f), ("experts", "embed", "mlp"), param_dtype)
        self.up_proj = _param(rngs, (e, h, f), ("experts", "embed", "mlp"), param_dtype)
        self.down_proj = _param(rngs, (e, f, h), ("experts", "mlp", "embed"), param_dtype)
        self.config, self.dtype = config, dtype

    def __call__(self, x_BTD, segment_ids_BT, implementation: str = "auto"):
        c = self.config
        b, t, d = x_BTD.shape
        mask_BT = jnp.ones((b, t), jnp.float32) if segment_ids_BT is None else (segment_ids_BT != 0).astype(jnp.float32)
        weights = self._expert_weights()
        router_DE = self.router[...].astype(jnp.float32)
        mesh, axis = active_mesh(), mesh_axis("experts", c.num_experts)
        shards = mesh.shape[axis] if isinstance(axis, str) else 1
        rows = mesh_axis("batch", b)  # the mesh axes that split the rows (data, fsdp, expert)
        rows = () if rows is None else (rows,) if isinstance(rows, str) else tuple(rows)
        if shards > 1 and axis not in rows and b % shards == 0:
            rows = (axis,)  # rows the batch rule leaves whole over expert: the shard_map splits them
        path = "sorted" if shards > 1 else resolve(implementation, c)
        if rows and (axis in rows if shards > 1 else path == "sorted"):
            # each device routes its own rows: the grouped matmul runs on them alone (GSPMD would gather the rows
            # that data and fsdp split, as it cannot split ragged_dot's rows), the experts' weights gathered over
            # fsdp like any layer's
            def local(x_BTD, mask_BT, router_DE, weights):
                return _routed(x_BTD, mask_BT, router_DE, weights, c, path, axis if shards > 1 else None, shards)

            specs = (P(rows), P(rows), P(), P(axis) if shards > 1 else P())  # tokens, mask, router, the experts
            y_BTD, stats_B1X = jax.shard_map(local, mesh=mesh, axis_names=manual_axes(*rows), in_specs=specs,
                                             out_specs=(P(rows), P(rows)))(x_BTD, mask_BT, router_DE, weights)
        else:
            y_BTD, stats_B1X = _routed(x_BTD, mask_BT, router_DE, weights, c, resolve(implementation, c), None, 1)
        return constrain(y_BTD, ("batch", "length", "embed")), stats_B1X

    def _expert_weights(self) -> tuple[tuple, ...]:
        """Gate, up and down as (weight,) or, with a LoRA adapter (models/lora.py), (weight, A, scale · B), each
        with the experts in front: [experts, in, out], [experts, in, rank], [experts, rank, out]."""
        projections = []
        for weight, projection in ((self.gate_proj, "gate"), (self.up_proj, "up"), (self.down_proj, "down")):
            adapter, w = getattr(self, f"lora_{projection}", None), weight[...].astype(self.dtype)
            if adapter is None:
                projections.append((w,))
            else:
                scale = jnp.asarray(adapter.scale, self.dtype)
                projections.append((w, adapter.a[...].astype(self.dtype), adapter.b[...].astype(self.dtype) * scale))
        return tuple(projections)


def _routed(x_BTD, mask_BT, router_DE, weights, c: ModelConfig, implementation: str, axis, shards: int):
    """One device's (or the whole batch's) tokens through router and experts → (y, statistics per row)."""
    b, t, d = x_BTD.shape
    x_TD, mask_T = x_BTD.reshape(b * t, d), mask_BT.reshape(-1)
    logits_TE = jnp.dot(x_TD.astype(jnp.float32), router_DE)
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    top_TK, experts_TK = jax.lax.top_k(probs_TE, c.num_experts_per_tok)
    weights_TK = top_TK / jnp.sum(top_TK, -1, keepdims=True) if c.norm_topk_prob else top_TK
    activation = ACTIVATIONS[c.hidden_act]
    if implementation == "dense":
        y_TD, dropped_T = _every_expert(x_TD, weights_TK, experts_TK, weights, activation), jnp.zeros_like(mask_T)
    else:
        y_TD, dropped_T = _dispatched(x_TD, weights_TK, experts_TK, weights, activation, c, axis, shards)
    counts_TE = jnp.sum(jax.nn.one_hot(experts_TK, c.num_experts, dtype=jnp.float32), axis=1)
    z_T = jax.nn.logsumexp(logits_TE, axis=-1) ** 2
    stats_TX = jnp.concatenate([counts_TE, probs_TE, jnp.ones_like(z_T)[:, None], z_T[:, None], dropped_T[:, None]],
                               axis=-1) * mask_T[:, None]
    return y_TD.reshape(b, t, d), jnp.sum(stats_TX.reshape(b, t, -1), axis=1, keepdims=True)


def _every_expert(x_TD, weights_TK, experts_TK, weights, activation):
    """Every expert on every token, weighted by the router's (renormalised) top-k probabilities."""
    gate, up, down = weights
    t = x_TD.shape[0]
    gate_TE = jnp.zeros((t, gate[0].shape[0]), jnp.float32).at[jnp.arange(t)[:, None], experts_TK].add(weights_TK)
    h_ETF = activation(_each_expert(x_TD, gate, "td")) * _each_expert(x_TD, up, "td")
    y_ETD = _each_expert(h_ETF, down, "etf")
    return jnp.einsum("te,etd->td", gate_TE.astype(x_TD.dtype), y_ETD)


def _each_expert(x, projection, x_axes: str):
    """A projection (weight[, A, B]) of every expert on `x`: the tokens ("td") or each expert's own rows ("etf")."""
    contract = x_axes[-1]
    y_ETO = jnp.einsum(f"{x_axes},e{contract}o->eto", x, projection[0])
    if len(projection) == 3:
        xa_ETR = jnp.einsum(f"{x_axes},e{contract}r->etr", x, projection[1])
        y_ETO = y_ETO + jnp.einsum("etr,ero->eto", xa_ETR, projection[2])
    return y_ETO


def _exclusive_cumsum(counts):
    return jnp.cumsum(counts) - counts


def _dispatched(x_TD, weights_TK, experts_TK, weights, activation, c: ModelConfig, axis, shards: int):
    """Token-expert pairs sorted by expert, sent to the experts' devices (`shards` along mesh `axis`; 1: this
    device), run there as grouped matmuls and sent back → (y [T, D], dropped pairs per token [T])."""
    t, d = x_TD.shape
    k, experts = c.num_experts_per_tok, c.num_experts
    local_experts = experts // shards
    flat_A = experts_TK.reshape(-1)
    order_A = jnp.argsort(flat_A, stable=True)  # by expert, then token: the pairs each device receives in order
    expert_A, token_A, weight_A = flat_A[order_A], order_A // k, weights_TK.reshape(-1)[order_A]
    rank_A = jnp.arange(t * k) - _exclusive_cumsum(jnp.bincount(expert_A, length=experts))[expert_A]
    dest_A, local_A = expert_A // local_experts, expert_A % local_experts
    if c.capacity_factor is None:  # dropless: room for every pair this device could send to one device
        room = t * min(k, local_experts)
        slot_A = jnp.arange(t * k) - _exclusive_cumsum(jnp.bincount(dest_A, length=shards))[dest_A]
        keep_A = jnp.ones(t * k, bool)
    else:
        capacity = max(1, math.ceil(t * k / experts * c.capacity_factor))
        room = local_experts * capacity
        keep_A = rank_A < capacity
        slot_A = jnp.where(keep_A, local_A * capacity + rank_A, room)  # out of range: dropped by the scatter
    send_SRD = jnp.zeros((shards, room, d), x_TD.dtype).at[dest_A, slot_A].set(x_TD[token_A], mode="drop")
    send_expert_SR = jnp.full((shards, room), local_experts, jnp.int32).at[dest_A, slot_A].set(local_A, mode="drop")
    if shards > 1:
        send_SRD = jax.lax.all_to_all(send_SRD, axis, 0, 0, tiled=True)
        send_expert_SR = jax.lax.all_to_all(send_expert_SR, axis, 0, 0, tiled=True)
    # the rows received: room for the worst case, t · k on average (every device sends t · k pairs)
    y_SRD = _grouped_experts(send_SRD.reshape(-1, d), send_expert_SR.reshape(-1), weights, activation,
                             t * k).reshape(shards, room, d)
    if shards > 1:
        y_SRD = jax.lax.all_to_all(y_SRD, axis, 0, 0, tiled=True)
    y_AD = jnp.where(keep_A[:, None], y_SRD[dest_A, jnp.minimum(slot_A, room - 1)], 0)
    y_TD = jnp.zeros_like(x_TD).at[token_A].add(y_AD * weight_A[:, None].astype(x_TD.dtype))
    dropped_T = jnp.zeros(t, jnp.float32).at[token_A].add(1.0 - keep_A.astype(jnp.float32))
    return y_TD, dropped_T


def _grouped_experts(rows_RD, expert_R, weights, activation, expected_rows: int | None = None):
    """Each row through its expert's MLP (expert id = number of experts: an empty row, output 0): on a TPU as
    `ragged_dot`s (its grouped kernel), elsewhere in blocks of one expert's rows (models/grouped_matmul.py), but
    for a pipeline's stages (a vmap over the stage axis around this shard_map), where jax 0.10 cannot
    differentiate a scan's weights ("Expected cotangent type ... {V:expert} but got ... {V:(stage,expert)}")."""
    gate, up, down = weights
    experts = gate[0].shape[0]
    order_R = jnp.argsort(expert_R, stable=True)
    sizes_E = jnp.bincount(expert_R, length=experts + 1)[:experts].astype(jnp.int32)
    x_RD = rows_RD[order_R]
    if _platform() == "tpu" or manual_axes():  # manual_axes(): the axes an enclosing vmap maps over
        def times(x, w):
            return jax.lax.ragged_dot(x, w, sizes_E)
        h_RF = activation(_projected(x_RD, gate, times)) * _projected(x_RD, up, times)
        y_RD = _projected(h_RF, down, times)
    else:
        blocks = grouped_matmul.Blocks.of(sizes_E, x_RD.shape[0], expected_rows)

        def times(x, w):
            return grouped_matmul.matmul(x, w, blocks)
        x_NBD = blocks.pad(x_RD)
        h_NBF = activation(_projected(x_NBD, gate, times)) * _projected(x_NBD, up, times)
        y_RD = blocks.unpad(_projected(h_NBF, down, times))
    return jnp.zeros_like(y_RD).at[order_R].set(y_RD)


def _platform() -> str:
    mesh = active_mesh()
    return (jax.devices()[0] if mesh is None else mesh.devices.flat[0]).platform


def _projected(x, projection, times):
    """A projection (weight[, A, B]) of rows sorted by expert, `times(x, w)` the grouped matmul."""
    y = times(x, projection[0])
    if len(projection) == 3:
        y = y + times(times(x, projection[1]), projection[2])
    return y
