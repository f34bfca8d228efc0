"""The virtual accelerator: a flavor (how many devices stand behind one device) and its hardware.

On a machine without the named hardware, a flavor is planned on compile-only devices of the target
when its compiler is installed (`moai_jax.targets`: NVIDIA GPUs from XLA's target configs, TPUs from
libtpu's topologies): the plan is verified by the compiler of the hardware it is for, but nothing can
run on them. Otherwise, and for `hardware="cpu"` or hardware without a compiler here (AMD), a flavor
larger than the real device count is simulated with XLA host devices, so every flavor can be planned,
run and tested on a laptop or in CI. The simulation has to be set before JAX starts its backends;
`Accelerator` does it when it can and otherwise says how to start JAX right.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import jax

from moai_jax import distributed, targets, xla_flags
from moai_jax.errors import FlavorError
from moai_jax.native_log import without_cuda_probe_lines
from moai_jax.targets import GpuTarget, Target, TpuTarget

GB = 10**9
GiB = 2**30
PCIE5 = 64 * GB  # PCIe 5.0 x16 between a GPU and its host, nominal, one direction
MAX_SIMULATED_DEVICES = 1024  # beyond this, XLA takes minutes and gigabytes just to create the CPU devices


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What the planner needs to know of one device and its links."""

    name: str
    memory_bytes: int
    peak_flops: float  # dense bfloat16 (float32 for cpu) FLOP/s per device
    intra_host_bandwidth: float  # bytes/s per device, one direction (NVLink, xGMI, ICI)
    inter_host_bandwidth: float  # bytes/s per device across hosts (InfiniBand, DCN)
    devices_per_host: int
    target: Target | None = None  # what to compile for when the hardware is not attached (None: simulate on CPU)
    # bytes/s per device, one direction, between its memory and its host's (an offloaded optimizer state's
    # moments cross it twice a step): PCIe 4.0 x16's nominal 32 GB/s, or PCIE5
    host_link_bandwidth: float = 32 * GB


HARDWARE = {
    h.name: h
    for h in (
        Hardware("h100", 80 * GB, 989e12, 450 * GB, 50 * GB, 8, GpuTarget("h100_sxm"), host_link_bandwidth=PCIE5),
        Hardware("h100-sxm", 80 * GB, 989e12, 450 * GB, 50 * GB, 8, GpuTarget("h100_sxm"), host_link_bandwidth=PCIE5),
        # PCIe 5.0 x16 links between the GPUs too
        Hardware("h100-pcie", 80 * GB, 756e12, 64 * GB, 50 * GB, 8, GpuTarget("h100_pcie"), host_link_bandwidth=PCIE5),
        # torchtitan's H100 (Grand Teton): 96 GB HBM2e at a 500 W limit, its peak "between SXM and NVL":
        # taken at the NVL's 835 TFLOP/s; compiled for as an H100 SXM
        Hardware("h100-96gb", 96 * GB, 835e12, 450 * GB, 50 * GB, 8, GpuTarget("h100_sxm"), host_link_bandwidth=PCIE5),
        Hardware("h200", 141 * GB, 989e12, 450 * GB, 50 * GB, 8, GpuTarget("h200"), host_link_bandwidth=PCIE5),
        Hardware("b200", 180 * GB, 2250e12, 900 * GB, 50 * GB, 8, GpuTarget("b200"), host_link_bandwidth=PCIE5),
        Hardware("a100-80gb", 80 * GB, 312e12, 300 * GB, 25 * GB, 8, GpuTarget("a100_sxm_80")),
        Hardware("a100-40gb", 40 * GB, 312e12, 300 * GB, 25 * GB, 8, GpuTarget("a100_sxm_40")),
        Hardware("mi250", 64 * GB, 181e12, 100 * GB, 25 * GB, 8),  # one MI250 die, as MoAI counts
        Hardware("mi300x", 192 * GB, 1307e12, 448 * GB, 50 * GB, 8, host_link_bandwidth=PCIE5),
        Hardware("tpu-v5e", 16 * GB, 197e12, 200 * GB, 25 * GB, 8, TpuTarget("v5e")),
        Hardware("tpu-v5p", 95 * GB, 459e12, 600 * GB, 25 * GB, 4, TpuTarget("v5", "megacore", dims=3)),
        Hardware("tpu-v6e", 32 * GB, 918e12, 448 * GB, 25 * GB, 8, TpuTarget("v6e")),
        Hardware("cpu", 16 * GiB, 1e11, 10 * GB, 10 * GB, 1024),
    )
}

_DEVICE_KINDS = (  # substrings of jax's device_kind, most specific first
    ("h200", "h200"), ("h100 pcie", "h100-pcie"), ("h100", "h100"), ("b200", "b200"),
    ("a100-sxm4-80gb", "a100-80gb"), ("a100 80gb", "a100-80gb"), ("a100", "a100-40gb"), ("mi300x", "mi300x"),
    ("mi250", "mi250"), ("v6 lite", "tpu-v6e"), ("v6e", "tpu-v6e"), ("v5 lite", "tpu-v5e"), ("v5e", "tpu-v5e"),
    ("v5p", "tpu-v5p"), ("tpu v5", "tpu-v5p"), ("cpu", "cpu"),
)


def hardware_profile(name: str, *, device_memory: int | None = None, devices_per_host: int | None = None) -> Hardware:
    """A named hardware profile, with memory or devices per host overridden if given."""
    if name not in HARDWARE:
        raise FlavorError(f"unknown hardware {name!r}; choose one of: {', '.join(HARDWARE)}")
    overrides = {"memory_bytes": device_memory, "devices_per_host": devices_per_host}
    return dataclasses.replace(HARDWARE[name], **{k: v for k, v in overrides.items() if v is not None})


def detect_hardware(device: jax.Device) -> str:
    """The profile name of a JAX device, from its device_kind ("cpu" when unknown)."""
    kind = device.device_kind.lower()
    return next((name for key, name in _DEVICE_KINDS if key in kind), "cpu")


def parse_flavor(value: object) -> int:
    """A flavor as given by a user (int or string) → a positive int, or a FlavorError saying what to pass."""
    try:
        flavor = int(str(value).strip())
    except ValueError:
        raise FlavorError(f"flavor must be a whole number of devices such as 1, 8 or 64, not {value!r}") from None
    if flavor < 1:
        raise FlavorError(f"flavor must be at least 1 device, not {flavor}")
    return flavor


def host_available_memory() -> int:
    """Bytes of memory this host can still give (Linux: MemAvailable, within a cgroup's limit if any)."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as limit, open("/sys/fs/cgroup/memory.current") as used:
            return min(available, int(limit.read()) - int(used.read()))
    except (OSError, ValueError):  # no cgroup v2 limit ("max")
        return available


def simulate_devices(flavor: int) -> int:
    """Ask JAX for this process's share of `flavor` host devices (all of them when it is alone), if its
    backends have not started yet (no-op otherwise), and return that share. Joins the process's job
    first (`distributed.join`).

    Also the moment, before any backend starts, to set moai_jax's XLA GPU flags (`xla_flags.apply`) and,
    with no GPU or TPU attached, to start JAX on its CPU backend only: then the compilers of absent
    targets load without complaint (`targets.prefer_cpu_backend`).
    """
    targets.prefer_cpu_backend()
    count = distributed.local_share(flavor)
    xla_flags.apply()
    try:
        if jax.config.jax_num_cpu_devices < min(count, MAX_SIMULATED_DEVICES):
            jax.config.update("jax_num_cpu_devices", min(count, MAX_SIMULATED_DEVICES))
    except RuntimeError:
        pass  # backends already started; Accelerator reports it if the count falls short
    return count


class Accelerator:
    """`flavor` devices seen as one. `hardware` names a profile; by default it is detected.

    In a job of several processes (see `moai_jax.distributed`) the flavor counts the devices of all
    of them, each process bringing flavor / processes of its own.
    """

    def __init__(self, flavor: int | str, hardware: str | None = None, *, device_memory: int | None = None,
                 devices_per_host: int | None = None):
        self.flavor = parse_flavor(flavor)
        target = hardware_profile(hardware).target if hardware else None
        share = simulate_devices(self.flavor)
        with without_cuda_probe_lines():  # JAX's backends start
            devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        self.platform = devices[0].platform
        self.compile_only = False  # devices of the target that compile but cannot run
        self.fallback = None  # why the target's compile-only devices are not used
        if target is not None and self.platform == "cpu":
            if jax.process_count() > 1:
                self.fallback = "several processes plan on their own CPU devices"
            else:
                try:
                    devices = targets.compile_only_devices(
                        target, self.flavor, devices_per_host or HARDWARE[hardware].devices_per_host)
                    self.platform, self.compile_only = devices[0].platform, True
                except targets.TargetUnavailable as e:
                    self.fallback = str(e)
            if self.fallback:
                warnings.warn(f"{hardware}: {self.fallback}; planning on simulated CPU devices instead (their "
                              f"compiler's memory, not the {hardware}'s)", stacklevel=2)
        if jax.process_count() > 1:
            devices = _share_of_each_process(devices, share)
        if len(devices) < self.flavor:
            if self.platform == "cpu" and share > MAX_SIMULATED_DEVICES:
                raise FlavorError(f"flavor {self.flavor} is beyond the {MAX_SIMULATED_DEVICES} devices moai_jax can "
                                  f"simulate on a CPU; choose a flavor of at most {MAX_SIMULATED_DEVICES}")
            if self.platform == "cpu":
                raise FlavorError(
                    f"JAX started with {len(devices)} CPU devices, flavor {self.flavor} needs {self.flavor}: create the "
                    f"Accelerator before any JAX computation, or start Python with "
                    f"XLA_FLAGS=--xla_force_host_platform_device_count={self.flavor}"
                )
            raise FlavorError(
                f"flavor {self.flavor} asks for {self.flavor} devices but this machine has {len(devices)} "
                f"{self.platform} devices; choose a flavor of at most {len(devices)}"
            )
        self.devices = devices[: self.flavor]
        self.simulated = self.platform == "cpu" and self.flavor > 1
        detected = detect_hardware(self.devices[0])
        if devices_per_host is None and jax.process_count() > 1:  # the real topology: processes per machine
            hosts = distributed.hosts()
            devices_per_host = share * hosts.count(hosts[jax.process_index()])
        # Simulated CPU devices share this host's memory: each gets its share of what is available.
        self.host_memory = None
        if self.platform == "cpu" and (hardware or detected) == "cpu" and device_memory is None:
            self.host_memory = host_available_memory()
            device_memory = self.host_memory // (devices_per_host if jax.process_count() > 1 else self.flavor)
        self.hardware = hardware_profile(hardware or detected, device_memory=device_memory,
                                         devices_per_host=devices_per_host)

    @property
    def family(self) -> str:
        """The compiler the plans are verified with: "gpu", "tpu" or "cpu" (simulated devices)."""
        return targets.family(self.devices[0])

    def describe(self) -> str:
        """The devices in words: "64 × NVIDIA H100 80GB HBM3 (compile only)", "8 simulated CPU devices"."""
        if self.compile_only:
            return f"{self.flavor} × {self.devices[0].device_kind} (compile only)"
        if self.simulated:
            return f"{self.flavor} simulated CPU devices"
        return f"{self.flavor} × {self.devices[0].device_kind}"

    def check_can_run(self) -> None:
        """A FlavorError if these devices cannot run a step (compile-only devices of absent hardware)."""
        if self.compile_only:
            raise FlavorError(
                f"the Accelerator holds {self.describe()}: no {self.hardware.name} is attached, so moai_jax can plan "
                f"and verify on it but not run a step; plan here and train on a machine with the hardware, or train "
                f"on simulated CPU devices with hardware='cpu' (--hardware cpu)")

    def __repr__(self) -> str:
        return f"Accelerator(flavor={self.flavor}, {self.describe()}, hardware={self.hardware.name})"

    def jit(self, fun=None, **options):
        """`@acc.jit`, the drop-in for `nnx.jit` / `jax.jit`: your own step planned over the flavor (`moai_jax.jit`)."""
        from moai_jax.jit import jit

        return jit(self, fun, **options)


def _share_of_each_process(devices: list[jax.Device], share: int) -> list[jax.Device]:
    """The first `share` devices of every process, by process; a FlavorError where one has fewer."""
    mine = [d for d in devices if d.process_index == jax.process_index()]
    if len(mine) < share:
        raise FlavorError(f"process {jax.process_index()} has {len(mine)} devices but its share of the flavor is "
                          f"{share}; choose a flavor of at most {len(mine) * jax.process_count()}")
    return [d for p in range(jax.process_count()) for d in [d for d in devices if d.process_index == p][:share]]
