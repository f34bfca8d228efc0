"""This machine's float32 matmul peak, the denominator of MFU on a CPU: measured once, then cached.

    flops, how = machine_peak_flops()   # e.g. 1.4e11, "2 cores × 70.1 GFLOP/s (a 2048² float32 matmul on one
                                        #  core, measured ...; cached in ~/.cache/moai_jax/cpu-peak.json)"

The `cpu` hardware profile's FLOP/s are a nominal figure for the planner's ranking, not this
machine's, so an MFU over them read above 100%. The peak here is measured: in a child process pinned
to one core, XLA single-threaded, the best of a few 2048 × 2048 float32 matmuls by that process's CPU
time (which other jobs on the machine do not inflate), times the cores this process may use.
Cached per CPU model and JAX version in `~/.cache/moai_jax/cpu-peak.json` (`$MOAI_JAX_CPU_PEAK_CACHE`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

N = 2048  # a matmul this size runs at the core's full rate (66-72 GFLOP/s on one EPYC core with XLA:CPU)

_MEASURE = f"""
import os, sys, time
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {{int(sys.argv[1])}})  # one core, before XLA sizes its thread pool
import jax, jax.numpy as jnp
a = jnp.ones(({N}, {N}), jnp.float32)
f = jax.jit(lambda x: x @ x)
f(a).block_until_ready()
seconds = []
for _ in range(8):
    start = time.process_time()
    f(a).block_until_ready()
    seconds.append(time.process_time() - start)
print(2 * {N}**3 / min(seconds))
"""


def cache_path() -> Path:
    return Path(os.environ.get("MOAI_JAX_CPU_PEAK_CACHE", Path.home() / ".cache" / "moai_jax" / "cpu-peak.json"))


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    import platform

    return names[0] if names else platform.processor() or platform.machine()


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def measure_core_flops() -> float:
    """float32 FLOP/s of one core: a child process pinned to one core, timed by its own CPU seconds."""
    first = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(first)], env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def machine_peak_flops(path: Path | None = None) -> tuple[float, str]:
    """(float32 FLOP/s of this machine's usable cores, how that figure was had)."""
    import jax

    path = path or cache_path()
    key = f"{cpu_model()} | jax {jax.__version__}"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    cached = key in cache
    if not cached:
        cache[key] = measure_core_flops()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cache, indent=1, sort_keys=True))
        except OSError:
            pass  # measured again next time
    per_core, n = cache[key], cores()
    how = (f"{n} core{'s' * (n != 1)} × {per_core / 1e9:.1f} GFLOP/s (a {N}² float32 matmul on one core, "
           f"{'measured earlier, cached in' if cached else 'measured now, cached in'} {path})")
    return n * per_core, how
