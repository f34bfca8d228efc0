"""The XLA GPU flags moai_jax sets for training throughput, before JAX starts its backends.

XLA reads `XLA_FLAGS` once, when the first backend starts, and aborts the process on a flag it does
not know; so these are few, long-standing ones, each checked against the installed jaxlib by
`tests/test_benchmark.py`:

- `xla_gpu_enable_latency_hiding_scheduler`: schedule FSDP all-gathers / reduce-scatters so they
  overlap the matmuls (JAX's GPU performance tips; NVIDIA JAX-Toolbox bakes it into its images).
- `xla_gpu_enable_while_loop_double_buffering`: the layers run in one `lax.scan`; double buffering
  lets layer i+1's parameter all-gather run while layer i computes.
- `xla_gpu_enable_pipelined_{all_gather,reduce_scatter,all_reduce}`: move those collectives out of
  the scanned loop body so they pipeline across iterations (MaxText's GPU configurations).
- `xla_gpu_enable_triton_gemm=false`: large training matmuls go to cuBLAS (what PyTorch uses too),
  and compilation skips autotuning Triton GEMM candidates (JAX-Toolbox, MaxText).
- with no GPU attached, what compiling for compile-only GPUs needs (`targets.compile_only_flags`).

The collective flags change nothing on one device. The user always wins: a flag already named in
`XLA_FLAGS` is left as the user set it, and `MOAI_JAX_XLA_FLAGS=0` turns all of this off. They are
set only where a CUDA backend may start (a `jax_cuda*_plugin` is installed and `JAX_PLATFORMS`
allows it) and only while no backend has started yet.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import MutableMapping

GPU_FLAGS: dict[str, str] = {
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    "xla_gpu_enable_while_loop_double_buffering": "true",
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    "xla_gpu_enable_triton_gemm": "false",
}
# JAX's GPU memory pool defaults to 75% of the device, less than the planner's default budget of 80%
# (of the nominal memory): let the pool take what the plan may use.
MEMORY_FRACTION, GPU_MEMORY_FRACTION = "XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92"
OPT_OUT = "MOAI_JAX_XLA_FLAGS"  # "0" / "false" / "off": leave XLA_FLAGS alone
_CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")


def named(flags: str) -> set[str]:
    """The flag names in an `XLA_FLAGS` string: `--a=1 --b` → {"a", "b"}."""
    return {part[2:].split("=", 1)[0] for part in flags.split() if part.startswith("--")}


def merge(user_flags: str, defaults: dict[str, str]) -> str:
    """`user_flags` with every default whose name the user did not already set appended."""
    mine = named(user_flags)
    added = [f"--{name}={value}" for name, value in defaults.items() if name not in mine]
    return " ".join([user_flags.strip(), *added]).strip()


def cuda_may_start(env: MutableMapping[str, str] = os.environ) -> bool:
    """True when a CUDA backend can start in this process (decided without starting one)."""
    platforms = env.get("JAX_PLATFORMS", "").lower()
    if platforms and not any(p in platforms for p in ("cuda", "gpu")):
        return False
    return any(importlib.util.find_spec(plugin) is not None for plugin in _CUDA_PLUGINS)


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge
        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        return False


def apply(env: MutableMapping[str, str] = os.environ, *, force: bool = False) -> list[str]:
    """Add moai_jax's GPU flags to `env["XLA_FLAGS"]` where safe; returns the flags added.

    `force` skips the GPU and backend checks (the user's flags and the opt-out still win).
    """
    if env.get(OPT_OUT, "1").strip().lower() in ("0", "false", "off", "no"):
        return []
    if not force and (not cuda_may_start(env) or _backends_started()):
        return []
    before = env.get("XLA_FLAGS", "")
    from moai_jax.targets import compile_only_flags

    after = merge(before, GPU_FLAGS | compile_only_flags())
    if after != before:
        env["XLA_FLAGS"] = after
    env.setdefault(MEMORY_FRACTION, GPU_MEMORY_FRACTION)
    return sorted(named(after) - named(before))
