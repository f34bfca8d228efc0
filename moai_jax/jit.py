"""`@acc.jit`: your own single-device train step, unchanged, on the flavor's devices.

    @acc.jit                                  # was: @nnx.jit (or @jax.jit)
    def train_step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads)
        return loss

    loss = train_step(model, optimizer, batch)  # the first call plans, compiles, moves the state
    print(train_step.plan)

What each argument is, decided on the first call:
  static   named by `static_argnums` / `static_argnames`: part of the compiled step, as with jax.jit;
  module   an nnx graph node (Module, Optimizer, metrics): its state is split like parameters, and the
           object is updated in place after every call, as nnx.jit does;
  batch    a pytree whose arrays all share a leading dimension (or an argument named in `batch_argnames`):
           that axis is split over the data axes (data × fsdp × expert);
  state    any other pytree (a Flax TrainState, a dict of parameters): split like parameters; when the step
           returns it (same structure, shapes and dtypes) it is donated and the returned one keeps its shards.
Parameters (nnx.Param, or what sits under `params` in a pytree) get the Trainer's shardings
(`moai_jax.sharding.infer`: `rules`, logical names, or shapes); every other array follows the parameter
whose path ends its own with the same shape (Adam's moments, EMA weights), or is placed by its own shape;
scalars are replicated. The plan is chosen among data × fsdp (× tensor where `rules` split a dimension)
by compiling candidates (`moai_jax.planner.measured`); the chosen compile is the one that runs.

Paths start with the argument's name: `model/linear/kernel`, `state/params/Dense_0/kernel`.
Several processes: each passes its own rows of the global batch, as with the Trainer.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from moai_jax.errors import FlavorError, ModelError
from moai_jax.jit_arguments import Argument, Call, argument, changed, global_shape, key_parts
from moai_jax.planner.measured import Profile, plan_measured
from moai_jax.planner.plan import Plan
from moai_jax.sharding.mesh import MeshShape, make_mesh
from moai_jax.step import Verified, compiled_bytes, describe_backend

NOT_APPLIED = ("not applied to a step of your own: micro-batching and remat of the loss (give the Trainer your "
               "model and loss_fn, moai_jax.Trainer(model, optimizer, ..., loss_fn=loss_fn), to get them)")


@dataclasses.dataclass
class Compiled:
    """One compiled step: its executable and where each argument's leaves go."""

    executable: Any
    shardings: dict[str, list[NamedSharding]]
    donated: tuple[str, ...]
    kept: tuple[str, ...]


class JitStep:
    """The jitted step `acc.jit` returns: call it like the function; `plan` once it has run (or `place`d)."""

    def __init__(self, fn: Callable, accelerator, *, static_argnums=(), static_argnames=(), donate_argnums=(),
                 donate_argnames=(), batch_argnames: Iterable[str] | None = None, rules=None, data: int | None = None,
                 fsdp: int | None = None, tensor: int | None = None, memory_fraction: float = 0.8):
        functools.update_wrapper(self, fn)
        self.fn, self.accelerator, self.rules = fn, accelerator, rules
        self.signature = inspect.signature(fn)
        names = list(self.signature.parameters)
        as_set = lambda v: {v} if isinstance(v, (int, str)) else set(v or ())  # noqa: E731
        self.static = {names[i] for i in as_set(static_argnums)} | as_set(static_argnames)
        self.donate = {names[i] for i in as_set(donate_argnums)} | as_set(donate_argnames)
        self.batch_names = None if batch_argnames is None else as_set(batch_argnames)
        self.fixed = {"data": data, "fsdp": fsdp, "tensor": tensor}
        self.memory_fraction = memory_fraction
        self.plan: Plan | None = None
        self._compiled: dict[tuple, Compiled] = {}

    # -- a call --------------------------------------------------------------------------------------
    def _bind(self, args, kwargs) -> Call:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = [Argument(n, "static", v) if n in self.static else argument(n, v, self.batch_names)
                     for n, v in bound.arguments.items()]
        rows = [global_shape(np.shape(x))[0] for a in arguments if a.kind == "batch" for x in a.leaves]
        return Call(bound, arguments, max(rows, default=None))

    def _check_rows(self, call: Call, mesh: MeshShape) -> None:
        for a in call.args:
            for path, x in zip(a.paths, a.leaves) if a.kind == "batch" else ():
                rows = global_shape(np.shape(x))[0]
                if rows % mesh.batch_shards:
                    n = mesh.batch_shards
                    near = " or ".join(str(r) for r in ((rows // n) * n, (rows // n + 1) * n) if r)
                    raise FlavorError(f"argument {a.name!r}: {path} has {rows} rows, which the data axes (data × fsdp "
                                      f"× expert = {n} devices of mesh {mesh}) do not divide; give it {near} rows, "
                                      f"or name the arguments that are the batch in batch_argnames")

    def _pure(self, call: Call, donated: Sequence[str], kept: Sequence[str]):
        by_name = {a.name: a for a in call.args}
        modules = [a for a in call.args if a.kind == "module"]

        def pure(donated_leaves, kept_leaves):
            values = {n: a.value for n, a in by_name.items()}
            for names, groups in ((donated, donated_leaves), (kept, kept_leaves)):
                values.update({n: by_name[n].rebuild(leaves) for n, leaves in zip(names, groups)})
            out = self.fn(*inspect.BoundArguments(self.signature, values).args,
                          **inspect.BoundArguments(self.signature, values).kwargs)
            updated = []
            for a in modules:
                graphdef, state = nnx.split(values[a.name])
                leaves, treedef = jax.tree.flatten(state)
                if graphdef != a.graphdef or treedef != a.treedef:
                    flat = jax.tree_util.tree_flatten_with_path(state)[0]
                    after = ["/".join([a.name, *key_parts(k)[:-1]]) for k, _ in flat]
                    raise ModelError(changed(a, after))
                updated.append(leaves)
            return out, tuple(updated)
        return pure

    def _trace(self, call: Call) -> Callable:
        """The step as a function of every dynamic argument's leaves, to trace it for its output's shapes."""
        pure = self._pure(call, (), tuple(a.name for a in call.dynamic()))
        return lambda leaves: pure((), leaves)

    def _compile(self, call: Call, plan: Plan) -> tuple[Compiled, Any, Verified]:
        """Lower and compile `call` on the plan's mesh, on abstract inputs; shapes are checked first."""
        start = time.perf_counter()
        self._check_rows(call, plan.mesh)
        mesh = make_mesh(plan.mesh, self.accelerator.devices[: plan.mesh.size])
        shardings = call.shardings(mesh, self.rules)
        dynamic = call.dynamic()
        returned, out_shape = call.returned(self._trace(call))
        donated = tuple(a.name for a in dynamic if a.kind == "module" or a.name in returned or a.name in self.donate)
        kept = tuple(a.name for a in dynamic if a.name not in donated)
        by_name = {a.name: a for a in dynamic}
        pure = self._pure(call, donated, kept)
        replicated = NamedSharding(mesh, PartitionSpec())
        module_out = tuple(shardings[a.name] for a in dynamic if a.kind == "module")
        out = _output_shardings(out_shape, returned, call, shardings, replicated)
        jitted = jax.jit(pure, in_shardings=([shardings[n] for n in donated], [shardings[n] for n in kept]),
                         out_shardings=(out, module_out), donate_argnums=0)
        executable = jitted.lower([by_name[n].abstract(shardings[n]) for n in donated],
                                  [by_name[n].abstract(shardings[n]) for n in kept]).compile()
        verified = Verified(compiled_bytes(executable), describe_backend(mesh.devices.flat[0], mesh.size),
                            time.perf_counter() - start)
        return Compiled(executable, shardings, donated, kept), executable, verified

    # -- planning ------------------------------------------------------------------------------------
    def _choose(self, call: Call) -> tuple[Plan, dict]:
        """The plan: candidates estimated from the state's exact shard sizes, the best few compiled."""
        state = [a for a in call.dynamic() if a.kind != "batch"]
        params = {p: v for a in state for p, v in a.params.items()}
        nbytes = {p: x.size * getattr(x.dtype, "itemsize", 8) for a in state for p, x in zip(a.paths, a.abstract())}
        param_bytes = {p: nbytes[p] for p in params}
        rest = sum(nbytes.values()) - sum(param_bytes.values())
        prof = Profile(params, param_bytes, rest / max(sum(param_bytes.values()), 1), {"none": 0.0})
        if call.rows is None:
            raise ModelError("the step got no batch: no argument's arrays share a leading dimension; name the "
                             "arguments that are the batch in batch_argnames")
        batch = [np.shape(x) for a in call.args if a.kind == "batch" for x in a.leaves]
        seq_len = next((s[1] for s in batch if len(s) > 1), 1)
        t = self.fixed["tensor"] or 1
        self._check_rows(call, MeshShape(data=self.accelerator.flavor // t, tensor=t))
        compiled = {}

        def compile_candidate(candidate: Plan):
            result = self._compile(call, candidate)
            compiled[candidate.mesh] = result[0]
            return result

        dtype = next((np.dtype(x.dtype).name for a in state for p, x in zip(a.paths, a.abstract()) if p in params),
                     "float32")
        plan = plan_measured(None, None, {"rows": jax.ShapeDtypeStruct((call.rows,), np.int32)}, seq_len,
                             self.accelerator, self.memory_fraction, compile_candidate=compile_candidate,
                             profiled=prof, rules=self.rules, micro_batches=1, remat="none", compute_dtype=dtype,
                             **self.fixed)
        return dataclasses.replace(plan, why=f"{plan.why}; {NOT_APPLIED}"), compiled

    def _ready(self, call: Call) -> Compiled:
        key = call.key
        if key not in self._compiled:
            if self.plan is None:
                self.plan, candidates = self._choose(call)
                self._compiled[key] = candidates[self.plan.mesh]
                if jax.process_index() == 0:
                    print(self.plan)
            else:
                self._compiled[key] = self._compile(call, self.plan)[0]
        return self._compiled[key]

    def _placed(self, call: Call, step: Compiled) -> dict[str, list]:
        """Every dynamic argument's leaves on their shards (a batch from each process's own rows)."""
        by_name = {a.name: a for a in call.dynamic()}
        placed, seen = {}, set()
        for name, shardings in step.shardings.items():
            a = by_name[name]
            placed[name] = [_put(x, s, a.kind == "batch") for x, s in zip(a.leaves, shardings)]
            for i, x in enumerate(placed[name]):  # one array twice in the state (EMA = params at first): copy it,
                if id(x) in seen and name in step.donated:  # as a buffer cannot be donated twice
                    placed[name][i] = _copy(x)
                seen.add(id(x))
        return placed

    def place(self, *args, **kwargs) -> tuple:
        """Plan and compile for these arguments, move their state onto its shards (nnx objects in place)
        without running the step; returns the arguments as placed (for a checkpoint to restore onto)."""
        call = self._bind(args, kwargs)
        step = self._ready(call)
        self.accelerator.check_can_run()  # compile-only devices of absent hardware plan, and run nothing
        placed = self._placed(call, step)
        for a in call.dynamic():
            if a.kind == "module":
                nnx.update(a.value, jax.tree.unflatten(a.treedef, placed[a.name]))
        values = {a.name: a.value if a.kind in ("static", "module") else jax.tree.unflatten(a.treedef, placed[a.name])
                  for a in call.args}
        bound = inspect.BoundArguments(self.signature, values)
        return (*bound.args, *bound.kwargs.values())

    def __call__(self, *args, **kwargs):
        call = self._bind(args, kwargs)
        step = self._ready(call)
        self.accelerator.check_can_run()
        placed = self._placed(call, step)
        out, updated = step.executable([placed[n] for n in step.donated], [placed[n] for n in step.kept])
        for a, leaves in zip([a for a in call.dynamic() if a.kind == "module"], updated):
            nnx.update(a.value, jax.tree.unflatten(a.treedef, leaves))
        return out


def _put(x, sharding: NamedSharding, batch: bool):
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jax.process_count() == 1:  # a copy first: device_put may give one shard the buffer the step then donates
        return jax.device_put(x if batch or not isinstance(x, jax.Array) else x.copy(), sharding)
    value = np.asarray(x)
    if batch:
        return jax.make_array_from_process_local_data(sharding, value, global_shape(value.shape))
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


@jax.jit
def _copy(x):
    return x.copy()


def _output_shardings(out, returned: dict[str, tuple], call: Call, shardings, replicated):
    """State the step returns keeps its arguments' shardings; scalars are replicated; XLA places the rest."""
    by_where = {where: name for name, where in returned.items()}
    treedefs = {a.name: a.treedef for a in call.args}
    default = lambda x: replicated if x.ndim == 0 else None  # noqa: E731

    def of(where, o):
        name = by_where.get(where)
        return jax.tree.unflatten(treedefs[name], shardings[name]) if name else jax.tree.map(default, o)

    if () in by_where or not isinstance(out, (tuple, list)):
        return of((), out)
    items = [of((i,), o) for i, o in enumerate(out)]
    return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)


def jit(accelerator, fun: Callable | None = None, **options) -> JitStep | Callable[[Callable], JitStep]:
    """`acc.jit(fn)`, `@acc.jit` or `@acc.jit(donate_argnames=..., static_argnames=..., fsdp=8)`."""
    if fun is None:
        return lambda f: JitStep(f, accelerator, **options)
    return JitStep(fun, accelerator, **options)
