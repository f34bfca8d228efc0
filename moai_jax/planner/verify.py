"""Verification: compile a plan's real train step on abstract inputs and read XLA's memory report.

Nothing is allocated: the model is `nnx.eval_shape`d and `moai_jax.step.compile_step` lowers the
very step the Trainer runs on `jax.ShapeDtypeStruct`s carrying their shardings, for the devices the
plan is for: compile-only GPUs or TPUs of the target (`moai_jax.targets`), whose compiler's memory
report is the verdict, or simulated CPU devices. "auto" attention is resolved for those devices
(cuDNN on NVIDIA GPUs with 16-bit compute; elsewhere the blockwise path, so a CPU compile has the
memory shape of a GPU's flash attention).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moai_jax.models import Decoder, ModelConfig
from moai_jax.models.lora import LoraConfig, adapted
from moai_jax.planner.plan import Plan
from moai_jax.sizes import format_bytes
from moai_jax.step import Verified, compile_step, describe_backend


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


def verified_line(plan: Plan) -> str:
    """Which compiler verified the plan, how long it took and what it measured, in one line:
    "verified on 64 × NVIDIA H100 80GB HBM3 (compile only, cudnn attention) in 7.5 s: 32.2 GiB of 64.0 GiB"."""
    if plan.verified_bytes_per_device is None:
        return "not verified (ranked by the memory model only)"
    seconds = (plan.planning_seconds or {}).get("verify")
    line = (f"verified on {plan.verified_on}{f' in {seconds:.1f} s' if seconds is not None else ''}: "
            f"{format_bytes(plan.verified_bytes_per_device)} of {format_bytes(plan.budget_bytes_per_device or 0)}")
    if "compile only" in (plan.verified_on or "") and "TPU" not in plan.verified_on:
        line += " (no GPU here, so XLA skipped kernel autotuning: a real GPU's temporaries can differ somewhat)"
    return line


def out_of_memory(error: Exception, device: jax.Device, count: int, seconds: float, budget: int) -> Verified:
    """The verdict of a compiler that refused the step for memory (a TPU's RESOURCE_EXHAUSTED): the
    bytes it says the step needs (at least one over the budget); other errors propagate."""
    message = str(error)
    if "RESOURCE_EXHAUSTED" not in message:
        raise error
    sizes = [float(n) * 1024 ** "BKMGT".index(unit) for n, unit in re.findall(r"\(([\d.]+)([KMGT])\)", message)]
    needed = max(int(max(sizes, default=0)), budget + 1)
    words = message.split("RESOURCE_EXHAUSTED:", 1)[1].strip().splitlines()[0]
    return Verified(needed, describe_backend(device, count), seconds, error=words)

