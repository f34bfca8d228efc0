"""A mesh shape (stage × data × fsdp × expert × context × tensor) → a `jax.sharding.Mesh` over the devices.

Devices are laid out with `tensor` innermost, so tensor-parallel groups are neighbours inside one
host (the fastest links), then `context` and `expert` (whose all-gathers and all-to-alls want fast
links too), and `stage` outermost, so pipeline stages are what crosses hosts first (they pass only
activations between them). All axes are `AxisType.Auto`: XLA's SPMD partitioner
propagates shardings from parameters and constraints.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from moai_jax.errors import FlavorError

AXES = ("stage", "data", "fsdp", "expert", "context", "tensor")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshShape:
    """How many devices along each mesh axis: pipeline stages, replicas, parameter shards, experts of MoE
    layers, slices of the sequence, tensor-parallel ranks. Keyword-only: `MeshShape(fsdp=8)`."""

    stage: int = 1
    data: int = 1
    fsdp: int = 1
    expert: int = 1
    context: int = 1
    tensor: int = 1

    @property
    def size(self) -> int:
        return math.prod(self.sizes().values())

    @property
    def batch_shards(self) -> int:
        """How many ways the batch's sequences are split (over `data`, `fsdp` and, outside MoE layers, `expert`)."""
        return self.data * self.fsdp * self.expert

    def sizes(self) -> dict[str, int]:
        """Every axis's size, outermost first."""
        return {axis: getattr(self, axis) for axis in AXES}

    def __str__(self) -> str:
        """Stage, expert and context are shown only when used, so a dense mesh reads `data=8,fsdp=1,tensor=1`."""
        return ",".join(f"{axis}={n}" for axis, n in self.sizes().items()
                        if n > 1 or axis in ("data", "fsdp", "tensor"))

    @classmethod
    def parse(cls, text: str) -> MeshShape:
        """`"stage=2,data=2,fsdp=2,tensor=2"` (axes left out are 1) → MeshShape."""
        sizes = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in AXES or not value.strip().isdigit() or int(value) < 1:
                raise FlavorError(f"mesh {text!r}: write it as axis=size pairs such as fsdp=4,tensor=2, with axes from "
                                  f"{', '.join(AXES)} and whole numbers >= 1 (axes left out are 1)")
            sizes[name] = int(value)
        return cls(**sizes)


def check_mesh(shape: MeshShape, flavor: int, *, batch_size: int | None = None, num_heads: int | None = None,
               num_kv_heads: int | None = None, micro_batches: int = 1, num_layers: int | None = None,
               num_experts: int | None = None, seq_len: int | None = None) -> None:
    """Raise a FlavorError saying what to change if this mesh cannot run on `flavor` devices."""
    if shape.size != flavor:
        raise FlavorError(f"mesh {shape} has {shape.size} devices but the flavor has {flavor}; "
                          f"make {' × '.join(AXES)} = {flavor}")
    if num_layers is not None and num_layers % shape.stage:
        raise FlavorError(f"stage={shape.stage} does not divide the model's {num_layers} layers; "
                          f"choose stage from {divisors(num_layers)}")
    for heads, what in ((num_heads, "attention heads"), (num_kv_heads, "key/value heads")):
        if heads is not None and heads % shape.tensor:
            raise FlavorError(f"tensor={shape.tensor} does not divide the model's {heads} {what}; "
                              f"choose tensor from {divisors(heads)}")
    if shape.expert > 1 and not num_experts:
        raise FlavorError(f"expert={shape.expert} splits the experts of Mixture-of-Experts layers, which this model "
                          f"has none of; use expert=1")
    if shape.expert > 1 and num_experts % shape.expert:
        raise FlavorError(f"expert={shape.expert} does not divide the model's {num_experts} experts; "
                          f"choose expert from {divisors(num_experts)}")
    if seq_len is not None and shape.context > 1 and seq_len % (2 * shape.context):
        raise FlavorError(f"context={shape.context} splits each sequence into 2 × {shape.context} chunks, which the "
                          f"block size {seq_len} does not divide; use a block size that is a multiple of "
                          f"{2 * shape.context}")
    if batch_size is not None:
        if micro_batches < 1 or batch_size % micro_batches:
            raise FlavorError(f"micro-batches {micro_batches} must divide the batch size {batch_size}")
        multiple = shape.batch_shards * micro_batches
        if batch_size % multiple:
            knobs = [f"{axis} {n}" for axis, n in (("data", shape.data), ("fsdp", shape.fsdp),
                                                   ("expert", shape.expert)) if n > 1]
            knobs += [f"micro-batches {micro_batches}"] if micro_batches > 1 else []
            raise FlavorError(f"batch size {batch_size} must split into {' × '.join(knobs) or '1'} = {multiple} equal "
                              f"parts (every micro-batch is split over data × fsdp × expert); use "
                              f"{nearest_multiples(batch_size, multiple)}")


def nearest_multiples(n: int, multiple: int) -> str:
    """The multiples of `multiple` nearest to n, in words: "32", or "16 or 32"."""
    below = n // multiple * multiple
    return f"{below} or {below + multiple}" if below else f"{multiple}"


def make_mesh(shape: MeshShape, devices: Sequence[jax.Device]) -> Mesh:
    """The mesh over `devices` (ordered by host), tensor innermost so it stays inside a host."""
    if len(devices) != shape.size:
        raise FlavorError(f"mesh {shape} needs {shape.size} devices, got {len(devices)}")
    grid = np.asarray(devices, dtype=object).reshape(tuple(shape.sizes().values()))
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def divisors(n: int) -> list[int]:
    """The whole numbers that divide n: the sizes an axis can take."""
    return [d for d in range(1, n + 1) if n % d == 0]


def default_mesh_shape(flavor: int) -> MeshShape:
    """Without a plan: every device holds a parameter shard and a slice of the batch (ZeRO-3)."""
    return MeshShape(fsdp=flavor)


