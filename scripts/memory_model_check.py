"""Memory model accuracy: estimated vs XLA-compiled bytes per device, tiny to 70B, flavors 1 to 64.

    python scripts/memory_model_check.py                # every CPU case (about 15 minutes on 2 busy cores)
    python scripts/memory_model_check.py --quick        # the first few
    python scripts/memory_model_check.py --cases 0,5,21
    python scripts/memory_model_check.py --target gpu   # compiled for compile-only H100s (.[compile-cuda])
    python scripts/memory_model_check.py --target tpu   # compiled for compile-only TPU v5p / v5e (.[compile-tpu])
    python scripts/memory_model_check.py --target gpu --json gpu.json        # keep what was compiled, then
    python scripts/memory_model_check.py --target gpu --fit gpu.json --hold 'gradients pipeline'  # re-fit

Each case is compiled with the planner's verify() by the compiler of its target: simulated CPU
devices (blockwise attention), compile-only NVIDIA H100s (cuDNN attention; XLA cannot autotune its
kernels without a GPU) or compile-only TPU slices, and estimated with that compiler family's memory
model. A case passes when the estimate is within 10% of the compiled bytes and, erring on the safe
side, no more than 3% under them. `--fit FILE` compiles nothing: it re-fits the target family's shares
(`FAMILY_SCALES` in moai_jax/planner/memory.py) to the compiled bytes a `--json` run kept, by a linear
program that makes the worst error as small as it goes with no case more than FIT_UNDER under, and
prints the shares to paste and every case's error with them.
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
    ("llama3-8b", 8, 1, 8, 1, 32, 1024, 1, "none", "whole", "bfloat16"),  # the lighter remat plan for 8 × h100
    ("llama3-70b", 64, 1, 16, 4, 256, 1024, 1, "full", "whole", "bfloat16"),  # plan.py's for 64 × h100
    ("llama3-70b", 64, 2, 8, 4, 256, 1024, 1, "full", "whole", "bfloat16"),  # as fast, just over the budget
    ("llama3-8b", 8, 2, 4, 1, 32, 1024, 1, "matmuls", "whole", "bfloat16"),  # plan.py's for 8 × h100 before
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


def case(cases: list, i: int, target: str):
    """Case `i`: (its name and flavor, model config, LoRA config or None, the Plan to compile, the
    estimate_bytes arguments)."""
    import jax

    from moai_jax.models.lora import LoraConfig
    from moai_jax.planner.plan import Plan
    from moai_jax.sharding.mesh import MeshShape

    name, flavor, d, f, t, batch, seq, mb, remat, loss, dtype, *rest = cases[i]
    config, lora = model_config(name), LoraConfig() if rest[1:] == ["lora"] else None
    mesh = MeshShape(stage=rest[0] if rest else 1, data=d, fsdp=f, tensor=t)
    plan = Plan(flavor=flavor, hardware=target, mesh=mesh, batch_size=batch, seq_len=seq, micro_batches=mb,
                remat=remat, loss=loss, compute_dtype=dtype, lora=lora and lora.to_dict())
    estimate = dict(config=config, batch_size=batch, seq_len=seq, mesh=mesh, micro_batches=mb, remat=remat,
                    loss=loss, lora=lora, base_bytes=jax.numpy.dtype(dtype).itemsize)
    return name, flavor, config, lora, plan, estimate


FIT_UNDER = 0.028  # the fit keeps every case at most this far under (the pass mark's 3%, less rounding)


def fit(target: str, path: str, hold: tuple[str, ...] = ()) -> int:
    """Re-fit FAMILY_SCALES[target] to the compiled bytes in `path` (rows of --json): shares at 0 (copies
    the family's compiler does not make) and those named in `hold` (measured on steps outside these cases)
    keep their values, the others are fitted; prints them and each case's error."""
    import numpy as np
    from scipy.optimize import linprog

    from moai_jax.planner.memory import FAMILY_SCALES, estimate_bytes, share_key, step_modes

    scales = FAMILY_SCALES[target]
    free = [k for k, v in scales.items() if v and k not in hold]
    rows = json.loads(Path(path).read_text())
    shares, fixed, compiled = [], [], []  # per case: bytes each free share scales, the other bytes as scaled
    for row in rows:
        _, _, _, _, plan, estimate = case(TARGET_CASES[target], row["case"], target)
        modes = step_modes(plan.mesh, plan.micro_batches, plan.remat, plan.loss)
        a, b = np.zeros(len(free)), 0.0
        terms = estimate_bytes(**estimate)  # the CPU terms the shares scale
        for term, value in ((k, v) for k, v in terms.items() if k != "total"):
            key = share_key(scales, term, modes)
            if key in free:
                a[free.index(key)] += value
            else:
                b += value * (1.0 if key is None else scales[key])
        shares.append(a)
        fixed.append(b)
        compiled.append(row["compiled"])
    # as shares of the compiled bytes: estimate / compiled = a·x + b, for the free shares x
    a, b = np.array(shares) / np.array(compiled)[:, None], np.array(fixed) / np.array(compiled)
    # variables: x, then the worst error w; minimize w (and, lightly, the shares, for one answer):
    # a·x + b − 1 ≤ w,  1 − (a·x + b) ≤ w,  1 − (a·x + b) ≤ FIT_UNDER
    n, ones = len(free), np.ones((len(rows), 1))
    bound = np.vstack([np.hstack([a, -ones]), np.hstack([-a, -ones]), np.hstack([-a, 0 * ones])])
    limit = np.concatenate([1 - b, b - 1, b - 1 + FIT_UNDER])
    result = linprog(np.r_[1e-4 * np.ones(n), 1.0], A_ub=bound, b_ub=limit, bounds=[(0, 3)] * n + [(0, None)])
    if not result.success:
        print(f"error: no shares keep every case within {FIT_UNDER:.1%} under its compiled bytes ({result.message})")
        return 2
    fitted = scales | {k: round(float(v), 3) for k, v in zip(free, result.x)}
    errors = a @ np.array([fitted[k] for k in free]) + b - 1
    print(f'FAMILY_SCALES["{target}"] = {fitted}')
    for row, error in zip(rows, errors):
        print(f"{row['case']:>2} {' '.join(map(str, TARGET_CASES[target][row['case']][:11])):<70} {error:+7.1%}")
    print(f"{target}: fitted to {len(rows)} cases with {n} shares: worst error {max(abs(errors)):.1%}, most under "
          f"{min(errors):+.1%}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="only the first 6 cases")
    p.add_argument("--cases", default=None, help="comma-separated case numbers")
    p.add_argument("--terms", action="store_true", help="also print each estimate term by term (MiB)")
    p.add_argument("--target", choices=tuple(TARGET_CASES), default="cpu",
                   help="the compiler to check against: cpu (simulated devices), gpu (H100), tpu (v5p, v5e)")
    p.add_argument("--json", default=None, help="also write every case's terms and compiled bytes to this file")
    p.add_argument("--fit", default=None, metavar="FILE",
                   help="compile nothing: re-fit the target family's shares to the compiled bytes FILE (--json) holds")
    p.add_argument("--hold", default="", help="with --fit: comma-separated shares to keep as they are, e.g. "
                                              "'gradients pipeline'")
    args = p.parse_args(argv)
    if args.fit:
        return fit(args.target, args.fit, tuple(k.strip() for k in args.hold.split(",") if k.strip()))
    cases = TARGET_CASES[args.target]
    chosen = (list(range(6)) if args.quick else [int(i) for i in args.cases.split(",")] if args.cases
              else list(range(len(cases))))

    from moai_jax.accelerator import simulate_devices

    simulate_devices(max(cases[i][1] for i in chosen))
    from moai_jax.planner.memory import OVER_TOLERANCE, UNDER_TOLERANCE, estimate_bytes
    from moai_jax.planner.verify import abstract_model
    from moai_jax.step import compile_step

    print(f"{'#':>2} {'model':<10} {'fl':>3} {'mesh s/d/f/t':>12} {'batch':>5} {'seq':>5} {'mb':>3} {'remat':<7} "
          f"{'loss':<7} {'dtype':<13} {'estimated':>12} {'compiled':>12} {'error':>7}")
    worst, lowest, rows = 0.0, 0.0, []
    for i in chosen:
        name, flavor, config, lora, plan, estimate = case(cases, i, args.target)
        mesh, batch, seq, mb = plan.mesh, plan.batch_size, plan.seq_len, plan.micro_batches
        est = estimate_bytes(**estimate, family=args.target)
        _, compiled, verified = compile_step(plan, abstract_model(config, plan),
                                             target_devices(args.target, flavor, name))
        got = verified.bytes_per_device
        err = est["total"] / got - 1
        worst, lowest = max(worst, abs(err)), min(lowest, err)
        mode = plan.compute_dtype + (" LoRA" if lora else "")
        print(f"{i:>2} {name:<10} {flavor:>3} {f'{mesh.stage}/{mesh.data}/{mesh.fsdp}/{mesh.tensor}':>12} {batch:>5} "
              f"{seq:>5} {mb:>3} {plan.remat:<7} {plan.loss:<7} {mode:<13} {est['total'] / 2**20:>10.2f}Mi "
              f"{got / 2**20:>10.2f}Mi {err:>+7.1%}", flush=True)
        if args.terms:
            print("   ", {k: round(v / 2**20, 1) for k, v in est.items()})
        m = compiled.memory_analysis()  # the compiled peak's parts, for re-fitting FAMILY_SCALES offline
        parts = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
        rows.append({"case": i, "target": args.target, "compiled": got, "compiled_parts": parts,
                     "cpu_terms": estimate_bytes(**estimate), "remat": plan.remat,
                     "seconds": round(verified.seconds, 1)})
        if args.json:  # after every case: a long run that stops still leaves what it measured
            Path(args.json).write_text(json.dumps(rows, indent=1))
    passed = worst <= OVER_TOLERANCE and lowest >= -UNDER_TOLERANCE
    print(f"{args.target}: worst error {worst:.1%}, most under {lowest:+.1%} over {len(chosen)} cases "
          f"({'PASS' if passed else 'FAIL'}: within {OVER_TOLERANCE:.0%}, none under by more than "
          f"{UNDER_TOLERANCE:.0%})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
