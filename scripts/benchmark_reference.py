"""The transformers-on-PyTorch side of scripts/benchmark.py: one model's training step on ONE device (cuda:0 or
the CPU), timed as the moai_jax side is, in its own process so its CUDA memory is free before JAX starts.

    python scripts/benchmark_reference.py --hf-config '{"model_type": "llama", ...}' --batch-size 8 --block-size 128

The model is `AutoModelForCausalLM` of the config.json given (random weights, SDPA attention) with
`torch.optim.AdamW` (fused on CUDA), the benchmark's batches, optimizer settings and gradient clipping; a
Mixture-of-Experts model computes its router's load-balancing loss too (`output_router_logits`). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

from benchmark import LEARNING_RATE, random_batches  # scripts/ is this script's folder: sys.path[0]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-config", required=True, help="the model's config.json, as one JSON string")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--remat", choices=("auto", "none", "matmuls", "full"), default="auto")
    p.add_argument("--torch-compile", action="store_true")
    return p.parse_args(argv)


def _tpu_host() -> bool:
    """TPU chips attached (libtpu alone is also installed to compile for TPUs on machines without them)."""
    return importlib.util.find_spec("libtpu") is not None and (any(Path("/dev").glob("accel[0-9]*"))
                                                                or any(Path("/dev/vfio").glob("[0-9]*")))


def torch_reference(args) -> dict:
    """The training step of `args.hf_config` in transformers + PyTorch on one device."""
    import gc

    import numpy as np
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and _tpu_host():
        return {"framework": "transformers (PyTorch)", "error": "no GPU for PyTorch on a TPU host; use --no-reference"}
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    hf = json.loads(args.hf_config)
    # a Mixture-of-Experts model's loss adds the load-balancing loss, as moai_jax's does
    hf["output_router_logits"] = "num_experts_per_tok" in hf
    hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    batches = [torch.from_numpy(b.astype(np.int64))
               for b in random_batches(hf_config.vocab_size, args.batch_size, args.block_size)]

    def run(checkpointing: bool) -> dict:
        torch.manual_seed(0)
        with torch.device(device):  # initialized where it runs: a 3B model on the CPU first takes minutes
            model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa",
                                                                  dtype=torch.float32)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        step_model = torch.compile(model) if args.torch_compile else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.95), eps=1e-8,
                                      weight_decay=0.0, fused=device == "cuda")

        def step(ids):
            ids = ids.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                loss = step_model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if device == "cuda":
                torch.cuda.synchronize()
            return loss

        for i in range(args.warmup):
            step(batches[i % 2])
        if device == "cpu" and torch.get_num_threads() > 1:
            # OpenMP threads on a busy or small CPU can be many times slower than one: keep the faster.
            timed = {}
            for threads in (torch.get_num_threads(), 1):
                torch.set_num_threads(threads)
                start = time.perf_counter()
                step(batches[0])
                timed[threads] = time.perf_counter() - start
            torch.set_num_threads(min(timed, key=timed.get))
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(args.steps):
            start = time.perf_counter()
            loss = step(batches[i % 2])
            times.append(time.perf_counter() - start)
        step_seconds = statistics.median(times)
        name = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        return {"framework": "transformers (PyTorch)", "devices": 1, "device": f"1 × {name}", "dtype": dtype,
                "remat": "gradient checkpointing" if checkpointing else "none", "step_seconds": step_seconds,
                "tokens_per_sec": args.batch_size * args.block_size / step_seconds, "final_loss": float(loss.detach()),
                "measured_peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
                "torch": torch.__version__, "transformers": transformers.__version__}

    if device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32, as XLA uses for float32 matmuls on GPU
    # PyTorch's best shot: without gradient checkpointing if that fits, else with it.
    for checkpointing in [False] if args.remat == "none" else [False, True]:
        try:
            return run(checkpointing)
        except torch.OutOfMemoryError:
            pass
        gc.collect()  # outside the except block, so the failed frame (and its model) is gone
        torch.cuda.empty_cache()
    return {"framework": "transformers (PyTorch)", "error": "out of memory on one device"}


if __name__ == "__main__":
    print(json.dumps(torch_reference(parse_args())))
    sys.exit(0)
