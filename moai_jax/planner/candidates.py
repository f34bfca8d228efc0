"""Candidates: every way to lay one step over the flavor, honoring the knobs the user fixed.

stage × data × fsdp × expert × context × tensor = flavor (stages dividing the layers; expert dividing
a MoE model's experts; context splitting each sequence into 2 × context chunks; tensor
inside one host and dividing the key/value heads), × remat (none / matmuls / full), × micro-batches (dividing the batch
so every micro-batch splits evenly over data × fsdp × expert; at least one per stage under a pipeline),
× loss (whole logits, or chunked over the sequence); the optimizer state on the devices, or in host memory
where the search asks for it (`Fixed.offload_optimizer`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

from moai_jax.errors import FlavorError
from moai_jax.models import ModelConfig
from moai_jax.models.llama import REMAT_POLICIES
from moai_jax.planner.plan import LOSS_MODES
from moai_jax.sharding.mesh import AXES as MESH_AXES
from moai_jax.sharding.mesh import MeshShape, divisors
from moai_jax.train import LOSS_CHUNK


@dataclasses.dataclass(frozen=True)
class Fixed:
    """The knobs a user fixed (None: automatic)."""

    data: int | None = None
    fsdp: int | None = None
    tensor: int | None = None
    micro_batches: int | None = None
    remat: str | None = None
    loss: str | None = None
    stage: int | None = None
    expert: int | None = None
    context: int | None = None
    offload_optimizer: bool | None = None  # None: on the devices, in host memory only where nothing fits there


@dataclasses.dataclass(frozen=True)
class Candidate:
    mesh: MeshShape
    micro_batches: int
    remat: str
    loss: str
    offload_optimizer: bool = False

    @property
    def key(self) -> tuple:
        """A total order, so ties are broken the same way every time."""
        m = self.mesh
        return (*m.sizes().values(), self.micro_batches, self.remat, self.loss, self.offload_optimizer)

    def describe(self) -> str:
        where = ", optimizer state in host memory" if self.offload_optimizer else ""
        return f"mesh {self.mesh}, {self.micro_batches} micro-batch(es), remat {self.remat}, loss {self.loss}{where}"


def check_fixed(fixed: Fixed, flavor: int, config: ModelConfig, batch_size: int, seq_len: int,
                devices_per_host: int) -> None:
    """A FlavorError naming the knob to change when the fixed knobs cannot work together."""
    for name in (*MESH_AXES, "micro_batches"):
        value = getattr(fixed, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise FlavorError(f"{name}={value!r}: give a whole number >= 1, or leave it automatic")
    if fixed.remat is not None and fixed.remat not in REMAT_POLICIES:
        raise FlavorError(f"remat={fixed.remat!r}: choose one of {', '.join(REMAT_POLICIES)}")
    if fixed.loss is not None and fixed.loss not in LOSS_MODES:
        raise FlavorError(f"loss={fixed.loss!r}: choose one of {', '.join(LOSS_MODES)}")
    axes = {k: getattr(fixed, k) for k in MESH_AXES if getattr(fixed, k) is not None}
    product = 1
    for v in axes.values():
        product *= v
    every = len(axes) == len(MESH_AXES)
    if flavor % product or (every and product != flavor):
        shown = " × ".join(f"{k}={v}" for k, v in axes.items())
        raise FlavorError(f"fixed mesh axes {shown} = {product} devices do not "
                          f"{'make' if every else 'divide'} the flavor's {flavor}; "
                          f"choose axes whose product {'is' if every else 'divides'} {flavor}")
    if fixed.stage is not None and config.num_layers % fixed.stage:
        raise FlavorError(f"stage={fixed.stage} does not divide the model's {config.num_layers} layers; "
                          f"choose stage from {divisors(config.num_layers)}")
    if fixed.expert not in (None, 1) and not config.num_experts:
        raise FlavorError(f"expert={fixed.expert} splits the experts of Mixture-of-Experts layers, which "
                          f"{config.model_type} has none of; use expert=1")
    if fixed.expert is not None and config.num_experts and config.num_experts % fixed.expert:
        raise FlavorError(f"expert={fixed.expert} does not divide the model's {config.num_experts} experts; "
                          f"choose expert from {divisors(config.num_experts)}")
    if fixed.context is not None and seq_len % (2 * fixed.context):
        raise FlavorError(f"context={fixed.context} splits each sequence into 2 × {fixed.context} chunks, which the "
                          f"block size {seq_len} does not divide; use a block size that is a multiple of "
                          f"{2 * fixed.context}")
    if fixed.tensor is not None:
        if config.num_kv_heads % fixed.tensor or config.num_heads % fixed.tensor:
            raise FlavorError(f"tensor={fixed.tensor} does not divide the model's {config.num_kv_heads} key/value "
                              f"heads; choose tensor from {divisors(config.num_kv_heads)}")
        if fixed.tensor > devices_per_host and flavor > devices_per_host:
            raise FlavorError(f"tensor={fixed.tensor} exceeds the {devices_per_host} devices of one host; tensor "
                              f"parallelism stays inside a host")
    if fixed.micro_batches is not None and batch_size % fixed.micro_batches:
        raise FlavorError(f"micro_batches={fixed.micro_batches} does not divide the batch size {batch_size}; "
                          f"choose from {divisors(batch_size)}")
    if fixed.loss == "chunked" and seq_len % LOSS_CHUNK and seq_len > LOSS_CHUNK:
        raise FlavorError(f"loss='chunked' needs a sequence length that is a multiple of {LOSS_CHUNK}, "
                          f"not {seq_len}")


def contexts(flavor: int, seq_len: int | None, fixed: Fixed = Fixed()) -> list[int]:
    """The context degrees to try: the fixed one, else every one whose 2 × context chunks split the
    sequence (the time model charges its K/V gathers to the link it spans: inside a host or across)."""
    if fixed.context is not None or seq_len is None:
        return [fixed.context or 1]
    return [c for c in divisors(flavor) if seq_len % (2 * c) == 0 or c == 1]


def meshes(flavor: int, config: ModelConfig, devices_per_host: int, fixed: Fixed = Fixed(),
           seq_len: int | None = None) -> Iterator[MeshShape]:
    """Every stage × data × fsdp × expert × context × tensor = flavor allowed by the model, the hosts and
    the fixed axes (context only when fixed unless `seq_len` is given)."""
    contexts_ = contexts(flavor, seq_len, fixed)
    for tensor in divisors(flavor):
        if config.num_kv_heads % tensor or config.num_heads % tensor:
            continue
        if tensor > 1 and (tensor > devices_per_host or devices_per_host % tensor) and flavor > devices_per_host:
            continue
        for context in (c for c in contexts_ if (flavor // tensor) % c == 0):
            for expert in divisors(math.gcd(flavor // tensor // context, config.num_experts or 1)):
                rest = flavor // tensor // context // expert
                for stage in divisors(rest):
                    if config.num_layers % stage:
                        continue
                    for fsdp in divisors(rest // stage):
                        mesh = MeshShape(stage=stage, data=rest // stage // fsdp, fsdp=fsdp, expert=expert,
                                         context=context, tensor=tensor)
                        if all(getattr(fixed, a) in (None, getattr(mesh, a)) for a in MESH_AXES):
                            yield mesh


def candidates(flavor: int, config: ModelConfig, batch_size: int, seq_len: int, devices_per_host: int,
               fixed: Fixed = Fixed()) -> list[Candidate]:
    """Every candidate, in a fixed order (the planner's ranking is deterministic)."""
    remats = [fixed.remat] if fixed.remat else list(REMAT_POLICIES)
    chunkable = seq_len > LOSS_CHUNK and seq_len % LOSS_CHUNK == 0
    losses = [fixed.loss] if fixed.loss else ["whole", "chunked"] if chunkable else ["whole"]
    out = []
    for mesh in meshes(flavor, config, devices_per_host, fixed, seq_len):
        for mb in [fixed.micro_batches] if fixed.micro_batches else divisors(batch_size):
            if (batch_size // mb) % mesh.batch_shards or batch_size % mb:
                continue
            if mesh.stage > 1 and mb < mesh.stage and not fixed.micro_batches:
                continue  # a pipeline with fewer micro-batches than stages leaves stages idle
            out.extend(Candidate(mesh, mb, remat, loss, bool(fixed.offload_optimizer)) for remat in remats
                       for loss in losses)
    return out


def batch_split_error(batch_size: int, fixed: Fixed, splits: Callable[[int], object]) -> FlavorError:
    """No layout splits this batch under the fixed knobs: an error naming them and the nearest batch sizes
    that `splits` (rows → the layouts that split them; empty when none) accepts."""
    knobs = ", ".join(f"{name}={getattr(fixed, name)}" for name in ("stage", "data", "fsdp", "expert", "micro_batches")
                      if getattr(fixed, name) not in (None, 1))
    reach = 2 * batch_size + 64 * math.prod(getattr(fixed, n) or 1 for n in ("stage", "data", "fsdp", "expert",
                                                                              "micro_batches"))
    below = next((rows for rows in range(batch_size - 1, 0, -1) if splits(rows)), None)
    above = next((rows for rows in range(batch_size + 1, reach) if splits(rows)), None)
    nearest = " or ".join(str(rows) for rows in (below, above) if rows)
    return FlavorError(f"batch size {batch_size} cannot be split with {knobs or 'this flavor'} (every micro-batch is "
                       f"split over data × fsdp × expert, and a pipeline needs a micro-batch per stage); "
                       f"{f'the nearest batch sizes that can are {nearest}' if nearest else 'change the fixed knobs'}")
