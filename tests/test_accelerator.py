"""Flavors: what a user may ask for, and the errors that say what to change."""

import jax
import pytest

from moai_jax import accelerator
from moai_jax.accelerator import HARDWARE, Accelerator, detect_hardware, hardware_profile, parse_flavor
from moai_jax.errors import FlavorError
from moai_jax.sharding.mesh import MeshShape, check_mesh


@pytest.mark.parametrize("bad", ["0", "-3", "eight", "2.5", ""])
def test_bad_flavor_says_what_to_pass(bad):
    with pytest.raises(FlavorError, match="flavor"):
        parse_flavor(bad)


def test_flavor_uses_that_many_simulated_devices():
    acc = Accelerator(4)
    assert acc.flavor == 4 and len(acc.devices) == 4 and acc.simulated
    assert acc.hardware.name == detect_hardware(acc.devices[0]) == "cpu"


def test_flavor_beyond_the_started_devices_says_how_to_start_jax():
    jax.devices()  # the backends have started (with 8 devices), as in any test run after the first
    with pytest.raises(FlavorError, match="xla_force_host_platform_device_count=16"):
        Accelerator(16)
    with pytest.raises(FlavorError, match="beyond the 1024 devices moai_jax can simulate on a CPU"):
        Accelerator(10**9)


def test_simulated_devices_share_the_hosts_available_memory(monkeypatch):
    monkeypatch.setattr(accelerator, "host_available_memory", lambda: 8 * 2**30 + 7)
    acc = Accelerator(8)
    assert acc.host_memory == 8 * 2**30 + 7 and acc.hardware.memory_bytes == 2**30  # its share, not cpu's 16 GiB
    assert Accelerator(8, "cpu").hardware.memory_bytes == 2**30
    assert Accelerator(8, device_memory=300 * 10**6).hardware.memory_bytes == 300 * 10**6  # given: kept
    planned_for = Accelerator(8, "h100")  # planning for other hardware on this CPU keeps its profile
    assert planned_for.hardware.memory_bytes == HARDWARE["h100"].memory_bytes and planned_for.host_memory is None


def test_hardware_profile_overrides_and_unknown_names():
    assert hardware_profile("mi250", device_memory=300 * 10**6).memory_bytes == 300 * 10**6
    with pytest.raises(FlavorError, match="h100"):
        hardware_profile("tpu-v9")


@pytest.mark.parametrize("text", ["data=2,fsdp=x", "data=0", "pipeline=2", "data=-1"])
def test_bad_mesh_text(text):
    with pytest.raises(FlavorError, match="axis=size pairs such as fsdp=4,tensor=2"):
        MeshShape.parse(text)


def test_mesh_checks_name_the_fix():
    with pytest.raises(FlavorError, match="make stage × data × fsdp × expert × context × tensor = 8"):
        check_mesh(MeshShape(data=2, fsdp=2), 8)
    with pytest.raises(FlavorError, match=r"stage=4 does not divide the model's 6 layers; choose stage from \[1, 2, 3, 6\]"):
        check_mesh(MeshShape(stage=4, fsdp=2), 8, num_layers=6)
    with pytest.raises(FlavorError, match="choose tensor from"):
        check_mesh(MeshShape(tensor=8), 8, num_heads=4, num_kv_heads=2)
    with pytest.raises(FlavorError, match="use 8 or 16"):
        check_mesh(MeshShape(fsdp=8), 8, batch_size=12)
