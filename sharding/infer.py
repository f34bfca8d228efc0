"""Parameter shardings for models whose parameters carry no logical names.

Each parameter is placed by the first of:
  1. the user's partition rules: `(regex on the parameter path, logical names or PartitionSpec)`, first
     match wins, in the style of t5x's and EasyDeL's partition rules. Logical names go through the one
     table of `rules.py` (so `mlp` or `heads` unlock tensor parallelism); a PartitionSpec names mesh axes;
  2. the logical names the model gave it (`nnx.Param(..., out_sharding=...)`), as for moai_jax's Decoder;
  3. its shape: sharded over `fsdp` along its largest dimension that `fsdp` divides, or kept whole when it
     is small (under `MIN_SHARDED_ELEMENTS`) or nothing divides.

Paths are the parameter's keys joined by "/", e.g. `blocks/0/attn/query/kernel`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from moai_jax.errors import ModelError
from moai_jax.sharding.rules import DEFAULT_RULES, LOGICAL_AXES, MESH_AXES, partition_spec

MIN_SHARDED_ELEMENTS = 4096  # smaller parameters (biases, norms) stay whole: gathering them costs more than they hold
Rule = tuple[str, Sequence[str | None] | PartitionSpec]


def parameter_paths(params: nnx.State) -> dict[str, tuple[tuple[int, ...], PartitionSpec]]:
    """path → (shape, the logical names the model gave it, P() when none), in the model's order."""
    names = dict(nnx.to_flat_state(nnx.get_partition_spec(params)))
    return {"/".join(map(str, path)): (tuple(v.shape), names[path].get_value())
            for path, v in nnx.to_flat_state(params)}


def check_rules(rules: Sequence[Rule] | None, paths: Mapping[str, tuple]) -> list[tuple[re.Pattern, Any]]:
    """The rules compiled, or a ModelError naming the rule to fix."""
    compiled = []
    for rule in rules or ():
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ModelError(f"partition rule {rule!r}: write it as (regex on the parameter path, logical names "
                             f"such as ('embed', 'mlp') or a PartitionSpec of mesh axes)")
        pattern, target = rule
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ModelError(f"partition rule {pattern!r} is not a regular expression: {e}") from None
        known = MESH_AXES if isinstance(target, PartitionSpec) else LOGICAL_AXES
        for entry in target:
            for name in entry if isinstance(entry, tuple) else (entry,):
                if name is not None and name not in known:
                    what = "mesh axis" if isinstance(target, PartitionSpec) else "logical axis"
                    raise ModelError(f"partition rule {pattern!r} names the unknown {what} {name!r}; use one of "
                                     f"{', '.join(known)} (or None)")
        matched = [p for p in paths if regex.search(p)]
        if not matched:
            shown = ", ".join(list(paths)[:6])
            raise ModelError(f"partition rule {pattern!r} matches no parameter; paths look like: {shown}")
        for path in matched:
            shape = paths[path][0]
            if len(target) != len(shape):
                raise ModelError(f"partition rule {pattern!r} gives {len(target)} dimension(s) but {path} has shape "
                                 f"{shape}; give one name (or None) per dimension")
        compiled.append((regex, target))
    return compiled


def _inferred(shape: tuple[int, ...], mesh_shape: Mapping[str, int]) -> PartitionSpec:
    fsdp = mesh_shape.get("fsdp", 1)
    if fsdp == 1 or math.prod(shape) < MIN_SHARDED_ELEMENTS:
        return PartitionSpec()
    divisible = [d for d, size in enumerate(shape) if size % fsdp == 0]
    if not divisible:
        return PartitionSpec()
    largest = max(divisible, key=lambda d: shape[d])  # the first, among equals
    return PartitionSpec(*("fsdp" if d == largest else None for d in range(len(shape))))


def _mesh_spec(target: PartitionSpec, shape: tuple[int, ...], mesh_shape: Mapping[str, int]) -> PartitionSpec:
    """A rule's PartitionSpec on this mesh: axes of size 1, or that do not divide the dimension, left out."""
    spec = []
    for entry, size in zip(target, shape):
        axes = []
        for axis in entry if isinstance(entry, tuple) else (entry,):
            n = mesh_shape.get(axis, 1) if axis else 1
            if n > 1 and size % (math.prod(mesh_shape[a] for a in axes) * n) == 0:
                axes.append(axis)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def parameter_specs(paths: Mapping[str, tuple], mesh_shape: Mapping[str, int], rules: Sequence[Rule] | None = None
                    ) -> dict[str, tuple[PartitionSpec, str]]:
    """path → (PartitionSpec over the mesh, where it came from), for a mesh of these axis sizes."""
    compiled = check_rules(rules, paths)
    out = {}
    for path, (shape, names) in paths.items():
        rule = next(((r, t) for r, t in compiled if r.search(path)), None)
        if rule is not None:
            regex, target = rule
            spec = (_mesh_spec(target, shape, mesh_shape) if isinstance(target, PartitionSpec)
                    else partition_spec(tuple(target), shape, mesh_shape, DEFAULT_RULES))
            out[path] = (spec, f"rule {regex.pattern!r} {tuple(target)}")
        elif names != PartitionSpec():
            names = tuple(names) + (None,) * (len(shape) - len(names))
            out[path] = (partition_spec(names, shape, mesh_shape), f"logical names {names}")
        else:
            spec = _inferred(shape, mesh_shape)
            small = math.prod(shape) < MIN_SHARDED_ELEMENTS
            out[path] = (spec, "inferred, small" if small and mesh_shape.get("fsdp", 1) > 1 else "inferred")
    return out


def parameter_shardings(params: nnx.State, mesh, rules: Sequence[Rule] | None = None) -> Any:
    """A pure dict of NamedShardings shaped like `nnx.to_pure_dict(params)`."""
    specs = parameter_specs(parameter_paths(params), dict(mesh.shape), rules)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: NamedSharding(mesh, specs["/".join(str(k.key) for k in path)][0]), nnx.to_pure_dict(params))


def origins(specs: Mapping[str, tuple[PartitionSpec, str]]) -> dict[str, str]:
    """path → "where it came from → PartitionSpec", JSON-able (the Plan's `parameter_shardings`)."""
    return {path: f"{origin} → {spec}" for path, (spec, origin) in specs.items()}


def describe(shardings: Mapping[str, str], limit: int = 12) -> str:
    """The lines `print(plan)` shows: how many shardings came from rules, names, shapes; then each one."""
    kinds = {"rule": 0, "logical": 0, "inferred": 0}
    for origin in shardings.values():
        kinds[origin.split(" ", 1)[0].rstrip(",")] += 1
    head = (f"parameter shardings: {kinds['rule']} from rules, {kinds['logical']} from logical names, "
            f"{kinds['inferred']} inferred from shapes (under {MIN_SHARDED_ELEMENTS} elements: whole)")
    lines = [f"  {path}: {origin}" for path, origin in list(shardings.items())[:limit]]
    if len(shardings) > limit:
        lines.append(f"  ... and {len(shardings) - limit} more (plan.parameter_shardings)")
    return "\n".join([head, *lines])
