"""Benchmark moai_jax training beside Hugging Face transformers on PyTorch, in one run on one machine.

    python scripts/benchmark.py --model tiny --flavor 8                  # 8 simulated devices on a CPU
    python scripts/benchmark.py --model llama3.2-3b --block-size 4096 --batch-size 1 --remat matmuls
    python scripts/benchmark.py --suite accelerator                     # the GPU/TPU CI job (< 8 minutes)
    python scripts/benchmark.py --suite cpu                             # the CPU table of docs/speed.md
    python scripts/benchmark.py --suite parity                          # bf16 vs float32 on the tiny model

moai_jax: compile (excluded), `--warmup` steps, then `--steps` steps each synced with
`block_until_ready`; the median step time gives tokens/s. MFU = flops_per_token × tokens/s over
(devices × the hardware's peak FLOP/s for the compute dtype). The reference is the same config as
transformers' `AutoModelForCausalLM` (random weights, SDPA attention) with `torch.optim.AdamW`
(fused on CUDA), the same batch, block, optimizer settings and gradient clipping, timed the same way,
on ONE device (cuda:0 or the CPU) in its own process, before JAX starts (scripts/benchmark_reference.py).
bf16 means float32 master parameters with bfloat16 compute on both sides (torch autocast). Weights are
always random: a Hugging Face directory only supplies the shape. A Mixture-of-Experts model (`tiny-moe`)
trains with its load-balancing loss on both sides.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()
LEARNING_RATE = 1e-4
# Dense float32 matmul peaks (TF32 tensor cores where XLA and torch use them by default), per device.
FLOAT32_PEAK = {"h100": 494e12, "h200": 494e12, "a100-80gb": 156e12, "a100-40gb": 156e12, "mi250": 45e12,
                "mi300x": 654e12}
# (model, batch size, remat) of `--suite accelerator`: block 4096, one device.
ACCELERATOR_SUITE = (("llama3.2-1b", 2, "auto"), ("llama3.2-3b", 1, "matmuls"))
# (model, batch size, block size) of `--suite cpu`, at flavors 1 and 8
CPU_SUITE = (("tiny", 8, 128), ("tiny-moe", 8, 128), ("llama-100m", 8, 128))


def benchmark_shapes():
    """Shapes the benchmark knows besides the presets: `llama-100m`, Llama 3.2 scaled to ~100M parameters, and
    `tiny-moe`, the tiny model as a Qwen3-MoE (8 experts of width 32, top-2, load-balancing loss 0.01)."""
    from moai_jax.models import ModelConfig
    small = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                 num_kv_heads=4, head_dim=64, bos_token_id=1, eos_token_id=2)
    moe = dict(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
               router_aux_loss_coef=0.01)
    return {"llama-100m": dataclasses.replace(ModelConfig.preset("llama3.2-1b"), **small),
            "tiny-moe": dataclasses.replace(ModelConfig.preset("tiny"), **moe)}


def model_config(name: str):
    from moai_jax.models import ModelConfig
    if Path(name).is_dir():
        return ModelConfig.from_pretrained(name)
    return benchmark_shapes().get(name) or ModelConfig.preset(name)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--model-name-or-path", dest="model", default="tiny",
                   help="a preset (tiny, llama3.2-1b, ...), llama-100m, tiny-moe, or a Hugging Face directory "
                        "(shape only)")
    p.add_argument("--flavor", default="1", help="devices behind the one virtual accelerator (simulated on a CPU)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch (sequences per step)")
    p.add_argument("--block-size", type=int, default=128, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype; parameters stay float32 (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--remat", choices=("auto", "none", "matmuls", "full"), default="auto",
                   help="recomputation in backward (auto: the planner's choice)")
    p.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=4 (default: the planner's choice)")
    p.add_argument("--micro-batches", type=int, default=None)
    p.add_argument("--memory-fraction", type=float, default=0.9,
                   help="share of each device's memory the planner may fill (default 0.9; JAX may use 0.92)")
    p.add_argument("--attention", choices=("auto", "xla", "cudnn", "blockwise"), default="auto")
    p.add_argument("--autotune", type=int, default=0, metavar="K",
                   help="time the planner's K best candidates on the devices and run the fastest (cached)")
    p.add_argument("--no-reference", action="store_true", help="skip the transformers/PyTorch reference")
    p.add_argument("--torch-compile", action="store_true", help="torch.compile the reference model")
    p.add_argument("--suite", choices=("accelerator", "cpu", "parity"), default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    from moai_jax import distributed  # one job of several processes: python -m moai_jax.launch, srun, ...

    distributed.add_arguments(p)
    return p.parse_args(argv)


# -- moai_jax --------------------------------------------------------------------------------------
def peak_flops(hardware, dtype: str, devices: int = 1) -> float:
    """Peak FLOP/s of `devices` devices for the compute dtype (the profile's figure is bf16). On a CPU,
    this machine's measured float32 peak, which simulated devices share (moai_jax/cpu_peak.py)."""
    if hardware.name == "cpu":
        from moai_jax.cpu_peak import machine_peak_flops

        return machine_peak_flops()[0]
    if dtype == "float32" and hardware.name in FLOAT32_PEAK:
        return devices * FLOAT32_PEAK[hardware.name]
    return devices * hardware.peak_flops


def measured_peak_bytes(devices) -> int | None:
    """The largest `peak_bytes_in_use` over the devices, where the backend reports it (GPU, TPU)."""
    stats = [d.memory_stats() for d in devices]
    peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
    return max(peaks) if peaks else None


def random_batches(vocab_size: int, batch_size: int, block_size: int, count: int = 2, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, (batch_size, block_size), dtype=np.int32) for _ in range(count)]


def jax_benchmark(args, config) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from moai_jax.accelerator import Accelerator
    from moai_jax.models import Decoder, flops_per_token
    from moai_jax.models.attention import resolve
    from moai_jax.optimizer import adamw
    from moai_jax.trainer import Trainer

    accelerator = Accelerator(args.flavor)
    dtype = args.dtype if args.dtype != "auto" else ("float32" if accelerator.platform == "cpu" else "bfloat16")
    build = lambda: Decoder(config, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype), attention=args.attention)  # noqa: E731
    # Knobs left "auto" are the planner's: it verifies its choice fits by compiling the step.
    trainer = Trainer(build, adamw(LEARNING_RATE), args.batch_size, args.block_size, accelerator, args.mesh,
                      micro_batches=args.micro_batches, remat=None if args.remat == "auto" else args.remat,
                      memory_fraction=args.memory_fraction, autotune=args.autotune)
    if trainer.autotune_report:
        print(trainer.autotune_report, file=sys.stderr if args.json else sys.stdout, flush=True)
    compile_seconds = trainer.compile(("input_ids", "labels"))
    compiled_bytes = trainer.compiled_bytes_per_device()

    rows = slice(jax.process_index() * args.batch_size // jax.process_count(),  # this process's rows
                 (jax.process_index() + 1) * args.batch_size // jax.process_count())
    batches = [{"input_ids": b[rows]} for b in random_batches(config.vocab_size, args.batch_size, args.block_size)]
    for i in range(args.warmup):
        jax.block_until_ready((trainer.step(batches[i % 2]), trainer.state))
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        metrics = trainer.step(batches[i % 2])
        jax.block_until_ready((metrics, trainer.state))
        times.append(time.perf_counter() - start)
    step_seconds = statistics.median(times)
    tokens_per_sec = args.batch_size * args.block_size / step_seconds
    hardware, flavor = accelerator.hardware, accelerator.flavor
    kind = accelerator.devices[0].device_kind
    return {
        "framework": "moai_jax", "devices": flavor, "simulated": accelerator.simulated,
        "device": (f"{flavor} simulated CPU devices" if accelerator.simulated else f"{flavor} × {kind}")
        + (f", {trainer.plan.mesh}" if flavor > 1 else ""),
        "hardware": hardware.name, "dtype": dtype, "remat": trainer.plan.remat, "plan": trainer.plan.summary(),
        "attention": resolve(args.attention, jnp.dtype(dtype), config.head_dim),
        "compile_seconds": compile_seconds, "step_seconds": step_seconds, "tokens_per_sec": tokens_per_sec,
        "mfu": flops_per_token(config, args.block_size) * tokens_per_sec / peak_flops(hardware, dtype, flavor),
        "compiled_bytes_per_device": compiled_bytes, "measured_peak_bytes": measured_peak_bytes(jax.local_devices()),
        "final_loss": float(metrics["loss"]),
    }


def parity(steps: int = 50, batch_size: int = 8, seq_len: int = 32, lr: float = 3e-3) -> dict:
    """Train the tiny model `steps` steps in float32 and in bfloat16 compute (float32 parameters) on the
    same learnable data; the final losses and their relative difference (the issue asks for <= 2%)."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from moai_jax.accelerator import Accelerator
    from moai_jax.models import Decoder, ModelConfig
    from moai_jax.optimizer import adamw
    from moai_jax.planner.plan import Plan
    from moai_jax.sharding.mesh import MeshShape
    from moai_jax.trainer import Trainer

    config, accelerator = ModelConfig.preset("tiny"), Accelerator(1)
    rng = np.random.default_rng(0)
    # Arithmetic progressions mod the vocabulary: the next token follows from the last two, so the loss falls.
    starts, strides = rng.integers(0, 256, (steps, batch_size, 1)), rng.integers(1, 9, (steps, batch_size, 1))
    data = ((starts + strides * np.arange(seq_len)) % config.vocab_size).astype(np.int32)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        build = lambda: Decoder(config, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype))  # noqa: E731
        one_device = Plan(flavor=1, hardware=accelerator.hardware.name, mesh=MeshShape(), batch_size=batch_size,
                          seq_len=seq_len, compute_dtype=dtype, why="bf16 parity: one device, nothing to plan")
        trainer = Trainer(build, adamw(lr), batch_size, seq_len, accelerator, plan=one_device)
        for ids in data:
            metrics = trainer.step({"input_ids": ids})
        losses[dtype] = float(metrics["loss"])
    difference = abs(losses["bfloat16"] - losses["float32"]) / losses["float32"]
    return {"steps": steps, "float32_loss": losses["float32"], "bfloat16_loss": losses["bfloat16"],
            "initial_loss_approx": float(np.log(config.vocab_size)), "relative_difference": difference,
            "ok": difference <= 0.02, "platform": accelerator.platform}


# -- transformers on PyTorch (scripts/benchmark_reference.py) ----------------------------------------
def reference_in_subprocess(args) -> dict:
    """Run the PyTorch reference in a child process, so its CUDA memory is free before JAX starts."""
    argv = [sys.executable, str(SCRIPT.parent / "benchmark_reference.py"), "--hf-config",
            json.dumps(model_config(args.model).to_hf_dict()), "--batch-size", str(args.batch_size), "--block-size",
            str(args.block_size), "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", args.dtype,
            "--remat", args.remat] + (["--torch-compile"] * args.torch_compile)
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"framework": "transformers (PyTorch)", "error": last[:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- reporting -------------------------------------------------------------------------------------
def _size(n) -> str:
    from moai_jax.sizes import format_bytes

    return "n/a" if n is None else format_bytes(n)


def table(results: list[dict]) -> str:
    """One markdown table over benchmark results (each: model, moai_jax row, optional pytorch row)."""
    head = ["model", "params", "framework", "devices", "dtype", "batch × block", "remat", "attention", "step (s)",
            "tokens/s",
            "MFU", "compiled peak / device", "measured peak", "vs PyTorch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        for row in filter(None, (r["moai_jax"], r.get("pytorch"))):
            if "error" in row:
                cells = [row["framework"], row["error"]] + [""] * (len(head) - 4)
            else:
                ratio = r.get("speedup") if row["framework"] == "moai_jax" else None
                cells = [row["framework"], row["device"], row["dtype"], f"{r['batch_size']} × {r['block_size']}",
                         row["remat"], row.get("attention", "sdpa"), f"{row['step_seconds']:.3f}",
                         f"{row['tokens_per_sec']:,.0f}",
                         f"{row['mfu']:.1%}", _size(row.get("compiled_bytes_per_device")),
                         _size(row.get("measured_peak_bytes")), f"{ratio:.2f}×" if ratio else ""]
            lines.append("| " + " | ".join([r["model"], f"{r['params'] / 1e6:.1f}M"] + cells) + " |")
    return "\n".join(lines)


def complete(args, config, mine: dict, reference: dict | None) -> dict:
    """A benchmark result: the moai_jax row, the reference row with its MFU on one device, the ratio."""
    from moai_jax.accelerator import hardware_profile
    from moai_jax.models import flops_per_token, param_count

    flops = flops_per_token(config, args.block_size)
    if reference and "error" not in reference:
        peak = peak_flops(hardware_profile(mine["hardware"]), reference["dtype"])
        reference = {**reference, "mfu": flops * reference["tokens_per_sec"] / peak}
    ok = reference and "error" not in reference
    return {"model": args.model, "params": param_count(config), "flops_per_token": flops,
            "batch_size": args.batch_size, "block_size": args.block_size, "moai_jax": mine, "pytorch": reference,
            "speedup": mine["tokens_per_sec"] / reference["tokens_per_sec"] if ok else None,
            "machine": f"{cpu_name()} ({os.cpu_count()} cores); {mine['device']}"}


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        line = next(row for row in lines if row.startswith("model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return "CPU"


def benchmark(args) -> dict:
    import jax

    config = model_config(args.model)
    reference = None if args.no_reference or jax.process_index() > 0 else reference_in_subprocess(args)
    return complete(args, config, jax_benchmark(args, config), reference)


# -- suites ----------------------------------------------------------------------------------------
def child(*argv: str, timeout: float | None = None) -> dict:
    """Run this script with `argv --json` in a fresh process (fresh JAX, its own device count) → its JSON,
    or {"error": why} when it failed or ran out of time."""
    try:
        done = subprocess.run([sys.executable, str(SCRIPT), *argv, "--json"], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed without a message"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def one_result(out: dict, model: str, batch: int, block: int) -> dict:
    """The single benchmark result of a child, or an error row standing in for it."""
    if "error" not in out:
        return out["results"][0]
    from moai_jax.models import param_count
    return {"model": model, "params": param_count(model_config(model)), "batch_size": batch, "block_size": block,
            "moai_jax": {"framework": "moai_jax", "error": out["error"]}, "pytorch": None, "speedup": None}


def platform_probe() -> str:
    code = "import jax; print(jax.devices()[0].platform)"
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    return done.stdout.strip() or "cpu"


def suite(args) -> dict:
    from moai_jax.errors import MoaiError
    if args.suite == "parity":
        return {"parity": parity()}
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", args.dtype]
    results = []
    if args.suite == "accelerator":
        platform = platform_probe()
        if platform == "cpu":
            raise MoaiError("--suite accelerator needs a GPU or TPU and this machine has none; on a CPU run "
                            "--suite cpu (the CPU table) or --suite parity")
        checked = child("--suite", "parity", timeout=120)
        checked = checked.get("parity") or {"platform": "?", "steps": 50, "ok": False, "error": checked["error"]}
        no_reference = [] if platform == "gpu" else ["--no-reference"]  # PyTorch runs on CUDA or ROCm GPUs
        for model, batch, remat in ACCELERATOR_SUITE:
            out = child("--model", model, "--batch-size", str(batch), "--block-size", "4096", "--remat", remat,
                        *common, *no_reference, timeout=300)
            results.append(one_result(out, model, batch, 4096))
        return {"parity": checked, "results": results}
    for model, batch, block in CPU_SUITE:
        shape = ["--model", model, "--batch-size", str(batch), "--block-size", str(block), *common]
        one = one_result(child(*shape, "--flavor", "1"), model, batch, block)
        eight = one_result(child(*shape, "--flavor", "8", "--mesh", "fsdp=8", "--no-reference"),  # ZeRO-3 over 8
                           model, batch, block)
        reference = one["pytorch"]
        if reference and "error" not in reference and "error" not in eight["moai_jax"]:
            eight.update(pytorch=reference, speedup=eight["moai_jax"]["tokens_per_sec"] / reference["tokens_per_sec"])
        results += [one, eight]
    return {"results": results}


def report(out: dict) -> str:
    lines = []
    if "parity" in out:
        p = out["parity"]
        if "error" in p:
            lines.append(f"bf16 parity FAILED: {p['error']}")
        else:
            lines.append(f"bf16 parity ({p['platform']}, tiny model, {p['steps']} steps): float32 loss "
                         f"{p['float32_loss']:.4f}, bfloat16 loss {p['bfloat16_loss']:.4f}, difference "
                         f"{p['relative_difference']:.2%} ({'ok' if p['ok'] else 'FAILED'}: limit 2%)")
    if out.get("results"):
        lines.append(table(out["results"]))
        machine = next((r["machine"] for r in out["results"] if "machine" in r), "n/a")
        lines.append(f"Machine: {machine}. PyTorch runs on ONE device; moai_jax on the "
                     f"flavor's devices (simulated ones share the host's cores). MFU = flops_per_token × tokens/s / "
                     f"(devices × peak FLOP/s for the dtype).")
        if any((r.get("moai_jax") or {}).get("hardware") == "cpu" for r in out["results"]):
            from moai_jax.cpu_peak import machine_peak_flops

            flops, how = machine_peak_flops()
            lines.append(f"On a CPU the peak is this machine's, shared by simulated devices: {flops / 1e9:.1f} "
                         f"GFLOP/s, {how}.")
    return "\n".join(lines)


def run(args) -> int:
    from moai_jax import distributed
    from moai_jax.accelerator import parse_flavor, simulate_devices
    from moai_jax.errors import MoaiError

    for name in ("batch_size", "block_size", "steps"):
        if getattr(args, name) < 1:
            raise MoaiError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}")
    if args.suite:
        out = suite(args)
    else:
        distributed.join_from_args(args)  # alone, or one process of several: before JAX starts
        simulate_devices(parse_flavor(args.flavor))  # before JAX starts its backends
        out = {"results": [benchmark(args)]}
    if distributed.join().process_id > 0:  # of several processes, process 0 reports
        return 0
    print(json.dumps(out) if args.json else report(out))
    failed = any("error" in r["moai_jax"] for r in out.get("results", []))
    return 1 if failed or not out.get("parity", {}).get("ok", True) else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from moai_jax.cli import run_script

    return run_script(run, args)


if __name__ == "__main__":
    sys.exit(main())
