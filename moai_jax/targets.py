"""Compile-only devices of hardware that is not attached: what a plan for it is verified on.

JAX compiles ahead of time for devices it does not have (`jax.experimental.topologies`):

- NVIDIA GPUs from XLA's GPU target configs (text of a `GpuTargetConfigProto`, shipped in
  `moai_jax/target_configs/`), with `jax-cuda12-plugin`, `nvidia-cuda-nvcc-cu12` (ptxas, libdevice)
  and `nvidia-cudnn-cu12` installed: `pip install -e '.[compile-cuda]'`. XLA cannot autotune its
  kernels without a GPU, so temporaries can differ somewhat from a compile on the real device.
- TPUs from libtpu's topologies (`pip install -e '.[compile-tpu]'`): a slice's shape per flavor, its
  chip configuration and wraparound links. A step that does not fit fails to compile with
  RESOURCE_EXHAUSTED, as on the chip.

Compile-only devices compile and report memory but run nothing. Where the target's compiler is not
installed, `compile_only_devices` raises `TargetUnavailable` saying what to install, and the
Accelerator falls back to simulated CPU devices.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os
from importlib import resources

import jax

FAMILIES = ("gpu", "tpu", "cpu")  # compilers whose memory reports the memory model is fitted to
# XLA flags for compiling for GPUs that are not attached: XLA picks CUB's radix sort for large sorts (a MoE
# layer's argsort of 4096 tokens a device and more), a kernel it cannot build without the CUDA runtime
# ("Error loading CUDA libraries"); its own sort kernel compiles anywhere. A real GPU keeps CUB.
COMPILE_ONLY_GPU_FLAGS = {"xla_gpu_enable_cub_radix_sort": "false"}


class TargetUnavailable(Exception):
    """The target's compiler cannot be used here; the message says why and what to install."""


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """An NVIDIA GPU compiled for from an XLA target config (a file in moai_jax/target_configs)."""

    config: str  # e.g. "h100_sxm"
    family: str = "gpu"
    install: str = "pip install -e '.[compile-cuda]'"

    def text(self) -> str:
        return resources.files("moai_jax").joinpath(f"target_configs/{self.config}.txtpb").read_text()

    def topology(self, flavor: int, devices_per_host: int) -> dict:
        """`get_topology_desc` arguments: "1 × hosts × GPUs per host" (one host when the flavor is smaller)."""
        per_host = devices_per_host if flavor % devices_per_host == 0 else flavor
        return {"platform": "cuda", "target_config": self.text(), "topology": f"1x{flavor // per_host}x{per_host}"}


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    """A TPU slice from libtpu's topologies: `generation` as libtpu names it ("v5e", "v5" for v5p, "v6e")."""

    generation: str
    chip_config: str = "default"  # "megacore": a v5p chip's two TensorCores act as one device
    dims: int = 2  # a 2-D (v5e, v6e) or 3-D (v5p) torus of chips
    family: str = "tpu"
    install: str = "pip install -e '.[compile-tpu]'"

    def shape(self, flavor: int) -> tuple[int, ...]:
        """The slice's chips per dimension, smallest first, as Cloud TPU shapes them (v5e-32: 4x8, v5p-64: 2x4x4)."""
        if flavor & (flavor - 1):
            raise TargetUnavailable(f"TPU slices come in powers of two chips; flavor {flavor} is not one")
        exponent = round(math.log2(flavor))
        if self.dims == 2:
            return (2 ** (exponent // 2), 2 ** (exponent - exponent // 2))
        if flavor < 8:  # 1, 2 or 4 chips lie in one plane (v5p-8: 2x2x1)
            return (2 ** (exponent // 2), 2 ** (exponent - exponent // 2), 1)
        low = exponent // 3
        return tuple(2 ** e for e in (low, (exponent - low) // 2, exponent - low - (exponent - low) // 2))

    def topology(self, flavor: int, devices_per_host: int) -> dict:
        shape = self.shape(flavor)
        # wraparound links close a dimension of a full torus: 16 chips on v5e / v6e, every side of 4 on v5p
        wrap = tuple(n >= (4 if self.dims == 3 and min(shape) >= 4 else 16) for n in shape)
        host = tuple(min(2, n) for n in shape[:2]) + (1,)
        return {"platform": "tpu", "topology_name": f"{self.generation}:{'x'.join(map(str, shape))}",
                "chip_config_name": self.chip_config, "chips_per_host_bounds": host, "num_slices": 1,
                "wrap": (wrap + (False,) * 3)[:3]}


Target = GpuTarget | TpuTarget


def family(device: jax.Device) -> str:
    """The compiler family of a device: "gpu", "tpu" or "cpu"."""
    return {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}.get(device.platform, "cpu")


def accelerator_attached() -> bool:
    """Whether this machine shows an NVIDIA GPU or a TPU to its processes (device nodes), without starting JAX."""
    nodes = ("/dev/nvidia[0-9]*", "/dev/dxg", "/dev/kfd", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")  # dxg: WSL
    return any(glob.glob(pattern) for pattern in nodes)


def compile_only_flags() -> dict[str, str]:
    """The XLA flags that compiling for absent GPUs needs (none when a GPU or TPU is attached)."""
    return {} if accelerator_attached() else COMPILE_ONLY_GPU_FLAGS


def prefer_cpu_backend() -> None:
    """With no accelerator attached, let JAX start only its CPU backend (the compilers for other targets
    still load: the CUDA plugin otherwise refuses to register without a GPU). A no-op once JAX has
    started, when the user set JAX_PLATFORMS, or when a GPU or TPU is attached."""
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized() or os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
        return
    if not accelerator_attached():
        jax.config.update("jax_platforms", "cpu")


def compile_only_devices(target: Target, flavor: int, devices_per_host: int) -> list[jax.Device]:
    """`flavor` compile-only devices of the target, or TargetUnavailable saying why not."""
    try:
        return list(_topology_devices(target, flavor, devices_per_host))
    except TargetUnavailable:
        raise
    except (ImportError, RuntimeError, NotImplementedError, ValueError) as e:
        raise TargetUnavailable(_why_unavailable(target, e)) from None


@functools.lru_cache(maxsize=32)  # the same target and flavor give the same devices (a topology loads once)
def _topology_devices(target: Target, flavor: int, devices_per_host: int) -> tuple[jax.Device, ...]:
    from jax.experimental import topologies

    if target.family == "tpu":
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU VM here: quiets libtpu's host lookup
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chip to guard: processes compile side by side
    devices = topologies.get_topology_desc(**target.topology(flavor, devices_per_host)).devices
    if len(devices) != flavor:
        raise TargetUnavailable(f"the {target.family} topology for flavor {flavor} has {len(devices)} devices")
    return tuple(devices)


def _why_unavailable(target: Target, error: Exception) -> str:
    if isinstance(target, GpuTarget):
        try:
            import jax_plugins.xla_cuda12  # noqa: F401
        except ImportError:
            return f"jax-cuda12-plugin not installed: {target.install}"
        if isinstance(error, NotImplementedError):  # the plugin did not register: JAX started with CUDA enabled
            return ("the CUDA plugin did not load (JAX started its backends first, or without a GPU and without "
                    "JAX_PLATFORMS=cpu): create the Accelerator before any JAX computation")
    else:
        try:
            import libtpu  # noqa: F401
        except ImportError:
            return f"libtpu not installed: {target.install}"
    return f"{target.family.upper()} compiler unavailable ({type(error).__name__}: {str(error).splitlines()[0][:160]})"
