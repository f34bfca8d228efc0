"""Memory model accuracy: estimated vs XLA-compiled bytes per device, tiny to 70B, flavors 1 to 64.

    python scripts/memory_model_check.py                # every CPU case (about 15 minutes on 2 busy cores)
    python scripts/memory_model_check.py --quick        # the first few
    python scripts/memory_model_check.py --cases 0,5,21
    python scripts/memory_model_check.py --target gpu   # compiled for compile-only H100s (.[compile-cuda])
    python scripts/memory_model_check.py --target tpu   # compiled for compile-only TPU v5p / v5e (.[compile-tpu])

Each case is compiled with the planner's verify() by the compiler of its target: simulated CPU
devices (blockwise attention), compile-only NVIDIA H100s (cuDNN attention; XLA cannot autotune its
kernels without a GPU) or compile-only TPU slices, and estimated with that compiler family's memory
model. A case passes when the estimate is within 10% of the compiled bytes and, erring on the safe
side, no more than 3% under them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# (model, flavor, data, fsdp, tensor, batch, seq, micro_batches, remat, loss, compute dtype[, stages[, "lora"]])
CASES = [
    ("tiny", 1, 1, 1, 1, 8, 128, 1, "none", "whole", "float32"),
    ("tiny", 8, 8, 1, 1, 16, 128, 1, "none", "whole", "float32"),
    ("tiny", 8, 1, 8, 1, 16, 128, 2, "full", "whole", "float32"),
    ("small", 1, 1, 1, 1, 8, 512, 1, "none", "whole", "float32"),
    ("small", 1, 1, 1, 1, 8, 512, 1, "matmuls", "whole", "float32"),
    ("small", 1, 1, 1, 1, 8, 512, 1, "full", "whole", "float32"),
    ("small", 1, 1, 1, 1, 8, 512, 2, "none", "whole", "float32"),
    ("small", 8, 1, 8, 1, 16, 512, 1, "none", "whole", "float32"),
    ("small", 8, 1, 1, 8, 16, 512, 1, "none", "whole", "float32"),
    ("small", 8, 8, 1, 1, 16, 512, 1, "none", "whole", "float32"),
    ("small", 8, 2, 2, 2, 32, 1024, 2, "matmuls", "chunked", "float32"),
    ("small", 8, 1, 4, 2, 16, 1024, 1, "full", "chunked", "bfloat16"),
    ("medium", 4, 1, 4, 1, 8, 1024, 1, "full", "chunked", "bfloat16"),
    ("medium", 4, 2, 2, 1, 16, 1024, 2, "matmuls", "whole", "bfloat16"),
    ("medium", 16, 2, 4, 2, 32, 1024, 1, "none", "chunked", "bfloat16"),
    ("medium", 16, 1, 16, 1, 64, 512, 4, "full", "whole", "bfloat16"),
    ("llama3-8b", 4, 1, 4, 1, 16, 1024, 1, "full", "chunked", "bfloat16"),
    ("llama3-8b", 16, 1, 16, 1, 64, 1024, 1, "full", "chunked", "bfloat16"),
    ("llama3-8b", 16, 1, 16, 1, 512, 1024, 8, "full", "chunked", "bfloat16"),
    ("llama3-8b", 16, 1, 8, 2, 512, 1024, 16, "matmuls", "chunked", "bfloat16"),
    ("llama3-70b", 64, 1, 64, 1, 512, 1024, 4, "full", "chunked", "bfloat16"),
    ("llama3-70b", 64, 1, 8, 8, 512, 1024, 8, "full", "chunked", "bfloat16"),
    # pipelined
    ("small", 4, 1, 1, 1, 16, 512, 4, "none", "whole", "float32", 4),
    ("small", 8, 2, 1, 2, 32, 512, 4, "matmuls", "whole", "float32", 2),
    ("medium", 8, 1, 2, 1, 16, 1024, 8, "full", "chunked", "bfloat16", 4),
    ("medium", 16, 1, 4, 2, 32, 1024, 4, "full", "chunked", "bfloat16", 2),
    ("llama3-8b", 16, 1, 2, 1, 64, 1024, 16, "full", "chunked", "bfloat16", 8),
    ("llama3-70b", 64, 1, 8, 1, 512, 1024, 16, "full", "whole", "bfloat16", 8),
    ("llama2-7b", 32, 1, 32, 1, 256, 2048, 4, "full", "chunked", "float32"),  # the plan for 32 × tpu-v5e
    # LoRA (r 8 on every projection, dropout 0.05): a frozen base in the compute dtype
    ("small", 1, 1, 1, 1, 8, 512, 1, "none", "whole", "bfloat16", 1, "lora"),
    ("small", 8, 1, 8, 1, 16, 512, 2, "matmuls", "chunked", "bfloat16", 1, "lora"),
    ("medium", 8, 1, 4, 2, 16, 1024, 1, "full", "whole", "bfloat16", 1, "lora"),
    ("small", 8, 8, 1, 1, 32, 512, 1, "full", "whole", "float32", 1, "lora"),
    ("medium", 4, 1, 4, 1, 16, 1024, 2, "matmuls", "chunked", "bfloat16", 1, "lora"),
    ("llama3-8b", 1, 1, 1, 1, 32, 1024, 8, "matmuls", "chunked", "bfloat16", 1, "lora"),  # plan.py --use-lora's, h100
    ("llama3-70b", 8, 1, 8, 1, 32, 1024, 1, "full", "whole", "bfloat16", 1, "lora"),  # the same, flavor 8
    ("small", 8, 2, 2, 2, 16, 256, 1, "matmuls", "whole", "float32"),  # tests/test_planner.py's
    ("llama3-8b", 8, 1, 8, 1, 32, 1024, 1, "matmuls", "whole", "bfloat16"),  # plan.py's full fine-tuning, h100
    ("llama3.2-3b", 4, 1, 4, 1, 64, 1024, 4, "matmuls", "whole", "bfloat16"),  # plan.py's for 4 × mi250 (issue 24)
]
# Compiled for 1 to 64 compile-only H100 SXM (bfloat16 compute, cuDNN attention)
GPU_CASES = [
    ("small", 1, 1, 1, 1, 8, 512, 1, "none", "whole", "bfloat16"),
    ("small", 1, 1, 1, 1, 8, 512, 1, "matmuls", "whole", "bfloat16"),
    ("small", 1, 1, 1, 1, 8, 512, 1, "full", "whole", "bfloat16"),
    ("small", 8, 1, 8, 1, 16, 512, 1, "none", "whole", "bfloat16"),
    ("small", 8, 1, 1, 8, 16, 512, 1, "none", "whole", "bfloat16"),
    ("small", 8, 2, 2, 2, 32, 1024, 2, "matmuls", "chunked", "bfloat16"),
    ("medium", 4, 1, 4, 1, 8, 1024, 1, "full", "chunked", "bfloat16"),
    ("medium", 4, 2, 2, 1, 16, 1024, 2, "matmuls", "whole", "bfloat16"),
    ("medium", 16, 2, 4, 2, 32, 1024, 1, "none", "chunked", "bfloat16"),
    ("llama3.2-1b", 8, 4, 2, 1, 32, 2048, 1, "none", "whole", "bfloat16"),
    ("llama3-8b", 8, 1, 8, 1, 32, 1024, 1, "matmuls", "whole", "bfloat16"),  # plan.py's for 8 × h100
    ("llama3-8b", 8, 1, 8, 1, 32, 1024, 2, "none", "whole", "bfloat16"),  # 1 micro-batch: over XLA:GPU's own limit
    ("llama3-8b", 16, 1, 16, 1, 64, 1024, 1, "full", "chunked", "bfloat16"),
    ("llama3-70b", 64, 1, 32, 2, 256, 1024, 1, "full", "whole", "bfloat16"),  # plan.py's for 64 × h100
    ("llama3-70b", 64, 1, 32, 2, 256, 1024, 1, "matmuls", "whole", "bfloat16"),
    ("llama3-70b", 64, 1, 8, 8, 512, 1024, 8, "full", "chunked", "bfloat16"),
    ("small", 8, 2, 1, 2, 32, 512, 4, "matmuls", "whole", "bfloat16", 2),
    ("medium", 8, 1, 2, 1, 16, 1024, 8, "full", "chunked", "bfloat16", 4),
    ("small", 8, 1, 8, 1, 16, 512, 2, "matmuls", "chunked", "bfloat16", 1, "lora"),
    ("medium", 8, 1, 4, 2, 16, 1024, 1, "full", "whole", "bfloat16", 1, "lora"),
    ("llama3-8b", 1, 1, 1, 1, 32, 1024, 8, "matmuls", "chunked", "bfloat16", 1, "lora"),
]
# Compiled for compile-only TPU v5p slices (95 GB a chip; v5e's 16 GB for the 7B plan of 32 × tpu-v5e)
TPU_CASES = [
    ("small", 4, 1, 1, 1, 8, 512, 1, "none", "whole", "bfloat16"),
    ("small", 4, 1, 4, 1, 16, 512, 1, "matmuls", "whole", "bfloat16"),
    ("small", 8, 2, 2, 2, 32, 1024, 2, "full", "chunked", "bfloat16"),
    ("medium", 4, 1, 4, 1, 8, 1024, 1, "full", "chunked", "bfloat16"),
    ("medium", 16, 2, 4, 2, 32, 1024, 1, "none", "chunked", "bfloat16"),
    ("llama3-8b", 8, 1, 8, 1, 32, 1024, 1, "matmuls", "whole", "bfloat16"),
    ("llama3-8b", 16, 1, 16, 1, 64, 1024, 1, "full", "chunked", "bfloat16"),
    ("medium", 8, 1, 2, 1, 16, 1024, 8, "full", "chunked", "bfloat16", 4),
    ("medium", 8, 1, 4, 2, 16, 1024, 1, "full", "whole", "bfloat16", 1, "lora"),
    ("llama2-7b", 32, 1, 32, 1, 256, 2048, 4, "full", "chunked", "bfloat16"),  # the plan for 32 × tpu-v5e
]
TARGET_CASES = {"cpu": CASES, "gpu": GPU_CASES, "tpu": TPU_CASES}


def target_devices(target: str, flavor: int, name: str):
    """The devices a case compiles for: simulated CPU ones, or compile-only H100s / TPUs."""
    import jax

    from moai_jax.accelerator import HARDWARE
    from moai_jax.targets import compile_only_devices

    if target == "cpu":
        return jax.devices()
    hardware = HARDWARE["h100" if target == "gpu" else "tpu-v5e" if name == "llama2-7b" else "tpu-v5p"]
    return compile_only_devices(hardware.target, flavor, hardware.devices_per_host)


def model_config(name: str):
    from moai_jax.models import ModelConfig

    extra = {
        "small": ModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                             num_kv_heads=4, head_dim=32),
        "medium": ModelConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=8,
                              num_heads=16, num_kv_heads=8, head_dim=64),
    }
    return extra.get(name) or ModelConfig.preset(name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="only the first 6 cases")
    p.add_argument("--cases", default=None, help="comma-separated case numbers")
    p.add_argument("--terms", action="store_true", help="also print each estimate term by term (MiB)")
    p.add_argument("--target", choices=tuple(TARGET_CASES), default="cpu",
                   help="the compiler to check against: cpu (simulated devices), gpu (H100), tpu (v5p, v5e)")
    p.add_argument("--json", default=None, help="also write every case's terms and compiled bytes to this file")
    args = p.parse_args(argv)
    cases = TARGET_CASES[args.target]
    chosen = (list(range(6)) if args.quick else [int(i) for i in args.cases.split(",")] if args.cases
              else list(range(len(cases))))

    from moai_jax.accelerator import simulate_devices

    simulate_devices(max(cases[i][1] for i in chosen))
    import jax

    from moai_jax.models.lora import LoraConfig
    from moai_jax.planner.memory import estimate_bytes
    from moai_jax.planner.plan import Plan
    from moai_jax.planner.verify import abstract_model
    from moai_jax.sharding.mesh import MeshShape
    from moai_jax.step import compile_step

    print(f"{'#':>2} {'model':<10} {'fl':>3} {'mesh s/d/f/t':>12} {'batch':>5} {'seq':>5} {'mb':>3} {'remat':<7} "
          f"{'loss':<7} {'dtype':<13} {'estimated':>12} {'compiled':>12} {'error':>7}")
    worst, lowest, rows = 0.0, 0.0, []
    for i in chosen:
        name, flavor, d, f, t, batch, seq, mb, remat, loss, dtype, *rest = cases[i]
        config, lora = model_config(name), LoraConfig() if rest[1:] == ["lora"] else None
        mesh = MeshShape(stage=rest[0] if rest else 1, data=d, fsdp=f, tensor=t)
        plan = Plan(flavor=flavor, hardware=args.target, mesh=mesh, batch_size=batch, seq_len=seq, micro_batches=mb,
                    remat=remat, loss=loss, compute_dtype=dtype, lora=lora and lora.to_dict())
        est = estimate_bytes(config, batch, seq, mesh, micro_batches=mb, remat=remat, loss=loss, lora=lora,
                             base_bytes=jax.numpy.dtype(dtype).itemsize, family=args.target)
        _, compiled, verified = compile_step(plan, abstract_model(config, plan),
                                             target_devices(args.target, flavor, name))
        got = verified.bytes_per_device
        err = est["total"] / got - 1
        worst, lowest = max(worst, abs(err)), min(lowest, err)
        mode = dtype + (" LoRA" if lora else "")
        print(f"{i:>2} {name:<10} {flavor:>3} {f'{mesh.stage}/{d}/{f}/{t}':>12} {batch:>5} {seq:>5} {mb:>3} {remat:<7} "
              f"{loss:<7} {mode:<13} {est['total'] / 2**20:>10.2f}Mi {got / 2**20:>10.2f}Mi {err:>+7.1%}", flush=True)
        if args.terms:
            print("   ", {k: round(v / 2**20, 1) for k, v in est.items()})
        cpu_terms = estimate_bytes(config, batch, seq, mesh, micro_batches=mb, remat=remat, loss=loss, lora=lora,
                                   base_bytes=jax.numpy.dtype(dtype).itemsize)  # what FAMILY_SCALES scale
        m = compiled.memory_analysis()  # the compiled peak's parts, for re-fitting FAMILY_SCALES offline
        parts = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
        rows.append({"case": i, "compiled": got, "compiled_parts": parts, "cpu_terms": cpu_terms, "remat": remat,
                     "seconds": round(verified.seconds, 1)})
        if args.json:  # after every case: a long run that stops still leaves what it measured
            Path(args.json).write_text(json.dumps(rows, indent=1))
    passed = worst <= 0.10 and lowest >= -0.03
    print(f"{args.target}: worst error {worst:.1%}, most under {lowest:+.1%} over {len(chosen)} cases "
          f"({'PASS' if passed else 'FAIL'}: within 10%, none under by more than 3%)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
