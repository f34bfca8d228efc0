"""Sharding constraints on activations, by logical name.

Models call `constrain(x, ("batch", "length", "embed"))` at layer boundaries and know nothing of
meshes. The train step traces the model inside `logical_sharding(mesh)`, which turns those names
into constraints for XLA's SPMD partitioner; outside it (plain single-device use) they do nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding

from moai_jax.sharding.rules import DEFAULT_RULES, partition_spec

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Mapping[str, tuple[str, ...]]] | None] = contextvars.ContextVar(
    "moai_jax_logical_sharding", default=None
)


@contextlib.contextmanager
def logical_sharding(mesh: Mesh, rules: Mapping[str, tuple[str, ...]] = DEFAULT_RULES) -> Iterator[None]:
    """Within this block, `constrain` shards activations over `mesh` by `rules`."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrain `x`, whose dimensions carry these logical names, to its sharding (if any is active)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = partition_spec(names, x.shape, dict(mesh.shape), rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


_MAPPED: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("moai_jax_mapped_axes", default=())


@contextlib.contextmanager
def mapped_over(axis: str | tuple[str, ...] | None) -> Iterator[None]:
    """Within this block, code runs under a `jax.vmap` whose `spmd_axis_name` is `axis` (a pipeline's
    stages): a `jax.shard_map` inside must be manual over it too (`manual_axes`)."""
    axes = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
    token = _MAPPED.set(_MAPPED.get() + axes)
    try:
        yield
    finally:
        _MAPPED.reset(token)


def manual_axes(*axes: str) -> set[str]:
    """The mesh axes a `jax.shard_map` over `axes` must be manual over here: those, and any that an
    enclosing vmap maps over the mesh (`mapped_over`)."""
    return set(axes) | set(_MAPPED.get())


def active_mesh() -> Mesh | None:
    """The mesh of the active logical sharding (None outside one): for layers that run explicit
    collectives in a `jax.shard_map` (context parallelism's all-gathered keys and values)."""
    active = _ACTIVE.get()
    return None if active is None else active[0]


def mesh_axis(name: str, size: int) -> str | tuple[str, ...] | None:
    """The mesh axis (or axes) that a dimension of `size` named `name` is split over in the active
    logical sharding; None outside one or when it is not split."""
    active = _ACTIVE.get()
    if active is None:
        return None
    mesh, rules = active
    return partition_spec((name,), (size,), dict(mesh.shape), rules)[0]
