"""Logical axis names → mesh axes: the one place where strategy meets model.

Model code names its dimensions with the logical vocabulary below and never a mesh axis. One table
maps each logical name to the mesh axes it may be split over. Walking a tensor's names left to
right, a mesh axis is used at most once, so `batch` takes `data`, `fsdp` and `expert` for activations
while a parameter's `embed` takes `fsdp` (and `expert` and `context`, so their devices hold no extra
copies; an expert's weights give `expert` to their `experts` dimension first); stacked layers split
over `stage` into the pipeline's stages. An axis of size 1, or one that does not divide the
dimension, is left out, so the table holds for every mesh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from moai_jax.sharding.mesh import AXES

LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers", "experts")
MESH_AXES = AXES

DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),  # outside MoE layers the expert axis's devices split the batch too
    "length": ("context",),  # per-token work needs no communication; attention gathers or rings keys/values
    "embed": ("fsdp", "expert", "context"),  # parameters are sharded over every axis that splits activations
    "experts": ("expert",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor", "stage"),  # under a pipeline, each stage holds and computes a slice of the head
    "layers": ("stage",),  # pipeline stages hold consecutive groups of layers
    "rank": (),  # a LoRA adapter's rank: never split
}


def partition_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh_shape: Mapping[str, int],
    rules: Mapping[str, tuple[str, ...]] = DEFAULT_RULES,
) -> PartitionSpec:
    """The PartitionSpec of a tensor whose dimensions carry these logical names."""
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        if name is not None and name not in rules:
            raise ValueError(f"unknown logical axis {name!r}; known: {', '.join(rules)}")
        axes = []
        for axis in rules.get(name, ()) if name else ():
            n = mesh_shape.get(axis, 1)
            if axis in used or n == 1 or size % (math.prod(mesh_shape[a] for a in axes) * n):
                continue
            axes.append(axis)
            used.add(axis)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def tree_shardings(logical_specs, shapes, mesh, rules: Mapping[str, tuple[str, ...]] = DEFAULT_RULES):
    """NamedShardings for a tree of arrays (`shapes`: anything with .shape) whose logical names are given
    by a matching tree of PartitionSpecs of logical names (as `nnx.get_partition_spec` returns)."""
    def one(names, shape):
        names = tuple(names) + (None,) * (len(shape.shape) - len(names))
        return NamedSharding(mesh, partition_spec(names, shape.shape, dict(mesh.shape), rules))

    return jax.tree.map(one, logical_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))
