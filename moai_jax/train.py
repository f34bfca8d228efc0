"""The training state and the one train step: masked loss, micro-batch accumulation, optimizer update.

Pure functions of arrays. The step is jitted once by the Trainer with the plan's shardings and its
state donated; here nothing knows about devices. The loss is the mean cross-entropy over the real
(label != -100) tokens of the whole global batch, so splitting the batch over devices or into
micro-batches does not change it.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

IGNORE = -100
LOSS_CHUNK = 512  # sequence positions per logits chunk under a plan's chunked loss
BATCH_KEYS = ("input_ids", "labels", "segment_ids", "positions")


@struct.dataclass
class TrainState:
    params: Any  # pure dict of arrays, the model's nnx.Param values
    opt_state: Any
    step: jax.Array


def cross_entropy_sum(model: nnx.Module, batch: dict[str, jax.Array], loss_chunk: int | None = None) -> jax.Array:
    """Sum of token cross-entropies over labels != -100. With `loss_chunk`, logits exist only
    (a divisor of the length up to) `loss_chunk` positions at a time (recomputed in backward), never `[tokens, vocab]` at once."""
    hidden_BLE = model.hidden_states(batch["input_ids"], segment_ids=batch.get("segment_ids"),
                                     positions=batch.get("positions"))
    labels_BL = batch["labels"]

    def chunk_sum(h_BCE, y_BC):
        logits_BCV = model.logits(h_BCE).astype(jnp.float32)
        mask_BC = y_BC != IGNORE
        ce_BC = optax.softmax_cross_entropy_with_integer_labels(logits_BCV, jnp.where(mask_BC, y_BC, 0))
        return jnp.sum(jnp.where(mask_BC, ce_BC, 0.0))

    length = labels_BL.shape[1]
    if not loss_chunk or loss_chunk >= length:
        return chunk_sum(hidden_BLE, labels_BL)
    loss_chunk = math.gcd(length, loss_chunk)  # the largest chunk up to loss_chunk that divides the length
    n = length // loss_chunk
    b, _, e = hidden_BLE.shape
    h_NBCE = hidden_BLE.reshape(b, n, loss_chunk, e).swapaxes(0, 1)
    y_NBC = labels_BL.reshape(b, n, loss_chunk).swapaxes(0, 1)
    body = jax.checkpoint(lambda total, xs: (total + chunk_sum(*xs), None))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h_NBCE, y_NBC))
    return total


def split_micro_batches(batch: dict[str, jax.Array], micro_batches: int) -> dict[str, jax.Array]:
    """[B, L] → [M, B/M, L], micro-batch m taking rows m, m+M, ... so every device keeps its share."""
    def split(x):
        b = x.shape[0]
        return x.reshape(b // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef, rest: Any,
               tx: optax.GradientTransformation, micro_batches: int = 1, loss_chunk: int | None = None,
               grad_shardings: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch, accumulating gradients over `micro_batches`."""
    tokens = jnp.sum(batch["labels"] != IGNORE)
    scale = 1.0 / jnp.maximum(tokens, 1).astype(jnp.float32)

    def loss_fn(params, micro_batch):
        model = nnx.merge(graphdef, params, rest)
        return cross_entropy_sum(model, micro_batch, loss_chunk) * scale

    grad_fn = jax.value_and_grad(loss_fn)
    if micro_batches == 1:
        loss, grads = grad_fn(state.params, batch)
    else:
        def accumulate(carry, micro_batch):
            loss_sum, grad_sum = carry
            loss, grads = grad_fn(state.params, micro_batch)
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            if grad_shardings is not None:
                grad_sum = jax.lax.with_sharding_constraint(grad_sum, grad_shardings)
            return (loss_sum + loss, grad_sum), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        if grad_shardings is not None:
            zeros = jax.lax.with_sharding_constraint(zeros, grad_shardings)
        (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros),
                                        split_micro_batches(batch, micro_batches))
    if grad_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": tokens}
    return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics


def eval_step(params: Any, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef, rest: Any,
              loss_chunk: int | None = None) -> dict[str, jax.Array]:
    """Summed loss and token count of a batch, for a held-out mean over many batches."""
    model = nnx.merge(graphdef, params, rest)
    return {"loss_sum": cross_entropy_sum(model, batch, loss_chunk), "tokens": jnp.sum(batch["labels"] != IGNORE)}
