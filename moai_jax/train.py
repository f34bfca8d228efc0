"""The training state and the one train step: the loss, micro-batch accumulation, optimizer update.

Pure functions of arrays. The step is jitted once with the plan's shardings and its state donated;
here nothing knows about devices. A loss is `loss(model, batch) -> (loss_sum, tokens)`: moai_jax's
Decoder takes the masked next-token loss of its hidden states (chunked, with segment ids), any model
whose `__call__(input_ids)` returns logits [batch, length, vocab] the same loss of those logits, and any
model at all the user's own `loss_fn`. The step's loss is the sum over the whole global batch divided
by its tokens, so splitting the batch over devices or into micro-batches does not change it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from moai_jax import offload
from moai_jax.errors import DataError, ModelError
from moai_jax.models.config import ModelConfig
from moai_jax.models.moe import router_losses

IGNORE = -100
LOSS_CHUNK = 512  # sequence positions per logits chunk under a plan's chunked loss
BATCH_KEYS = ("input_ids", "labels", "segment_ids", "positions")
LossFn = Callable[[nnx.Module, dict], tuple]  # (model, batch) -> (loss_sum, tokens) [, metrics weighted by tokens]
# jax.checkpoint around a user model's loss: what its forward keeps for backward
CHECKPOINT_POLICIES = {"none": None, "matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


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
    return hidden_cross_entropy_sum(model, hidden_BLE, batch["labels"], loss_chunk)


def hidden_cross_entropy_sum(model: nnx.Module, hidden_BLE: jax.Array, labels_BL: jax.Array,
                             loss_chunk: int | None = None) -> jax.Array:
    """`cross_entropy_sum` of the model's final hidden states."""
    chunk_sum = lambda h_BCE, y_BC: masked_cross_entropy_sum(model.logits(h_BCE), y_BC)  # noqa: E731

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


def masked_cross_entropy_sum(logits_BLV: jax.Array, labels_BL: jax.Array) -> jax.Array:
    """Sum of the float32 cross-entropies at labels != -100."""
    mask_BL = labels_BL != IGNORE
    ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV.astype(jnp.float32),
                                                            jnp.where(mask_BL, labels_BL, 0))
    return jnp.sum(jnp.where(mask_BL, ce_BL, 0.0))


def decoder_loss(loss_chunk: int | None = None) -> LossFn:
    """moai_jax's Decoder: masked next-token loss of its hidden states, with segment ids and positions.

    A Mixture-of-Experts model adds its router losses as transformers does (loss + router_aux_loss_coef ·
    load-balancing loss, + router_z_loss_coef · z-loss) and returns them, weighted by the tokens, as a third
    element for the metrics (`router_loss`, `router_z_loss`, `dropped_fraction`)."""
    def loss(model, batch):
        hidden_BLE, router_X = model.hidden_states_and_router(batch["input_ids"], segment_ids=batch.get("segment_ids"),
                                                              positions=batch.get("positions"))
        loss_sum = hidden_cross_entropy_sum(model, hidden_BLE, batch["labels"], loss_chunk)
        tokens = jnp.sum(batch["labels"] != IGNORE)
        if router_X is None:
            return loss_sum, tokens
        c, router = model.config, router_losses(router_X, model.config)
        penalty = c.router_aux_loss_coef * router["router_loss"] + c.router_z_loss_coef * router["router_z_loss"]
        weight = tokens.astype(jnp.float32)
        return loss_sum + penalty * weight, tokens, {k: v * weight for k, v in router.items()}
    return loss


def logits_loss(model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Any model whose `__call__(input_ids)` returns logits [batch, length, vocab]: masked next-token loss."""
    input_ids_BL = batch["input_ids"]
    logits_BLV = model(input_ids_BL)
    shape = getattr(logits_BLV, "shape", None)
    if shape is None or len(shape) != 3 or tuple(shape[:2]) != tuple(input_ids_BL.shape):
        got = f"shape {tuple(shape)}" if shape is not None else f"a {type(logits_BLV).__name__}"
        raise ModelError(f"{type(model).__name__}(input_ids) returned {got} for input_ids of shape "
                         f"{tuple(input_ids_BL.shape)}; return logits [batch, length, vocab] from __call__, or "
                         f"give Trainer(..., loss_fn=lambda model, batch: (loss_sum, tokens))")
    return masked_cross_entropy_sum(logits_BLV, batch["labels"]), jnp.sum(batch["labels"] != IGNORE)


def user_loss(loss_fn: LossFn) -> LossFn:
    """The user's `loss_fn`, with their two likeliest mistakes said plainly."""
    def loss(model, batch):
        try:
            out = loss_fn(model, batch)
        except KeyError as e:
            key = e.args[0] if e.args else None
            if not isinstance(key, str) or key in batch:
                raise
            raise DataError(f"loss_fn reads batch[{key!r}], but the batch has only {', '.join(sorted(batch))}; "
                            f"add {key!r} to every batch (and to example_batch)") from None
        if not (isinstance(out, (tuple, list)) and len(out) == 2
                and all(jnp.ndim(x) == 0 for x in out)):
            raise ModelError("loss_fn must return (loss_sum, tokens): two scalars, the summed loss of the batch "
                             "and how many tokens (or examples) it sums over")
        return out
    return loss


def own_model(model: nnx.Module) -> bool:
    """moai_jax's own decoders: they remat themselves and have the fast, chunked loss."""
    return isinstance(getattr(model, "config", None), ModelConfig)


def model_loss(model: nnx.Module, loss_fn: LossFn | None = None, loss_chunk: int | None = None) -> LossFn:
    """The loss a model trains with: the user's, the Decoder's fast path, or next-token loss of its logits."""
    if loss_fn is not None:
        return user_loss(loss_fn)
    return decoder_loss(loss_chunk) if own_model(model) else logits_loss


def split_micro_batches(batch: dict[str, jax.Array], micro_batches: int) -> dict[str, jax.Array]:
    """[B, L] → [M, B/M, L], micro-batch m taking rows m, m+M, ... so every device keeps its share."""
    def split(x):
        b = x.shape[0]
        return x.reshape(b // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef, rest: Any,
               tx: optax.GradientTransformation, loss: LossFn, micro_batches: int = 1, remat_policy: Any = None,
               grad_shardings: Any = None, offloaded: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch, accumulating gradients over `micro_batches`.

    `remat_policy`: a jax.checkpoint policy around the model's loss (models that do not remat themselves).
    `offloaded`: True for the optimizer state's leaves kept in host memory (`moai_jax.offload`), brought to
    the devices for the update and sent back."""
    def objective(params, micro_batch):
        loss_sum, tokens, extra = _with_extra(loss(nnx.merge(graphdef, params, rest), micro_batch))
        return loss_sum.astype(jnp.float32), (jnp.asarray(tokens, jnp.float32), extra)

    if remat_policy is not None:
        objective = jax.checkpoint(objective, policy=remat_policy)
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if micro_batches == 1:
        (loss_sum, (tokens, extra)), grads = grad_fn(state.params, batch)
    else:
        def accumulate(carry, micro_batch):
            loss_sum, tokens, extra_sum, grad_sum = carry
            (loss, (count, extra)), grads = grad_fn(state.params, micro_batch)
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            if grad_shardings is not None:
                grad_sum = jax.lax.with_sharding_constraint(grad_sum, grad_shardings)
            return (loss_sum + loss, tokens + count, jax.tree.map(jnp.add, extra_sum, extra), grad_sum), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        if grad_shardings is not None:
            zeros = jax.lax.with_sharding_constraint(zeros, grad_shardings)
        zero = jnp.zeros((), jnp.float32)
        micro = split_micro_batches(batch, micro_batches)
        extra_shapes = jax.eval_shape(lambda b: objective(state.params, b)[1][1], jax.tree.map(lambda x: x[0], micro))
        extra_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), extra_shapes)
        (loss_sum, tokens, extra, grads), _ = jax.lax.scan(accumulate, (zero, zero, extra_zeros, zeros), micro)
    scale = 1.0 / jnp.where(tokens > 0, tokens, 1.0)  # tokens may be weights: a sum below 1 is fine
    grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    if grad_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
    opt_state = state.opt_state if offloaded is None else offload.to_devices(state.opt_state, offloaded, grads)
    updates, opt_state = tx.update(grads, opt_state, state.params)
    if offloaded is not None:
        opt_state = offload.to_host(opt_state, offloaded)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss_sum * scale, "grad_norm": optax.tree.norm(grads), "tokens": tokens}
    metrics |= {k: v * scale for k, v in extra.items()}  # per-token means over the batch (router losses)
    return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics


def eval_step(params: Any, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef, rest: Any,
              loss: LossFn) -> dict[str, jax.Array]:
    """Summed loss and token count of a batch, for a held-out mean over many batches (dropout off)."""
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    loss_sum, tokens, _ = _with_extra(loss(model, batch))
    return {"loss_sum": loss_sum, "tokens": tokens}


def _with_extra(out: tuple) -> tuple:
    """A loss's (loss_sum, tokens) or (loss_sum, tokens, metrics weighted by tokens) as the latter."""
    return out if len(out) == 3 else (*out, {})
