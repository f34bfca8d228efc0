"""The benchmark script end to end, bf16 parity on the tiny model, and the XLA GPU flags."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moai_jax import xla_flags

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=300)


def test_bf16_training_ends_within_two_percent_of_float32():
    result = load_script().parity(steps=50)
    assert result["float32_loss"] < 0.75 * result["initial_loss_approx"]  # the data is learnable: the loss fell
    assert result["relative_difference"] <= 0.02, result


def test_benchmark_script_end_to_end_with_reference():
    done = run_script("--model", "tiny", "--batch-size", "4", "--block-size", "32", "--steps", "2",
                      "--warmup", "1", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    [result] = json.loads(done.stdout.strip().splitlines()[-1])["results"]
    mine, reference = result["moai_jax"], result["pytorch"]
    assert mine["tokens_per_sec"] > 0 and 0 < mine["mfu"] < 1
    assert mine["compiled_bytes_per_device"] > 0 and mine["dtype"] == "float32"
    assert "error" not in reference, reference
    assert reference["tokens_per_sec"] > 0 and 0 < reference["mfu"] < 1 and reference["devices"] == 1
    assert result["speedup"] == pytest.approx(mine["tokens_per_sec"] / reference["tokens_per_sec"])


def test_accelerator_suite_refuses_on_cpu_in_one_line():
    done = run_script("--suite", "accelerator")
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: ") and len(done.stderr.strip().splitlines()) == 1


def test_xla_flags_user_flags_win_and_opt_out():
    env = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true --xla_force_host_platform_device_count=8"}
    added = xla_flags.apply(env, force=True)
    assert "xla_gpu_enable_triton_gemm" not in added and "xla_gpu_enable_latency_hiding_scheduler" in added
    assert "--xla_gpu_enable_triton_gemm=true" in env["XLA_FLAGS"].split()
    assert "--xla_gpu_enable_triton_gemm=false" not in env["XLA_FLAGS"].split()
    assert xla_flags.apply(env, force=True) == []  # idempotent
    assert xla_flags.apply({xla_flags.OPT_OUT: "0"}, force=True) == []
    assert xla_flags.apply({"JAX_PLATFORMS": "cpu"}) == []  # no CUDA backend can start


def test_xla_flags_are_known_to_the_installed_jaxlib():
    # XLA aborts on an unknown flag; every backend parses the GPU ones too, so a CPU run checks them all.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags.merge("", xla_flags.GPU_FLAGS)}
    done = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(2).block_until_ready()"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]
