"""Verification: compile a plan's real train step on abstract inputs and read XLA's memory report.

Nothing is allocated: the model is `nnx.eval_shape`d and `moai_jax.step.compile_step` lowers the
very step the Trainer runs on `jax.ShapeDtypeStruct`s carrying their shardings. On backends without
a fused attention kernel the model's "auto" attention is the blockwise path, so a CPU compile has
the memory shape of a GPU's flash attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moai_jax.models import Decoder, ModelConfig
from moai_jax.models.lora import LoraConfig, adapted
from moai_jax.planner.plan import Plan
from moai_jax.step import Verified, compile_step


def abstract_model(config: ModelConfig, plan: Plan) -> Decoder:
    """The plan's Decoder (with its LoRA adapters, if any) as shapes only (no parameter is allocated)."""
    dtype, param_dtype = jnp.dtype(plan.compute_dtype), jnp.dtype(plan.param_dtype)
    lora = None if plan.lora is None else LoraConfig(**plan.lora)
    return nnx.eval_shape(lambda: adapted(Decoder(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                                  remat=plan.remat, attention="auto"), lora))


def verify(plan: Plan, config: ModelConfig, devices: Sequence[jax.Device],
           optimizer: optax.GradientTransformation | None = None) -> Verified:
    """Compile the plan's train step for an abstract Decoder of `config`; its peak bytes per device."""
    return compile_step(plan, abstract_model(config, plan), devices, optimizer)[2]
