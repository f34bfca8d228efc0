"""Plans verified by the compiler of the hardware they are for: compile-only H100s and TPU v5e on this CPU.

Each compile's verdict is held against the target's own `memory_analysis()`; tiny models, one compile
per path (GPU dense with cuDNN attention; GPU LoRA on a soft-capped family, whose attention falls back
to blockwise; a TPU pipeline; a ~100M model that a TPU v5e chip refuses with RESOURCE_EXHAUSTED).
Without the compilers (`pip install -e '.[compile-cuda]'`, `pip install -e '.[compile-tpu]'`) those
tests skip, saying what to install.
"""

import ast
import dataclasses
import json
import re
import runpy
import warnings
from pathlib import Path

import jax
import pytest

import moai_jax as moai
from moai_jax.accelerator import HARDWARE, Accelerator
from moai_jax.models import ModelConfig
from moai_jax.models.lora import LoraConfig
from moai_jax.planner.memory import FAMILY_SCALES, estimate_bytes
from moai_jax.planner.verify import abstract_model, verified_line
from moai_jax.sharding.mesh import MeshShape
from moai_jax.step import Verified, compile_step
from moai_jax.targets import TargetUnavailable, TpuTarget, compile_only_devices

TINY = ModelConfig.preset("tiny")  # 2 layers, width 64, vocabulary 256, head_dim 16
SOFT_CAPPED = dataclasses.replace(ModelConfig.preset("gemma2-2b"), vocab_size=256, hidden_size=64,  # Gemma 2's family
                                  intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                                  query_pre_attn_scalar=16)


def accelerator(flavor: int, hardware: str) -> Accelerator:
    """Compile-only devices of `hardware`, or a skip that says what to install."""
    try:
        compile_only_devices(HARDWARE[hardware].target, flavor, HARDWARE[hardware].devices_per_host)
    except TargetUnavailable as e:
        pytest.skip(f"{hardware} compiler not available here: {e}")
    return Accelerator(flavor, hardware)


def planned_and_compiled(config, acc, batch, seq, lora=None, **fixed):
    """The planner's plan on `acc`, and the executable its verifying compile produced."""
    compiles = []

    def verifier(candidate):
        parts, compiled, verified = compile_step(candidate, abstract_model(config, candidate), acc.devices)
        compiles.append(compiled)
        return verified

    p = moai.plan(config, batch, seq, acc, verifier=verifier, lora=lora, **fixed)
    return p, compiles[-1]


def memory_analysis_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
            + m.generated_code_size_in_bytes)


def test_dense_plan_for_h100_is_verified_by_the_gpu_compiler_with_cudnn_attention():
    acc = accelerator(8, "h100")
    assert acc.compile_only and acc.family == "gpu" and not acc.simulated
    p, compiled = planned_and_compiled(TINY, acc, 16, 64, data=2, fsdp=2, tensor=2, micro_batches=1, remat="matmuls")
    assert p.compute_dtype == "bfloat16"
    assert p.verified_on == "8 × NVIDIA H100 80GB HBM3 (compile only, cudnn attention)"
    assert p.verified_bytes_per_device == memory_analysis_bytes(compiled)
    assert "cudnn" in compiled.as_text().lower()  # the fused attention kernel is in the GPU program
    assert verified_line(p).startswith("verified on 8 × NVIDIA H100 80GB HBM3 (compile only") and "autotuning" in \
        verified_line(p)
    with pytest.raises(moai.FlavorError, match="cannot run|not run a step"):
        moai.Trainer(lambda: None, None, 16, 64, acc)  # compile-only devices plan, but run nothing


def test_lora_on_a_soft_capped_family_for_h100():
    acc = accelerator(8, "h100")
    lora = LoraConfig(r=4)
    p, compiled = planned_and_compiled(SOFT_CAPPED, acc, 16, 64, lora=lora, data=1, fsdp=8, tensor=1,
                                       micro_batches=1, remat="none")
    assert p.verified_bytes_per_device == memory_analysis_bytes(compiled)
    assert p.verified_on == "8 × NVIDIA H100 80GB HBM3 (compile only, blockwise attention)"  # cuDNN cannot soft-cap
    gpu = estimate_bytes(SOFT_CAPPED, 16, 64, p.mesh, remat="none", lora=lora, family="gpu")
    cpu = estimate_bytes(SOFT_CAPPED, 16, 64, p.mesh, remat="none", lora=lora, family="cpu")
    assert gpu["base copy"] == 0 < cpu["base copy"]  # XLA:CPU's bit copy of the frozen base is the CPU's alone


def test_a_faster_plan_estimated_just_over_the_budget_is_compiled_first_and_kept_only_if_it_fits():
    accelerator(8, "h100")  # skips without the GPU compiler
    fixed = dict(data=1, fsdp=8, tensor=1, micro_batches=1, loss="whole")
    config = ModelConfig.preset("llama3-8b")  # only estimated: the verifier below compiles nothing
    none, matmuls = (estimate_bytes(config, 32, 1024, MeshShape(fsdp=8), remat=r, family="gpu")["total"]
                     for r in ("none", "matmuls"))
    acc = Accelerator(8, "h100", device_memory=int(none / 1.05))  # remat none's estimate is 5% over the budget
    assert matmuls < acc.hardware.memory_bytes < none
    for none_fits in (True, False):
        compiled = []

        def verifier(candidate):  # stands in for the GPU compiler: remat none fits or it does not
            compiled.append(candidate.remat)
            over = candidate.remat == "none" and not none_fits
            return Verified(acc.hardware.memory_bytes + (1 if over else -1), "fake H100", 0.0)

        p = moai.plan(config, 32, 1024, acc, memory_fraction=1.0, verifier=verifier, **fixed)
        assert compiled[0] == "none"  # the fastest, estimated over the budget by less than the model errs high
        if none_fits:
            assert p.remat == "none" and compiled == ["none"] and "compiled first" in p.why
        else:
            assert p.remat != "none" and len(compiled) == 2
            assert p.alternatives[0]["remat"] == "none" and "over the" in p.alternatives[0]["why_not"]


def test_pipeline_plan_for_tpu_v5e_is_verified_by_the_tpu_compiler():
    acc = accelerator(8, "tpu-v5e")
    assert acc.family == "tpu"
    p, compiled = planned_and_compiled(TINY, acc, 16, 64, stage=2, data=4, fsdp=1, tensor=1, micro_batches=2,
                                       remat="full")
    assert p.verified_on.startswith("8 × TPU v5 lite (compile only")
    assert p.verified_bytes_per_device == memory_analysis_bytes(compiled)
    assert compiled.cost_analysis()["flops"] > 0  # the TPU compiler reports FLOPs too


def test_a_step_a_tpu_v5e_chip_cannot_hold_is_refused_by_its_compiler():
    acc = accelerator(1, "tpu-v5e")
    config = ModelConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                         num_kv_heads=12, head_dim=64)  # ~110M parameters
    with pytest.raises(moai.NoPlanFits) as refused:
        moai.plan(config, 64, 1024, acc, micro_batches=1, remat="none", loss="whole", data=1, fsdp=1, tensor=1)
    message = str(refused.value)
    assert "\n" not in message and "TPU v5 lite (compile only" in message, message


def test_without_the_target_s_compiler_the_accelerator_says_why_it_simulates():
    with pytest.warns(UserWarning, match="powers of two.*simulated CPU devices"):
        acc = Accelerator(3, "tpu-v5e")
    assert acc.simulated and acc.family == "cpu" and "powers of two" in acc.fallback
    assert TpuTarget("v5", "megacore", dims=3).topology(64, 4)["topology_name"] == "v5:4x4x4"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Accelerator(8, "mi250").simulated  # no compiler for AMD here: simulated, as before, silently
    assert jax.devices()[0].platform == "cpu"


def test_the_refit_recovers_the_shares_that_made_the_compiled_bytes(tmp_path, capsys):
    """memory_model_check.py --fit on bytes the GPU family's own shares estimate: its fit reproduces them."""
    script = runpy.run_path(str(Path(__file__).resolve().parent.parent / "scripts/memory_model_check.py"))
    cases = script["TARGET_CASES"]["gpu"]
    rows = [{"case": i, "compiled": estimate_bytes(**script["case"](cases, i, "gpu")[-1], family="gpu")["total"]}
            for i in range(len(cases))]
    (tmp_path / "gpu.json").write_text(json.dumps(rows))
    assert script["fit"]("gpu", str(tmp_path / "gpu.json")) == 0
    out = capsys.readouterr().out
    fitted = ast.literal_eval(out.splitlines()[0].split(" = ", 1)[1])  # the line to paste: FAMILY_SCALES["gpu"] = {...}
    assert fitted.keys() == FAMILY_SCALES["gpu"].keys()
    assert float(re.search(r"worst error ([\d.]+)%", out).group(1)) <= 0.2
