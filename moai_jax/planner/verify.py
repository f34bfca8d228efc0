"""Verification: compile a plan's real train step on abstract inputs and read XLA's memory report.

Nothing is allocated: the model is `nnx.eval_shape`d, the state and batch are `jax.ShapeDtypeStruct`s
carrying their shardings, and the Trainer's own `build_step` is lowered and compiled. On backends
without a fused attention kernel the model's "auto" attention is the blockwise path, so a CPU
compile has the memory shape of a GPU's flash attention.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moai_jax.models import Decoder, ModelConfig
from moai_jax.models import attention as attention_lib
from moai_jax.planner.plan import Plan
from moai_jax.sharding.mesh import make_mesh
from moai_jax.train import BATCH_KEYS


@dataclasses.dataclass(frozen=True)
class Verified:
    bytes_per_device: int
    backend: str  # e.g. "cpu (8 simulated devices, blockwise attention)"
    seconds: float


def default_optimizer() -> optax.GradientTransformation:
    from moai_jax.optimizer import adamw

    return adamw(1e-5)


def abstract_model(config: ModelConfig, plan: Plan) -> Decoder:
    """The plan's Decoder as shapes only (no parameter is allocated)."""
    dtype, param_dtype = jnp.dtype(plan.compute_dtype), jnp.dtype(plan.param_dtype)
    return nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                          remat=plan.remat, attention="auto"))


def compiled_bytes(compiled) -> int:
    """Peak bytes per device of a compiled step (donated inputs counted once)."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes + m.generated_code_size_in_bytes)


def compile_step(plan: Plan, model: nnx.Module, devices: Sequence[jax.Device],
                 optimizer: optax.GradientTransformation | None = None, batch_keys: Sequence[str] = BATCH_KEYS):
    """Lower and compile the plan's train step for `model` (abstract or real) on abstract inputs.

    Returns the step's parts, the compiled executable (which runs the real state as well) and what
    it measured."""
    from moai_jax.trainer import build_step  # the Trainer's own step: one way of doing it

    start = time.perf_counter()
    mesh = make_mesh(plan.mesh, list(devices)[: plan.mesh.size])
    parts = build_step(model, optimizer or default_optimizer(), plan, mesh)
    spec = jax.ShapeDtypeStruct((plan.batch_size, plan.seq_len), jnp.int32, sharding=parts.batch_sharding)
    compiled = parts.step.lower(parts.abstract_state, {k: spec for k in batch_keys}, parts.abstract_rest).compile()
    device = mesh.devices.flat[0]
    kernel = attention_lib.resolve(getattr(model, "attention", "auto"), jnp.dtype(plan.compute_dtype),
                                   model.config.head_dim)
    simulated = device.platform == "cpu" and plan.mesh.size > 1
    where = f"{plan.mesh.size} simulated devices" if simulated else f"{plan.mesh.size} device(s)"
    backend = f"{device.platform} ({where}, {kernel} attention)"
    return parts, compiled, Verified(compiled_bytes(compiled), backend, time.perf_counter() - start)


def verify(plan: Plan, config: ModelConfig, devices: Sequence[jax.Device],
           optimizer: optax.GradientTransformation | None = None) -> Verified:
    """Compile the plan's train step for an abstract Decoder of `config`; its peak bytes per device."""
    return compile_step(plan, abstract_model(config, plan), devices, optimizer)[2]
