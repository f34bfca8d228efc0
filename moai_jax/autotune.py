"""Autotuning: compile the K best fitting plans, time a few steps of each on the real devices, keep
the fastest measured.

    trainer = moai_jax.Trainer(model, optimizer, batch_size=64, seq_len=1024, accelerator=acc, autotune=3)
    print(trainer.autotune_report)          # each candidate's estimated and measured step seconds

The planner ranks candidates by its time model; autotuning checks that ranking against the clock.
Measurements are kept per (model, hardware, flavor, batch, length, dtype) in a small JSON file
(`~/.cache/moai_jax/autotune.json`, or `$MOAI_JAX_AUTOTUNE_CACHE`), so the next run with the same
shape chooses at once, without measuring again. On a CPU the candidates run on the simulated devices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from moai_jax.accelerator import Accelerator
from moai_jax.errors import FlavorError
from moai_jax.models import ModelConfig
from moai_jax.planner.candidates import Fixed
from moai_jax.planner.plan import Plan
from moai_jax.planner.search import plan, rank

TIMED_STEPS = 2  # after one untimed step; the median is kept


def cache_path() -> Path:
    return Path(os.environ.get("MOAI_JAX_AUTOTUNE_CACHE", Path.home() / ".cache" / "moai_jax" / "autotune.json"))


def candidate_plans(config: ModelConfig, batch_size: int, seq_len: int, accelerator: Accelerator, count: int,
                    memory_fraction: float = 0.8, compute_dtype: str | None = None, **fixed) -> list[Plan]:
    """The `count` fastest plans by the time model among those whose estimated memory fits (unverified)."""
    if not isinstance(count, int) or count < 1:
        raise FlavorError(f"autotune must be a whole number of candidates >= 1, e.g. 3, not {count!r}")
    hardware = accelerator.hardware
    dtype = compute_dtype or ("float32" if hardware.name == "cpu" else "bfloat16")
    budget = int(memory_fraction * hardware.memory_bytes)
    fits, _ = rank(config, batch_size, seq_len, accelerator.flavor, hardware, budget, Fixed(**fixed), dtype,
                   family=getattr(accelerator, "family", "cpu"))
    out = []
    for s in fits[:count]:
        c = s.candidate
        out.append(plan(config, batch_size, seq_len, accelerator, memory_fraction, verify=False, stage=c.mesh.stage,
                        data=c.mesh.data, fsdp=c.mesh.fsdp, tensor=c.mesh.tensor, micro_batches=c.micro_batches,
                        remat=c.remat, loss=c.loss, compute_dtype=dtype))
    return out


def layout_key(p: Plan) -> str:
    """A plan's layout in one line (the cache's key within a shape)."""
    return f"mesh {p.mesh} | micro-batches {p.micro_batches} | remat {p.remat} | loss {p.loss}"


def shape_key(config: ModelConfig, p: Plan) -> str:
    model = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode()).hexdigest()
    return f"{model[:16]} {p.hardware} flavor {p.flavor} batch {p.batch_size} length {p.seq_len} {p.compute_dtype}"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or an unreadable one: measure again


def _write(path: Path, cache: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: the measurements are only lost for the next run


def time_steps(run: Callable[[], object], steps: int = TIMED_STEPS) -> float:
    """Median seconds of `steps` calls of `run` (each waited for), after one untimed call."""
    jax.block_until_ready(run())
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(run())
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


@dataclasses.dataclass(frozen=True)
class Tried:
    plan: Plan
    measured: float | None  # seconds per step; None: over the memory budget once compiled
    cached: bool


def autotune(config: ModelConfig, plans: list[Plan], measure: Callable[[Plan], float | None],
             path: Path | None = None) -> tuple[Plan, list[Tried]]:
    """The fastest measured of `plans` (with `measured_step_seconds` set), and what each one did.

    `measure` compiles and times one plan (None when it does not fit); measurements already in the
    cache are reused."""
    path = path or cache_path()
    cache = _read(path)
    shape = cache.setdefault(shape_key(config, plans[0]), {})
    tried = []
    for p in plans:
        key = layout_key(p)
        cached = key in shape
        if not cached:
            shape[key] = measure(p)
            _write(path, cache)
        tried.append(Tried(p, shape[key], cached))
    measured = [t for t in tried if t.measured is not None]
    if not measured:
        raise FlavorError(f"none of the {len(plans)} autotuned candidates fit once compiled; use a larger flavor or "
                          f"a smaller batch")
    best = min(measured, key=lambda t: t.measured)
    return dataclasses.replace(best.plan, measured_step_seconds=round(best.measured, 6)), tried


def report(chosen: Plan, tried: list[Tried]) -> str:
    """Each candidate's estimated and measured step seconds, and which one runs."""
    lines = [f"Autotuned {len(tried)} candidates ({sum(t.cached for t in tried)} from the cache):"]
    for t in tried:
        estimated = (t.plan.estimated_step_seconds or {}).get("total", float("nan"))
        measured = "over budget" if t.measured is None else f"{t.measured:.4f} s"
        mark = "  <- fastest, chosen" if layout_key(t.plan) == layout_key(chosen) else ""
        lines.append(f"  {layout_key(t.plan)} | estimated {estimated:.4f} s | measured {measured}"
                     f"{' (cached)' if t.cached else ''}{mark}")
    return "\n".join(lines)


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens, one document per row: what a step is timed on."""
    ids = np.random.default_rng(seed).integers(0, vocab_size, (batch_size, seq_len), dtype=np.int32)
    labels = np.concatenate([ids[:, 1:], np.full((batch_size, 1), -100, np.int32)], axis=1)
    return {"input_ids": ids, "labels": labels, "segment_ids": np.ones_like(ids),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), ids.shape).copy()}
