"""A mesh shape (stage × data × fsdp × tensor) → a `jax.sharding.Mesh` over the accelerator's devices.

Devices are laid out with `tensor` innermost, so tensor-parallel groups are neighbours inside one
host (the fastest links), and `stage` outermost, so pipeline stages are what crosses hosts first
(they pass only activations between them). All axes are `AxisType.Auto`: XLA's SPMD partitioner
propagates shardings from parameters and constraints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from moai_jax.errors import FlavorError

AXES = ("stage", "data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshShape:
    """How many devices along each mesh axis: pipeline stages, replicas, parameter shards, tensor-parallel
    ranks. Keyword-only: `MeshShape(fsdp=8)`."""

    stage: int = 1
    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    @property
    def size(self) -> int:
        return self.stage * self.data * self.fsdp * self.tensor

    @property
    def batch_shards(self) -> int:
        """How many ways the batch is split (over `data` and `fsdp`)."""
        return self.data * self.fsdp

    def __str__(self) -> str:
        stage = f"stage={self.stage}," if self.stage > 1 else ""
        return f"{stage}data={self.data},fsdp={self.fsdp},tensor={self.tensor}"

    @classmethod
    def parse(cls, text: str) -> MeshShape:
        """`"stage=2,data=2,fsdp=2,tensor=2"` (axes left out are 1) → MeshShape."""
        sizes = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in AXES or not value.strip().isdigit() or int(value) < 1:
                raise FlavorError(f"mesh {text!r}: write it as stage=S,data=D,fsdp=F,tensor=T with whole numbers >= 1 "
                                 f"(axes left out are 1)")
            sizes[name] = int(value)
        return cls(**sizes)


def check_mesh(shape: MeshShape, flavor: int, *, batch_size: int | None = None, num_heads: int | None = None,
               num_kv_heads: int | None = None, micro_batches: int = 1, num_layers: int | None = None) -> None:
    """Raise a FlavorError saying what to change if this mesh cannot run on `flavor` devices."""
    if shape.size != flavor:
        raise FlavorError(f"mesh {shape} has {shape.size} devices but the flavor has {flavor}; "
                          f"make stage × data × fsdp × tensor = {flavor}")
    if num_layers is not None and num_layers % shape.stage:
        raise FlavorError(f"stage={shape.stage} does not divide the model's {num_layers} layers; "
                          f"choose stage from {divisors(num_layers)}")
    for heads, what in ((num_heads, "attention heads"), (num_kv_heads, "key/value heads")):
        if heads is not None and heads % shape.tensor:
            raise FlavorError(f"tensor={shape.tensor} does not divide the model's {heads} {what}; "
                              f"choose tensor from {divisors(heads)}")
    if batch_size is not None:
        if micro_batches < 1 or batch_size % micro_batches:
            raise FlavorError(f"micro-batches {micro_batches} must divide the batch size {batch_size}")
        per_micro = batch_size // micro_batches
        if per_micro % shape.batch_shards:
            raise FlavorError(
                f"batch size {batch_size} in {micro_batches} micro-batch(es) gives {per_micro} sequences per "
                f"micro-batch, which data × fsdp = {shape.batch_shards} devices cannot split evenly; use a batch "
                f"size that is a multiple of {shape.batch_shards * micro_batches}")


def make_mesh(shape: MeshShape, devices: Sequence[jax.Device]) -> Mesh:
    """The mesh over `devices` (ordered by host), tensor innermost so it stays inside a host."""
    if len(devices) != shape.size:
        raise FlavorError(f"mesh {shape} needs {shape.size} devices, got {len(devices)}")
    grid = np.asarray(devices, dtype=object).reshape(shape.stage, shape.data, shape.fsdp, shape.tensor)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def divisors(n: int) -> list[int]:
    """The whole numbers that divide n: the sizes an axis can take."""
    return [d for d in range(1, n + 1) if n % d == 0]


def default_mesh_shape(flavor: int) -> MeshShape:
    """Without a plan: every device holds a parameter shard and a slice of the batch (ZeRO-3)."""
    return MeshShape(fsdp=flavor)


