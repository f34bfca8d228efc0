"""AdamW with a warmup-then-decay learning rate, global-norm clipping and no decay on norms or biases."""

from __future__ import annotations

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(peak: float, total_steps: int, *, warmup_steps: int | None = None,
                           decay: str = "cosine") -> optax.Schedule:
    """Linear warmup to `peak` (by default over 3% of the steps), then `decay` to 10% of it."""
    if decay not in SCHEDULES:
        raise ValueError(f"unknown learning-rate decay {decay!r}; choose one of {', '.join(SCHEDULES)}")
    total_steps = max(int(total_steps), 1)
    warmup = warmup_length(total_steps, warmup_steps)
    rest = max(total_steps - warmup, 1)
    after = {
        "cosine": optax.cosine_decay_schedule(peak, rest, alpha=0.1),
        "linear": optax.linear_schedule(peak, 0.1 * peak, rest),
        "constant": optax.constant_schedule(peak),
    }[decay]
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def warmup_length(total_steps: int, warmup_steps: int | None = None) -> int:
    """The warmup steps of a run of `total_steps`: `warmup_steps`, by default 3% of the run (at least one)."""
    total_steps = max(int(total_steps), 1)
    return min(max(int(0.03 * total_steps), 1) if warmup_steps is None else warmup_steps, total_steps)


def _decays(params):
    """True for the weights that get weight decay: everything but norms and biases."""
    def decays(path, _):
        name = jax.tree_util.keystr(path).lower()
        return "norm" not in name and "bias" not in name
    return jax.tree_util.tree_map_with_path(decays, params)


def adamw(learning_rate: float | optax.Schedule, *, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.95,
          eps: float = 1e-8, max_grad_norm: float | None = 1.0) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW (decay masked off for norms and biases)."""
    steps = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    steps.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decays))
    return optax.chain(*steps)
