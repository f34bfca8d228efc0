"""The Trainer: single-device training code in, one sharded, jitted, donated train step out.

    trainer = moai_jax.Trainer(model, optax.adamw(1e-5), batch_size=512, seq_len=1024, accelerator=acc)
    print(trainer.plan)
    for batch in batches:                     # numpy arrays of the GLOBAL batch
        metrics = trainer.step(batch)

`model` is an nnx.Module or, for models too large for one device, a function that builds one: it
is then initialized under jit straight into its shards, never whole on one device. `params`, a
function of the parameter shardings, loads weights instead (`lambda s: load_pretrained(path, shardings=s)`):
each tensor goes straight onto its shards.

A model of the user's own needs no moai_jax import: one whose `__call__(input_ids)` returns logits
[batch, length, vocab] trains with the masked next-token loss; any other takes `loss_fn(model, batch) ->
(loss_sum, tokens)`, and `example_batch` (one global batch, arrays or `jax.ShapeDtypeStruct`s) when its
batches are not int32 [batch, length]. Its parameters are sharded by `rules` (regex on the parameter path
→ logical names or a PartitionSpec) or by their shapes; the planner compiles candidates to choose.

`lora=LoraConfig(r=8, alpha=16)` trains LoRA adapters on the frozen model instead of the model itself
(`models/lora.py`); `params` then loads the base model, onto the frozen weights' shardings.

`offload_optimizer=True` keeps AdamW's moments in host memory (`moai_jax/offload.py`), False on the devices;
by default (None) the planner keeps them on the devices unless no plan fits there.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moai_jax import distributed
from moai_jax.accelerator import Accelerator
from moai_jax.errors import DataError, FlavorError
from moai_jax.models import context
from moai_jax.models import lora as lora_lib
from moai_jax.planner.plan import Plan
from moai_jax.sharding.mesh import MeshShape, check_mesh, make_mesh
from moai_jax.step import StepParts, build_step, compile_step, compiled_bytes, layout
from moai_jax.train import BATCH_KEYS, IGNORE, TrainState, own_model


def next_token_labels(input_ids: np.ndarray) -> np.ndarray:
    """Labels for plain language modelling: each position predicts the next token; the last none."""
    labels = np.full_like(input_ids, IGNORE)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def fixed_axes(mesh: MeshShape | str | None) -> tuple[MeshShape | None, dict[str, int]]:
    """The mesh a user fixed (a string fixes all six axes) and its axes as the planner's knobs."""
    shape = MeshShape.parse(mesh) if isinstance(mesh, str) else mesh
    return shape, {} if shape is None else shape.sizes()


def init_state(parts: StepParts, model, optimizer: optax.GradientTransformation,
               load: Callable[[Any], nnx.Module | dict] | None = None,
               lora: lora_lib.LoraConfig | None = None) -> tuple[TrainState, Any]:
    """Parameters and optimizer state placed on their shards (born there when `model` is a builder).
    Under `lora`, `load` loads the base onto the frozen weights' shards and adapters are added."""
    def split(module):
        _, params, rest = nnx.split(module, nnx.Param, ...)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    rest_shardings = jax.tree.map(lambda x: x.sharding, parts.abstract_rest)
    shardings = (parts.param_shardings, rest_shardings)
    if load is not None and lora is not None:
        params, rest = split(lora_lib.apply_lora(load(lora_lib.split_base(rest_shardings)[0]), lora))
        params, rest = jax.device_put((params, rest), shardings)
    elif load is not None:
        loaded = load(parts.param_shardings)
        params, rest = split(loaded) if isinstance(loaded, nnx.Module) else (loaded, {})
        params, rest = jax.device_put((params, rest), shardings)
    elif isinstance(model, nnx.Module):
        # Copies: the step donates its state, and device_put may hand a device's shard the model's own buffer.
        params, rest = jax.device_put(jax.tree.map(jnp.copy, split(model)), shardings)
    else:
        params, rest = jax.jit(lambda: split(model()), out_shardings=shardings)()
    opt_state = jax.jit(optimizer.init, out_shardings=parts.state_shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), parts.replicated)
    return TrainState(params=params, opt_state=opt_state, step=step), rest


class Trainer:
    def __init__(self, model: nnx.Module | Callable[[], nnx.Module], optimizer: optax.GradientTransformation,
                 batch_size: int, seq_len: int | None, accelerator: Accelerator,
                 mesh: MeshShape | str | None = None, *,
                 micro_batches: int | None = None, remat: str | None = None, plan: Plan | None = None,
                 params: Callable[[Any], nnx.Module | dict] | None = None, memory_fraction: float = 0.8,
                 loss_fn: Callable[[nnx.Module, dict], tuple[Any, Any]] | None = None, rules=None,
                 example_batch: Mapping[str, Any] | None = None, lora: lora_lib.LoraConfig | None = None,
                 autotune: int = 0, offload_optimizer: bool | None = None):
        accelerator.check_can_run()  # compile-only devices plan (moai_jax.plan) but run nothing
        self.accelerator, self.lora = accelerator, lora
        model = lora_lib.adapted(model, lora)
        self.batch_size, self.seq_len = batch_size, seq_len or 1
        self.loss_fn, self.rules = loss_fn, rules
        distributed.agree("batch", {"batch_size": batch_size, "seq_len": seq_len},
                          "give every process the same batch size and sequence length")
        abstract = nnx.eval_shape(model) if callable(model) and not isinstance(model, nnx.Module) else model
        self.config = abstract.config if own_model(abstract) else None  # only moai_jax's own models have one
        self.example = self._example_spec(example_batch)  # key → global shape and dtype
        self._keys_required = example_batch is not None
        self._compiled: dict[frozenset[str], Any] = {}  # batch keys → executable
        self.compile_seconds: float | None = None
        verified: dict[tuple, tuple[StepParts, Any, Any]] = {}  # the planner's compiles, by layout
        self.autotune_report: str | None = None  # with autotune: each candidate's estimated and measured seconds
        if plan is None and autotune and self.config is not None:
            plan = self._autotune(autotune, model, abstract, optimizer, mesh, micro_batches, remat, memory_fraction,
                                  verified)
        self.plan = plan or self._auto_plan(abstract, optimizer, mesh, micro_batches, remat, memory_fraction,
                                            verified, offload_optimizer)
        check_mesh(self.plan.mesh, accelerator.flavor, batch_size=batch_size, micro_batches=self.plan.micro_batches,
                   num_heads=getattr(self.config, "num_heads", None),
                   num_kv_heads=getattr(self.config, "num_kv_heads", None),
                   num_layers=getattr(self.config, "num_layers", None),
                   num_experts=getattr(self.config, "num_experts", None), seq_len=self.seq_len)
        self.mesh = make_mesh(self.plan.mesh, accelerator.devices)
        if layout(self.plan) in verified:  # the planner compiled this very step: run that executable
            parts, compiled, measured = verified[layout(self.plan)]
            self._compiled[frozenset(self.example)] = compiled
            self.compile_seconds = measured.seconds
        else:
            parts = build_step(abstract, optimizer, self.plan, self.mesh, loss_fn=loss_fn, rules=rules)
        self.graphdef, self._replicated, self.batch_sharding = parts.graphdef, parts.replicated, parts.batch_sharding
        self.param_shardings, self.state_shardings = parts.param_shardings, parts.state_shardings
        self.rest_shardings = jax.tree.map(lambda x: x.sharding, parts.abstract_rest)
        self._step, self._eval = parts.step, parts.eval
        self.state, self._rest = init_state(parts, model, optimizer, params, self.lora)

    def _auto_plan(self, abstract, optimizer, mesh, micro_batches, remat, memory_fraction, verified,
                   offload_optimizer) -> Plan:
        """The planner's choice with the user's fixed knobs honored (a mesh string fixes all four axes).
        The planner verifies candidates with this model and optimizer; their compiles land in `verified`."""
        from moai_jax.planner import plan

        _, axes = fixed_axes(mesh)
        dtype = jnp.dtype(getattr(abstract, "dtype", jnp.float32)).name

        def compile_candidate(candidate: Plan):
            result = compile_step(candidate, abstract, self.accelerator.devices, optimizer, batch=self.example,
                                  loss_fn=self.loss_fn, rules=self.rules)
            verified[layout(candidate)] = result
            return result

        if self.config is None:  # a model of the user's own: no formula, so candidates are compiled
            from moai_jax.planner.measured import plan_measured

            if offload_optimizer:
                raise FlavorError("offload_optimizer=True is planned for moai_jax's own models only; for a model "
                                  "of your own give Trainer(..., plan=Plan(..., offload_optimizer=True))")

            return plan_measured(abstract, optimizer, self.example, self.seq_len, self.accelerator, memory_fraction,
                                 compile_candidate=compile_candidate, loss_fn=self.loss_fn, rules=self.rules,
                                 micro_batches=micro_batches, remat=remat, compute_dtype=dtype, **axes)

        def verifier(candidate: Plan):
            return compile_candidate(candidate)[2]

        return plan(self.config, self.batch_size, self.seq_len, self.accelerator, memory_fraction,
                    micro_batches=micro_batches, remat=remat, compute_dtype=dtype, optimizer=optimizer,
                    verifier=verifier, lora=self.lora, offload_optimizer=offload_optimizer, **axes)

    def _autotune(self, count, model, abstract, optimizer, mesh, micro_batches, remat, memory_fraction,
                  verified) -> Plan:
        """The fastest measured of the planner's `count` best candidates (`moai_jax.autotune`)."""
        from moai_jax import autotune

        _, axes = fixed_axes(mesh)
        dtype = jnp.dtype(getattr(abstract, "dtype", jnp.float32)).name
        plans = autotune.candidate_plans(self.config, self.batch_size, self.seq_len, self.accelerator, count,
                                         memory_fraction, dtype, micro_batches=micro_batches, remat=remat, **axes)
        rows = self.batch_size // jax.process_count()
        batch = autotune.synthetic_batch(rows, self.seq_len, self.config.vocab_size)

        def measure(candidate: Plan) -> float | None:
            parts, compiled, measured = compile_step(candidate, abstract, self.accelerator.devices, optimizer,
                                                     batch=self.example, loss_fn=self.loss_fn, rules=self.rules)
            verified[layout(candidate)] = (parts, compiled, measured)
            if measured.bytes_per_device > candidate.budget_bytes_per_device:
                return None
            state, rest = init_state(parts, model, optimizer)
            shape = (self.batch_size, self.seq_len)
            device_batch = {k: jax.make_array_from_process_local_data(parts.batch_sharding, batch[k], shape)
                            for k in self.example}

            def step():
                nonlocal state
                state, metrics = compiled(state, device_batch, rest)
                return metrics
            return autotune.time_steps(step)

        chosen, tried = autotune.autotune(self.config, plans, measure)
        self.autotune_report = autotune.report(chosen, tried)
        if layout(chosen) in verified:
            measured = verified[layout(chosen)][2]
            chosen = dataclasses.replace(chosen, verified_bytes_per_device=measured.bytes_per_device,
                                         verified_on=measured.backend)
        return chosen

    # -- feeding ---------------------------------------------------------------------------------
    def _example_spec(self, example: Mapping[str, Any] | None) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch the step is compiled for: the example's keys, shapes and dtypes, or int32
        [batch, length] token arrays (input_ids and labels; for moai_jax's Decoder also segment_ids, positions)."""
        if example is None:
            keys = BATCH_KEYS if self.config is not None else ("input_ids", "labels")
            return {k: jax.ShapeDtypeStruct((self.batch_size, self.seq_len), jnp.int32) for k in keys}
        spec = {}
        for key, value in example.items():
            shape = tuple(np.shape(value))
            if not shape or shape[0] != self.batch_size:
                raise DataError(f"example_batch[{key!r}] has shape {shape}; give one global batch, whose arrays "
                                f"all start with the batch size {self.batch_size}")
            dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
            spec[key] = jax.ShapeDtypeStruct(shape, jax.dtypes.canonicalize_dtype(dtype))
        return spec

    def device_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of the global batch (all of them on one host) → global sharded arrays."""
        batch = dict(batch)
        if self.loss_fn is None:
            if "input_ids" not in batch:
                raise DataError(f"a batch needs 'input_ids' (and optionally labels, segment_ids, positions); "
                                f"got {', '.join(batch)}")
            batch.setdefault("labels", next_token_labels(np.asarray(batch["input_ids"])))
        if self.plan.mesh.context > 1:  # each sequence reordered once, so the causal work splits evenly
            batch = context.balanced_batch(batch, self.plan.mesh.context)
        missing = [k for k in self.example if k not in batch]
        if missing and self._keys_required:
            raise DataError(f"the batch lacks {', '.join(map(repr, missing))}, which the trainer was planned with "
                            f"(example_batch has {', '.join(self.example)}); give every batch the same keys")
        rows = self.batch_size // jax.process_count()
        out = {}
        for key, value in batch.items():
            spec = self.example.get(key, jax.ShapeDtypeStruct((self.batch_size, self.seq_len), jnp.int32))
            value = np.asarray(value, dtype=spec.dtype)
            if value.shape != (rows, *spec.shape[1:]):
                raise FlavorError(f"batch[{key!r}] has shape {value.shape}; this trainer takes "
                                  f"{(rows, *spec.shape[1:])} per process (batch size {self.batch_size})")
            out[key] = jax.make_array_from_process_local_data(self.batch_sharding, value, spec.shape)
        return out

    # -- stepping --------------------------------------------------------------------------------
    def compile(self, batch_keys: Iterable[str] | None = None) -> float:
        """Compile the train step ahead of time for batches with these keys (default: the planned batch's);
        returns the seconds it took (for the step the planner already compiled to verify the plan, the
        seconds that took)."""
        keys = frozenset(self.example if batch_keys is None else batch_keys)
        if keys in self._compiled and self.compile_seconds is not None:
            return self.compile_seconds
        start = time.perf_counter()
        token_ids = jax.ShapeDtypeStruct((self.batch_size, self.seq_len), jnp.int32)
        specs = {k: self.example.get(k, token_ids) for k in keys}
        specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding) for k, v in specs.items()}
        self._compiled[keys] = self._step.lower(self.state, specs, self._rest).compile()
        self.compile_seconds = time.perf_counter() - start
        return self.compile_seconds

    def compiled_bytes_per_device(self) -> int:
        """Peak bytes per device of the compiled step, as XLA reports them."""
        compiled = next(iter(self._compiled.values()), None)
        if compiled is None:
            self.compile()
            compiled = next(iter(self._compiled.values()))
        return compiled_bytes(compiled)

    def step(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """One training step on a global batch. Metrics come back as device arrays: reading them waits."""
        device_batch = self.device_batch(batch)
        run = self._compiled.get(frozenset(device_batch), self._step)
        self.state, metrics = run(self.state, device_batch, self._rest)
        return metrics

    def evaluate(self, batches: Iterable[Mapping[str, np.ndarray]]) -> float:
        """Mean loss per real token over held-out batches."""
        loss_sum, tokens = 0.0, 0
        for batch in batches:
            out = jax.device_get(self._eval(self.state.params, self.device_batch(batch), self._rest))
            loss_sum, tokens = loss_sum + float(out["loss_sum"]), tokens + float(out["tokens"])
        return loss_sum / (tokens or 1)

    @property
    def model(self) -> nnx.Module:
        """The model with the current parameters (still sharded)."""
        return nnx.merge(self.graphdef, self.state.params, self._rest)

    def __repr__(self) -> str:
        return f"Trainer({self.plan.summary()})"


