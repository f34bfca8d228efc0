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


def mesh_axis(name: str, size: int) -> str | tuple[str, ...] | None:
    """The mesh axis (or axes) that a dimension of `size` named `name` is split over in the active
    logical sharding; None outside one or when it is not split."""
    active = _ACTIVE.get()
    if active is None:
        return None
    mesh, rules = active
    return partition_spec((name,), (size,), dict(mesh.shape), rules)[0]
