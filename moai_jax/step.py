"""The plan's train step, built and compiled: what the Trainer runs and the planner verifies.

It sits below both (the planner compiles what the Trainer will run; neither imports the other).
`build_step` jits the train and eval steps with the plan's shardings and donated state;
`compile_step` lowers and compiles the train step on abstract inputs, so nothing is allocated, and
reads XLA's memory report and the compiled program's collectives. A model that carries no logical names
gets its parameter shardings from the user's partition rules or from their shapes
(`moai_jax.sharding.infer`), and trains with the loss `train.model_loss` picks for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax._src import config as jax_config
from jax.sharding import NamedSharding, PartitionSpec

from moai_jax import offload
from moai_jax.errors import FlavorError
from moai_jax.models import attention as attention_lib
from moai_jax.models import moe as moe_lib
from moai_jax.planner.compiled_collectives import Collective, collectives
from moai_jax.planner.plan import Plan
from moai_jax.sharding.annotate import logical_sharding
from moai_jax.sharding.mesh import make_mesh
from moai_jax.sharding.infer import parameter_shardings
from moai_jax.sharding.rules import partition_spec, tree_shardings
from moai_jax.train import (BATCH_KEYS, CHECKPOINT_POLICIES, LOSS_CHUNK, LossFn, TrainState, eval_step, model_loss,
                            own_model, train_step)


def default_optimizer() -> optax.GradientTransformation:
    from moai_jax.optimizer import adamw

    return adamw(1e-5)


@dataclasses.dataclass(frozen=True)
class Verified:
    bytes_per_device: int
    backend: str  # e.g. "cpu (8 simulated devices, blockwise attention)"
    seconds: float
    error: str | None = None  # the compiler's words when it refused the step (a TPU's RESOURCE_EXHAUSTED)
    collectives: tuple[Collective, ...] | None = None  # what the compiled step sends (planner/compiled_collectives.py)


def layout(plan: Plan) -> tuple:
    """What decides a plan's compiled step (estimates and explanations aside)."""
    return (plan.mesh, plan.batch_size, plan.seq_len, plan.micro_batches, plan.remat, plan.loss, plan.compute_dtype,
            plan.param_dtype, plan.offload_optimizer)


@dataclasses.dataclass(frozen=True)
class StepParts:
    """A plan's jitted train and eval steps over a mesh, and the shardings of what they take."""

    graphdef: nnx.GraphDef
    param_shardings: Any
    state_shardings: TrainState
    batch_sharding: NamedSharding
    replicated: NamedSharding
    abstract_state: TrainState  # ShapeDtypeStructs carrying the shardings: nothing allocated
    abstract_rest: Any
    step: Any
    eval: Any
    offloaded: Any = None  # under offload_optimizer: True for the optimizer state's leaves in host memory


def pipeline_micro_batches(model: nnx.Module, plan: Plan) -> int:
    """Hand the plan's pipeline to the model; the micro-batches left for the train step to accumulate.

    Under a pipeline (stage > 1) the micro-batches flow through the model's stages in one pass, so
    the train step accumulates none of its own."""
    if hasattr(model, "pipeline_stages"):
        model.pipeline_stages = plan.mesh.stage
        model.pipeline_micro_batches = plan.micro_batches if plan.mesh.stage > 1 else 1
    elif plan.mesh.stage > 1:
        raise FlavorError(f"mesh {plan.mesh} has pipeline stages, which only moai_jax's own models support "
                          f"(a model with stacked layers); use stage=1")
    return 1 if plan.mesh.stage > 1 else plan.micro_batches


def target_attention(config, plan: Plan, device: jax.Device) -> str:
    """What "auto" attention is for the devices compiled for (compile-only H100s: cuDNN), not this
    machine's; blockwise where cuDNN cannot take the plan (`attention.cudnn_fits`)."""
    kernel = attention_lib.resolve("auto", jnp.dtype(plan.compute_dtype), config.head_dim, device)
    fits = attention_lib.cudnn_fits(config, plan.mesh.tensor, plan.mesh.stage, plan.mesh.context)
    return "blockwise" if kernel == "cudnn" and not fits else kernel


def build_step(abstract: nnx.Module, optimizer: optax.GradientTransformation, plan: Plan, mesh, *,
               loss_fn: LossFn | None = None, rules=None) -> StepParts:
    """The plan's train step for an abstract (or real) model, jitted with shardings and donated state.

    Used by the Trainer to run and by the planner to verify (lowered on abstract inputs). `loss_fn` and
    `rules` (partition rules, see `moai_jax.sharding.infer`) are the user's, for their own models."""
    replicated = NamedSharding(mesh, PartitionSpec())
    # the batch's leading dimension is split; the rest of every batch array (length, features) follows,
    # except that under context parallelism the [batch, length] arrays are split over length too
    names, shape = ("batch",), (plan.batch_size // plan.micro_batches,)
    if plan.mesh.context > 1:
        names, shape = ("batch", "length"), (*shape, plan.seq_len)
    batch_sharding = NamedSharding(mesh, partition_spec(names, shape, dict(mesh.shape)))
    remat_policy = None
    if own_model(abstract):
        abstract.remat = plan.remat
        if abstract.attention == "auto":
            abstract.attention = target_attention(abstract.config, plan, mesh.devices.flat[0])
        if abstract.moe_implementation == "auto":  # compile-only GPUs: the sorted path, not this CPU's dense one
            abstract.moe_implementation = moe_lib.resolve("auto", abstract.config, mesh.devices.flat[0])
    else:
        remat_policy = CHECKPOINT_POLICIES[plan.remat]
    accumulate = pipeline_micro_batches(abstract, plan)
    if plan.mesh.context > 1 and not own_model(abstract):
        raise FlavorError(f"mesh {plan.mesh} splits each sequence over context, which only moai_jax's own models "
                          f"support (their attention gathers keys and values); use context=1")
    graphdef, abstract_params, abstract_rest = nnx.split(abstract, nnx.Param, ...)
    param_shapes = nnx.to_pure_dict(abstract_params)
    param_shardings = parameter_shardings(abstract_params, mesh, rules)
    opt_shapes = jax.eval_shape(optimizer.init, param_shapes)
    opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, opt_shapes, param_shardings,
                                          transform_non_params=lambda _: replicated)
    offloaded = offload.offloaded_leaves(optimizer, opt_shapes, param_shapes) if plan.offload_optimizer else None
    if offloaded is not None:
        opt_shardings = offload.in_host_memory(opt_shardings, offloaded)
    state_shardings = TrainState(params=param_shardings, opt_state=opt_shardings, step=replicated)
    shaped = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    abstract_state = jax.tree.map(shaped, TrainState(params=param_shapes, opt_state=opt_shapes,
                                                     step=jax.ShapeDtypeStruct((), jnp.int32)), state_shardings)
    # moai_jax's models split their non-trained state (e.g. LoRA's frozen base) by its logical names too.
    rest_shapes = nnx.to_pure_dict(abstract_rest)
    rest_shardings = (tree_shardings(nnx.to_pure_dict(nnx.get_partition_spec(abstract_rest)), rest_shapes, mesh)
                      if own_model(abstract) else jax.tree.map(lambda _: replicated, rest_shapes))
    abstract_rest = jax.tree.map(shaped, rest_shapes, rest_shardings)

    def traced(fn):
        """`fn` traced inside the mesh's logical sharding, so the model's constraints take effect."""
        def run(first, batch, rest):
            with logical_sharding(mesh):
                return fn(first, batch, graphdef=graphdef, rest=rest)
        return run

    loss = model_loss(abstract, loss_fn, LOSS_CHUNK if plan.loss == "chunked" else None)
    train = functools.partial(train_step, tx=optimizer, loss=loss, micro_batches=accumulate,
                              remat_policy=remat_policy, grad_shardings=param_shardings, offloaded=offloaded)
    evaluate = functools.partial(eval_step, loss=loss)
    step = jax.jit(traced(train), in_shardings=(state_shardings, batch_sharding, rest_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)
    evaluation = jax.jit(traced(evaluate), in_shardings=(param_shardings, batch_sharding, rest_shardings),
                         out_shardings=replicated)
    return StepParts(graphdef, param_shardings, state_shardings, batch_sharding, replicated, abstract_state,
                     abstract_rest, step, evaluation, offloaded)


def compiled_bytes(compiled) -> int:
    """Peak bytes per device of a compiled step (donated inputs counted once)."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes + m.generated_code_size_in_bytes)


def batch_spec(plan: Plan, batch_keys: Sequence[str] = BATCH_KEYS) -> dict[str, jax.ShapeDtypeStruct]:
    """A language model's global batch: int32 [batch, length] under each key."""
    return {k: jax.ShapeDtypeStruct((plan.batch_size, plan.seq_len), jnp.int32) for k in batch_keys}


def describe_backend(device: jax.Device, count: int, attention: str | None = None) -> str:
    """Which compiler verified, in words: "64 × NVIDIA H100 80GB HBM3 (compile only, cudnn attention)",
    "cpu (8 simulated devices, blockwise attention)"."""
    notes = [f"{attention} attention"] if attention else []
    if device.platform == "cpu":
        return f"cpu ({', '.join([f'{count} simulated devices' if count > 1 else f'{count} device(s)'] + notes)})"
    if device not in jax.devices():
        notes.insert(0, "compile only")
    return f"{count} × {device.device_kind}" + (f" ({', '.join(notes)})" if notes else "")


@contextlib.contextmanager
def without_persistent_cache():
    """Compile-only devices have no client to load a cached executable from: skip the persistent cache. JAX
    decides once per process whether the cache is used, so once a CPU compile has used it, JAX still looks up
    a compile-only step's entry and warns that it cannot load it: that warning says nothing here."""
    with jax_config.enable_compilation_cache(False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Error reading persistent compilation cache entry")
        yield


def compile_step(plan: Plan, model: nnx.Module, devices: Sequence[jax.Device],
                 optimizer: optax.GradientTransformation | None = None, batch_keys: Sequence[str] = BATCH_KEYS, *,
                 batch: dict[str, jax.ShapeDtypeStruct] | None = None, loss_fn: LossFn | None = None, rules=None):
    """Lower and compile the plan's train step for `model` (abstract or real) on abstract inputs.

    `batch`: the global batch's shapes and dtypes (default: int32 [batch, length] under `batch_keys`).
    Returns the step's parts, the compiled executable (which runs the real state as well) and what
    it measured."""
    start = time.perf_counter()
    mesh = make_mesh(plan.mesh, list(devices)[: plan.mesh.size])
    parts = build_step(model, optimizer or default_optimizer(), plan, mesh, loss_fn=loss_fn, rules=rules)
    specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=parts.batch_sharding)
             for k, v in (batch or batch_spec(plan, batch_keys)).items()}
    lowered = parts.step.lower(parts.abstract_state, specs, parts.abstract_rest)
    if parts.offloaded is not None:  # compile-only devices dropped the state's host memory kind
        in_host = TrainState(params=jax.tree.map(lambda _: False, parts.abstract_state.params),
                             opt_state=parts.offloaded, step=False)
        offload.mark_host_arguments(lowered, jax.tree.leaves(in_host)
                                    + [False] * len(jax.tree.leaves((specs, parts.abstract_rest))))
    device = mesh.devices.flat[0]
    with contextlib.nullcontext() if device in jax.devices() else without_persistent_cache():
        compiled = lowered.compile()
    backend = describe_backend(device, plan.mesh.size, getattr(model, "attention", None)
                               if getattr(model, "config", None) is not None else None)
    return parts, compiled, Verified(compiled_bytes(compiled), backend, time.perf_counter() - start,
                                     collectives=collectives(compiled.as_text(), plan.mesh))


