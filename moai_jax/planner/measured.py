"""The planner for models it has no formula for: candidates measured by compiling them, as MoAI's AP does.

    candidates  data × fsdp (× tensor where the partition rules split a dimension over it) × micro-batches
                × remat (jax.checkpoint around the model's loss: none, or keep only the matmuls)
    estimate    per device, without compiling: parameters, gradients and optimizer state exactly, from each
                candidate's shardings; activations from what the model's backward keeps (the residuals of
                `jax.vjp`, traced at two batch sizes); time from 6 × parameters × tokens FLOPs and the
                data / fsdp / tensor traffic over the hardware's links
    compile     the few best (fastest first among those estimated to fit) on abstract inputs: XLA's
                memory analysis says whether they fit, its cost analysis gives their FLOPs per device
    choose      the fastest compiled candidate that fits
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping

import jax
from flax import nnx

from moai_jax.accelerator import Accelerator, Hardware
from moai_jax.errors import FlavorError, NoPlanFits
from moai_jax.planner.candidates import Candidate, Fixed, batch_split_error
from moai_jax.planner.plan import Plan
from moai_jax.planner.search import Scored
from moai_jax.planner.time_model import (MICRO_BATCH_OVERHEAD, OVERLAP, PEAK_EFFICIENCY, link_bandwidth,
                                        split_efficiency)
from moai_jax.sharding.infer import origins, parameter_paths, parameter_specs
from moai_jax.sharding.mesh import MeshShape, divisors
from moai_jax.sizes import format_bytes
from moai_jax.step import Verified
from moai_jax.train import CHECKPOINT_POLICIES, model_loss

COMPILE_FEW = 3  # candidates compiled when the first ones fit
MAX_COMPILES = 6  # candidates compiled before giving up
REMAT_FLOPS = {"none": 1.0, "matmuls": 1.05}  # training FLOPs relative to no recompute
SIMPLER_WITHIN = 0.02  # compiled candidates this close to the fastest: the simplest is chosen


@dataclasses.dataclass(frozen=True)
class Profile:
    """What the planner knows of a model without compiling it."""

    paths: dict  # parameter path → (shape, logical names)
    param_bytes: dict[str, int]
    optimizer_per_param_byte: float
    activation_bytes_per_example: dict[str, float]  # by remat: what backward keeps, per example of the batch


def _order(s: Scored) -> tuple:
    """Fastest first; among equals the simplest."""
    return (round(s.seconds["total"], 9), *s.simplicity)


def _describe(s: Scored) -> dict:
    c = s.candidate
    return {"mesh": c.mesh.sizes(), "micro_batches": c.micro_batches, "remat": c.remat, "loss": c.loss,
            "estimated_bytes_per_device": s.memory["total"], "estimated_step_seconds": round(s.seconds["total"], 6)}


def profile(abstract: nnx.Module, optimizer, batch: Mapping[str, jax.ShapeDtypeStruct], loss_fn, remats) -> Profile:
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    shapes = nnx.to_pure_dict(params)
    paths = parameter_paths(params)
    sizes = {"/".join(map(str, path)): v.get_value().size * v.get_value().dtype.itemsize
             for path, v in nnx.to_flat_state(params)}
    opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(optimizer.init, shapes)))
    loss = model_loss(abstract, loss_fn)
    rest = nnx.to_pure_dict(rest)

    def kept(rows: int, remat: str) -> int:
        """Bytes of the residuals backward keeps, for a batch of `rows` examples."""
        def objective(p, b):
            return loss(nnx.merge(graphdef, p, rest), b)[0]

        if CHECKPOINT_POLICIES[remat] is not None:
            objective = jax.checkpoint(objective, policy=CHECKPOINT_POLICIES[remat])
        sized = {k: jax.ShapeDtypeStruct((rows, *v.shape[1:]), v.dtype) for k, v in batch.items()}
        residuals = jax.eval_shape(lambda p, b: jax.vjp(lambda q: objective(q, b), p)[1], shapes, sized)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(residuals))

    rows = next(iter(batch.values())).shape[0]
    per_example = {}
    for r in remats:
        once = kept(rows, r)  # the user's batch first, so a mistake in their model shows their shapes
        per_example[r] = max(kept(2 * rows, r) - once, 0) / rows
    return Profile(paths, sizes, opt_bytes / max(sum(sizes.values()), 1), per_example)


def _ways(spec, sizes: Mapping[str, int]) -> int:
    """Into how many shards a PartitionSpec splits its array."""
    return math.prod(sizes[a] for entry in spec if entry for a in (entry if isinstance(entry, tuple) else (entry,)))


def estimate(prof: Profile, mesh: MeshShape, micro_batches: int, remat: str, batch_size: int, tokens: int,
             hardware: Hardware, compute_bytes: int, rules) -> Scored:
    sizes = mesh.sizes()
    specs = parameter_specs(prof.paths, sizes, rules)
    shard = {p: prof.param_bytes[p] / _ways(spec, sizes) for p, (spec, _) in specs.items()}
    params = sum(shard.values())
    rows = batch_size / micro_batches / mesh.batch_shards
    memory = {"parameters": params, "gradients": params * (2 if micro_batches > 1 else 1),
              "optimizer": params * prof.optimizer_per_param_byte,
              "activations": prof.activation_bytes_per_example[remat] * rows,
              "gathered": 2 * max(prof.param_bytes.values()) / mesh.tensor if mesh.fsdp > 1 else 0}
    memory = {k: int(v) for k, v in memory.items()}
    memory["total"] = sum(memory.values())

    count = sum(prof.param_bytes.values()) / 4  # parameters (kept in float32)
    flops = 6 * count * tokens * REMAT_FLOPS[remat]
    # the model's width: the shorter side of its largest matrix (embedding or MLP: the hidden size)
    width = min(max((shape for shape, _ in prof.paths.values() if len(shape) >= 2), key=math.prod,
                    default=(1, 1))[-2:])
    efficiency = PEAK_EFFICIENCY * split_efficiency(width, mesh.tensor)
    compute = flops / (mesh.size * hardware.peak_flops * efficiency) + MICRO_BATCH_OVERHEAD * micro_batches
    d, f, t = mesh.data, mesh.fsdp, mesh.tensor
    # gradients travel in the compute dtype, as XLA compiles the step (docs/time-model.md)
    data = 2 * (d - 1) / d * params / 4 * compute_bytes / link_bandwidth(hardware, d * f * t) if d > 1 else 0.0
    sharded = sum(b for p, b in prof.param_bytes.items() if shard[p] < b) / 4 / t
    fsdp = micro_batches * sharded * (f - 1) / f * 3 * compute_bytes / link_bandwidth(hardware, f * t)
    tensor = 2 * micro_batches * memory["activations"] * (t - 1) / t / link_bandwidth(hardware, t) if t > 1 else 0.0
    seconds = {"compute": compute, "data": data, "fsdp": fsdp, "tensor": tensor,
               "total": compute + max(0.0, data + fsdp - OVERLAP * compute) + tensor}
    return Scored(Candidate(mesh, micro_batches, remat, "whole"), memory, seconds)


def _splits_tensor(prof: Profile, tensor: int, rules) -> bool:
    specs = parameter_specs(prof.paths, {"tensor": tensor}, rules)
    return any("tensor" in str(spec) for spec, _ in specs.values())


def plan_measured(abstract: nnx.Module, optimizer, batch: Mapping[str, jax.ShapeDtypeStruct], seq_len: int,
                  accelerator: Accelerator, memory_fraction: float = 0.8, *,
                  compile_candidate: Callable[[Plan], tuple], loss_fn=None, rules=None, stage: int | None = None,
                  data: int | None = None, fsdp: int | None = None, tensor: int | None = None,
                  expert: int | None = None, context: int | None = None,
                  micro_batches: int | None = None, remat: str | None = None, compute_dtype: str = "float32",
                  profiled: Profile | None = None) -> Plan:
    """The fastest candidate whose compiled step fits `memory_fraction` of each device.

    `compile_candidate(plan)` compiles a candidate's train step and returns (parts, compiled, Verified).
    `profiled`: the model's Profile when it has no loss to trace (a step of the user's own, `acc.jit`)."""
    start = time.perf_counter()
    hardware, flavor = accelerator.hardware, accelerator.flavor
    batch_size = next(iter(batch.values())).shape[0]
    if remat is not None and remat not in CHECKPOINT_POLICIES:
        raise FlavorError(f"remat={remat!r}: a model of your own takes one of {', '.join(CHECKPOINT_POLICIES)}")
    for axis, value, what in (("stage", stage, "pipeline stages need moai_jax's own models (stacked layers)"),
                              ("expert", expert, "experts are split only in moai_jax's own Mixture-of-Experts models"),
                              ("context", context, "sequences are split only in moai_jax's own models")):
        if value not in (None, 1):
            raise FlavorError(f"{axis}={value}: {what}; use {axis}=1")
    remats = [remat] if remat else list(CHECKPOINT_POLICIES)
    prof = profiled or profile(abstract, optimizer, batch, loss_fn, remats)
    tensors = [tensor] if tensor else [t for t in divisors(flavor) if t <= hardware.devices_per_host]
    if tensor and tensor > 1 and not _splits_tensor(prof, tensor, rules):
        raise FlavorError(f"tensor={tensor} splits none of your model's parameters: give rules=[(regex, logical "
                          f"names)] naming dimensions such as 'heads' or 'mlp' that {tensor} divides, or use tensor=1")
    budget = int(memory_fraction * hardware.memory_bytes)
    compute_bytes = jax.numpy.dtype(compute_dtype).itemsize
    meshes = [MeshShape(data=flavor // t // f, fsdp=f, tensor=t) for t in tensors
              if t == 1 or _splits_tensor(prof, t, rules) for f in ([fsdp] if fsdp else divisors(flavor // t))]
    meshes = [m for m in meshes if m.size == flavor and data in (None, m.data)]

    def splits(rows: int) -> list[tuple[MeshShape, int]]:
        return [(mesh, mb) for mesh in meshes for mb in ([micro_batches] if micro_batches else divisors(rows))
                if rows % mb == 0 and (rows // mb) % mesh.batch_shards == 0]

    layouts = splits(batch_size)
    if not layouts:
        raise batch_split_error(batch_size, Fixed(data=data, fsdp=fsdp, tensor=tensor, micro_batches=micro_batches),
                                splits)
    scored = [estimate(prof, mesh, mb, r, batch_size, batch_size * seq_len, hardware, compute_bytes, rules)
              for mesh, mb in layouts for r in remats]
    fits = sorted((s for s in scored if s.memory["total"] <= budget), key=_order)
    over = sorted((s for s in scored if s.memory["total"] > budget), key=lambda s: (s.memory["total"], _order(s)))
    estimated = time.perf_counter() - start

    def as_plan(s: Scored, seconds: dict[str, float] | None = None, **more) -> Plan:
        seconds = seconds or s.seconds
        specs = parameter_specs(prof.paths, s.candidate.mesh.sizes(), rules)
        tokens = batch_size * seq_len
        c = s.candidate
        return Plan(flavor=flavor, hardware=hardware.name, mesh=c.mesh, batch_size=batch_size, seq_len=seq_len,
                    micro_batches=c.micro_batches, remat=c.remat, compute_dtype=compute_dtype,
                    estimated_bytes_per_device=s.memory, budget_bytes_per_device=budget,
                    estimated_step_seconds={k: round(v, 6) for k, v in seconds.items()},
                    estimated_tokens_per_sec=round(tokens / seconds["total"], 1),
                    candidates_considered=len(scored), candidates_fitting=len(fits),
                    parameter_shardings=origins(specs), **more)

    measured: list[tuple[Scored, Verified, float]] = []  # candidate, its compile, step seconds by XLA's FLOPs
    compile_seconds = 0.0
    for s in (fits + over)[:MAX_COMPILES]:
        if len(measured) >= COMPILE_FEW and any(v.bytes_per_device <= budget for _, v, _ in measured):
            break
        _, compiled, verified = compile_candidate(as_plan(s))
        compile_seconds += verified.seconds
        measured.append((s, verified, step_seconds(s, compiled, hardware)))
    fitting = sorted((m for m in measured if m[1].bytes_per_device <= budget), key=lambda m: (m[2], _order(m[0])))
    timing = {"estimate": round(estimated, 3), "compile": round(compile_seconds, 3),
              "total": round(time.perf_counter() - start, 3)}
    counted = (f"compiled {len(measured)} of {len(scored)} candidates ({len(fits)} estimated to fit) in "
               f"{compile_seconds:.1f} s")
    if not fitting:
        s, v, _ = min(measured, key=lambda m: m[1].bytes_per_device)
        c = s.candidate
        raise NoPlanFits(f"no plan fits your model on {flavor} × {hardware.name} at batch {batch_size}: {counted}; "
                         f"the smallest ({c.mesh}, {c.micro_batches} micro-batch(es), remat {c.remat}) needs "
                         f"{format_bytes(v.bytes_per_device)} per device, over the budget of {format_bytes(budget)}; "
                         f"use a larger flavor or a smaller batch")
    near = [m for m in fitting if m[2] <= fitting[0][2] * (1 + SIMPLER_WITHIN)]  # near-ties: the simplest
    chosen, verified, chosen_seconds = min(near, key=lambda m: m[0].simplicity)
    alternatives = []
    for s, v, sec in measured:
        if s is not chosen:
            if v.bytes_per_device > budget:
                why = f"compiled to {format_bytes(v.bytes_per_device)}, over the {format_bytes(budget)} budget"
            elif sec > chosen_seconds * (1 + SIMPLER_WITHIN):
                why = f"{sec / chosen_seconds - 1:.1%} slower by XLA's FLOPs"
            else:
                why = "about as fast; the chosen layout is simpler"
            alternatives.append({**_describe(s), "why_not": why})
    c = chosen.candidate
    m = c.mesh
    how = [f"parameters, gradients and optimizer state sharded over fsdp={m.fsdp}" if m.fsdp > 1
           else "state replicated, the batch split over every device"]
    how += [f"tensor={m.tensor} by your partition rules"] * (m.tensor > 1)
    how += [f"{c.micro_batches} micro-batches"] * (c.micro_batches > 1)
    how += [f"remat {c.remat}"] * (c.remat != "none")
    seconds = dict(chosen.seconds, compute=chosen_seconds - (chosen.seconds["total"] - chosen.seconds["compute"]),
                   total=chosen_seconds)
    return as_plan(chosen, why=f"measured: {counted}; the fastest that fits: {', '.join(how)}",
                   alternatives=tuple(alternatives), planning_seconds=timing,
                   verified_bytes_per_device=verified.bytes_per_device, verified_on=verified.backend,
                   seconds=seconds)


def step_seconds(s: Scored, compiled, hardware: Hardware) -> float:
    """A compiled candidate's step time: its FLOPs per device as XLA counts them, plus the estimated traffic."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", 0.0))
    if flops <= 0:
        return s.seconds["total"]
    compute = flops / (hardware.peak_flops * PEAK_EFFICIENCY) + MICRO_BATCH_OVERHEAD * s.candidate.micro_batches
    sec = s.seconds
    return compute + max(0.0, sec["data"] + sec["fsdp"] - OVERLAP * compute) + sec["tensor"]
