"""What each argument of a step of your own is, where its leaves go, and what the step returns of it.

    static   named by `static_argnums` / `static_argnames`: part of the compiled step;
    module   an nnx graph node (Module, Optimizer, metrics): updated in place after every call;
    batch    a pytree whose arrays all share a leading dimension (or named in `batch_argnames`): that axis
             is split over the data axes, each process passing its own rows;
    state    any other pytree (a TrainState, a dict of parameters).

Parameters (nnx.Param, or what sits under `params` in a pytree; all of a pytree with no `params`) are
placed by `moai_jax.sharding.infer`; every other array of the state follows the parameter whose path
ends its own with the same shape (Adam's moments, EMA weights), or is placed by its own shape. Paths
start with the argument's name: `model/linear/kernel`, `state/params/Dense_0/kernel`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from moai_jax.errors import ModelError
from moai_jax.sharding.infer import parameter_paths, parameter_specs
from moai_jax.sharding.rules import partition_spec

SCALARS = (bool, int, float, complex, np.ndarray, np.generic, jax.Array)


@dataclasses.dataclass
class Argument:
    """One argument of a call: what kind it is and its leaves; their paths and which are parameters only
    when a step is compiled (they cost a walk of the model's graph)."""

    name: str
    kind: str  # "static", "module", "batch" or "state"
    value: Any
    graphdef: Any = None  # modules: the nnx GraphDef
    treedef: Any = None
    leaves: tuple = ()
    tree: Any = None  # what was flattened: the module's nnx State, or the pytree itself

    @functools.cached_property
    def paths(self) -> tuple[str, ...]:
        flat = jax.tree_util.tree_flatten_with_path(self.tree)[0]
        drop = 1 if self.kind == "module" else 0  # a module's last key is the Variable's value
        return tuple("/".join([self.name, *key_parts(k)[:len(k) - drop]]) for k, _ in flat)

    @functools.cached_property
    def params(self) -> dict[str, tuple]:
        """The parameters: path → (shape, logical names)."""
        if self.kind == "module":
            return {f"{self.name}/{p}": v for p, v in parameter_paths(nnx.state(self.value, nnx.Param)).items()}
        if self.kind != "state":
            return {}
        under = [p for p in self.paths if "params" in p.split("/")[1:]]
        return {p: (np.shape(x), PartitionSpec()) for p, x in zip(self.paths, self.leaves) if p in under or not under}

    @property
    def signature(self) -> tuple:
        """What decides the compiled step: its structure, shapes and dtypes (or a static argument's value)."""
        if self.kind == "static":
            return self.value
        return self.graphdef, self.treedef, tuple((np.shape(x), dtype_of(x), weak_of(x)) for x in self.leaves)

    def abstract(self, shardings=None) -> list[jax.ShapeDtypeStruct]:
        """The leaves' global shapes: a batch's rows are this process's, the rows of every process make it."""
        shardings = shardings or [None] * len(self.leaves)
        return [jax.ShapeDtypeStruct(global_shape(np.shape(x)) if self.kind == "batch" else np.shape(x), dtype_of(x),
                                     weak_type=weak_of(x), sharding=s) for x, s in zip(self.leaves, shardings)]

    def rebuild(self, leaves):
        tree = jax.tree.unflatten(self.treedef, leaves)
        return nnx.merge(self.graphdef, tree) if self.kind == "module" else tree


def global_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0] * jax.process_count(), *shape[1:])


def dtype_of(x) -> np.dtype:
    return jax.dtypes.canonicalize_dtype(x.dtype if hasattr(x, "dtype") else np.result_type(x),
                                         allow_extended_dtype=True)  # random keys too


def weak_of(x) -> bool:
    return bool(getattr(x, "weak_type", not hasattr(x, "dtype")))


def key_parts(keypath) -> list[str]:
    """A JAX key path as strings: dict keys, sequence indices, attribute names."""
    return [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keypath]


def argument(name: str, value, batch_names: Iterable[str] | None) -> Argument:
    """What the argument `name` is (module, batch or state) and its leaves; a ModelError for a leaf that is
    not an array."""
    if nnx.graph.is_graph_node(value):
        graphdef, state = nnx.split(value)
        leaves, treedef = jax.tree.flatten(state)
        arg = Argument(name, "module", value, graphdef, treedef, tuple(leaves), state)
    else:
        leaves, treedef = jax.tree.flatten(value)
        rows = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
        shared_rows = bool(leaves) and None not in rows and len(rows) == 1
        is_batch = name in batch_names if batch_names is not None else shared_rows
        arg = Argument(name, "batch" if is_batch else "state", value, None, treedef, tuple(leaves), value)
    wrong = next((i for i, x in enumerate(arg.leaves) if not isinstance(x, SCALARS)), None)
    if wrong is not None:
        raise ModelError(f"argument {name!r} holds a {type(arg.leaves[wrong]).__name__} at {arg.paths[wrong]}, where "
                         f"the step needs an array: make it an array (jnp.asarray), or name {name!r} in "
                         f"static_argnames")
    return arg


def followed(args: Sequence[Argument]) -> dict[str, str]:
    """Every non-parameter leaf of state → the parameter whose path ends its own, with the same shape."""
    by_tail: dict[tuple, dict[tuple, str]] = {}  # a parameter's path inside its model → {its shape: its path}
    for a in args:
        for path, (shape, _) in a.params.items():
            parts = path.split("/")[1:]
            tail = parts[parts.index("params") + 1:] if "params" in parts else parts
            by_tail.setdefault(tuple(tail), {}).setdefault(tuple(shape), path)
    leaders = {}
    for a in args:
        for path, x in zip(a.paths, a.leaves):
            if a.kind == "batch" or path in a.params:
                continue
            parts = path.split("/")
            leader = next((by_tail[tail][np.shape(x)] for tail in (tuple(parts[i:]) for i in range(1, len(parts)))
                           if np.shape(x) in by_tail.get(tail, {})), None)
            if leader is not None:
                leaders[path] = leader
    return leaders


@dataclasses.dataclass
class Call:
    """A call's arguments, what identifies its compiled step, and the global rows of its batch."""

    bound: inspect.BoundArguments
    args: list[Argument]
    rows: int | None
    outputs: tuple | None = None  # (returned state: name → where in the output, the output's shapes)

    @property
    def key(self) -> tuple:
        """What decides the compiled step: static values, tree structures, shapes and dtypes."""
        return tuple((a.name, a.kind, a.signature) for a in self.args)

    def dynamic(self) -> list[Argument]:
        return [a for a in self.args if a.kind != "static"]

    def shardings(self, mesh, rules=None) -> dict[str, list[NamedSharding]]:
        """Where every leaf of every dynamic argument goes on `mesh`, by argument name."""
        sizes = dict(mesh.shape)
        state = [a for a in self.dynamic() if a.kind != "batch"]
        params = {p: v for a in state for p, v in a.params.items()}
        specs = {p: spec for p, (spec, _) in parameter_specs(params, sizes, rules).items()}
        leaders = followed(state)
        others = {p: (np.shape(x), PartitionSpec()) for a in state for p, x in zip(a.paths, a.leaves)
                  if p not in specs and p not in leaders}
        specs.update({p: spec for p, (spec, _) in parameter_specs(others, sizes).items()})
        specs.update({p: specs[leader] for p, leader in leaders.items()})
        out = {}
        for a in self.dynamic():
            if a.kind == "batch":
                out[a.name] = [NamedSharding(mesh, partition_spec(("batch",), global_shape(np.shape(x))[:1], sizes))
                               for x in a.leaves]
            else:
                out[a.name] = [NamedSharding(mesh, specs[p]) for p in a.paths]
        return out

    def returned(self, trace: Callable) -> tuple[dict[str, tuple], Any]:
        """State arguments the step returns: name → where in its output (() the output itself, (i,) its i-th);
        and the output's shapes. `trace(abstract leaves of each dynamic argument)` → (output, modules' new
        leaves). Traced once per call signature; a ModelError where state changes structure or shape."""
        if self.outputs is not None:
            return self.outputs
        dynamic = self.dynamic()
        out, updated = jax.eval_shape(trace, [a.abstract() for a in dynamic])
        for a, leaves in zip([a for a in dynamic if a.kind == "module"], updated):
            check_same(a, leaves)
        elements = [((), out)] + ([((i,), o) for i, o in enumerate(out)] if isinstance(out, (tuple, list)) else [])
        found = {}
        for a in dynamic:
            if a.kind != "state" or jax.tree_util.treedef_is_leaf(a.treedef):  # a bare scalar matches any scalar
                continue
            same = [where for where, o in elements if jax.tree.structure(o) == a.treedef]
            alike = [o for _, o in elements if looks_like(o, a.value)]
            if not same and alike:
                raise ModelError(changed(a, ["/".join([a.name, *key_parts(k)])
                                              for k, _ in jax.tree_util.tree_flatten_with_path(alike[0])[0]]))
            others = [b for b in dynamic if b is not a and b.treedef == a.treedef]
            if len(same) == 1 and not others:
                check_same(a, jax.tree.leaves(elements[[w for w, _ in elements].index(same[0])][1]))
                found[a.name] = same[0]
        self.outputs = (found, out)
        return self.outputs


def check_same(a: Argument, leaves) -> None:
    """A ModelError where the step returns `a` with a leaf of another shape or dtype."""
    for path, x, y in zip(a.paths, a.leaves, leaves):
        if (np.shape(x), dtype_of(x)) != (y.shape, y.dtype):
            raise ModelError(f"the step returns argument {a.name!r} with {path} as {y.dtype}{list(y.shape)}, but it "
                             f"received {dtype_of(x)}{list(np.shape(x))}; return the state with the shapes and dtypes "
                             f"it came with")


def looks_like(out, value) -> bool:
    """An output of the same kind as a state argument (its class, or a dict with its keys)."""
    if isinstance(value, dict):
        return isinstance(out, dict) and set(out) == set(value)
    return type(out) is type(value) and not isinstance(value, (tuple, list))


def changed(a: Argument, after: Sequence[str]) -> str:
    """The message for a step that returns `a` with other paths (`after`) than it received."""
    gone, new = [p for p in a.paths if p not in after], [p for p in after if p not in a.paths]
    shown = "; ".join(filter(None, [f"gone: {', '.join(gone[:3])}" if gone else "",
                                    f"new: {', '.join(new[:3])}" if new else ""])) or "its tree differs"
    return (f"the step returns argument {a.name!r} with another structure than it received ({shown}); a step must "
            f"keep its state's structure from call to call (create every variable and optimizer state before the "
            f"first step)")
