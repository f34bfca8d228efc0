"""Explain the plan moai_jax would choose: mesh, remat, micro-batches, memory, time, alternatives.

    python scripts/plan.py --model llama3-70b --flavor 64 --batch-size 512 --block-size 1024 --hardware h100
    python scripts/plan.py --model llama3-8b --flavor 16 --batch-size 512 --hardware mi250 --json
    python scripts/plan.py --model llama3-70b --flavor 64 --batch-size 512 --hardware mi250 --mesh stage=8

Runs on a CPU-only machine: a flavor larger than the machine is planned on simulated devices.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="a preset name (llama3-8b, llama3-70b, tiny, ...) or a Hugging "
                                                   "Face model directory")
    p.add_argument("--flavor", default="1", help="devices behind the one virtual accelerator")
    p.add_argument("--batch-size", type=int, default=32, help="global batch in sequences")
    p.add_argument("--block-size", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--hardware", default=None, help="hardware profile: h100 (= h100-sxm), h100-pcie, h200, b200, "
                                                    "a100-80gb, a100-40gb, mi250, mi300x, tpu-v5e, tpu-v5p, tpu-v6e, "
                                                    "cpu (default: detected). Absent NVIDIA GPUs and TPUs are "
                                                    "compiled for when their compiler is installed")
    p.add_argument("--device-memory", default=None, help="override the device memory, e.g. 64GB or 300MB")
    p.add_argument("--devices-per-host", type=int, default=None, help="override devices per host")
    p.add_argument("--memory-fraction", type=float, default=0.8, help="share of device memory a plan may use")
    p.add_argument("--mesh", default=None, help="fix mesh axes, e.g. fsdp=16, data=2,fsdp=4,tensor=2 or "
                                                "stage=4,fsdp=2 (default: automatic)")
    p.add_argument("--micro-batches", type=int, default=None, help="fix the micro-batches (default: automatic)")
    p.add_argument("--remat", default=None, help="fix remat: none, matmuls, full (default: automatic)")
    p.add_argument("--loss", default=None, help="fix the loss: whole or chunked (default: automatic)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16, float32 on cpu)")
    p.add_argument("--offload-optimizer", choices=("auto", "on", "off"), default="auto",
                   help="keep AdamW's moments in host memory: on, off, or auto (only where no plan fits on the "
                        "devices)")
    p.add_argument("--no-verify", action="store_true", help="rank only, skip the verifying compile")
    from moai_jax.models import lora

    lora.add_arguments(p)
    p.add_argument("--json", action="store_true", help="print the Plan as JSON")
    p.add_argument("--dump", default=None, help="also write the Plan as JSON to this file")
    from moai_jax import distributed  # planned on the devices of several processes

    distributed.add_arguments(p)
    return p.parse_args(argv)


def run(args) -> int:
    from moai_jax import distributed
    from moai_jax.accelerator import parse_flavor, simulate_devices
    from moai_jax.errors import check_range

    distributed.join_from_args(args)  # alone, or one process of several: before JAX starts its backends
    flavor = parse_flavor(args.flavor)
    simulate_devices(flavor)  # before JAX starts its backends
    check_range("--devices-per-host", args.devices_per_host, 1)

    from pathlib import Path

    from moai_jax.accelerator import Accelerator
    from moai_jax.models import ModelConfig
    from moai_jax.offload import CHOICES
    from moai_jax.planner import plan
    from moai_jax.planner.explain import table
    from moai_jax.planner.verify import verified_line
    from moai_jax.sizes import parse_bytes
    from moai_jax.sharding.mesh import AXES, MeshShape

    from moai_jax.models import lora

    adapters = lora.from_arguments(args)
    config = (ModelConfig.from_pretrained(args.model) if Path(args.model).is_dir() else ModelConfig.preset(args.model))
    memory = parse_bytes(args.device_memory) if args.device_memory else None
    acc = Accelerator(flavor, args.hardware, device_memory=memory, devices_per_host=args.devices_per_host)
    axes = {}
    if args.mesh:
        given = {part.split("=")[0].strip() for part in args.mesh.split(",") if part.strip()}
        shape = MeshShape.parse(args.mesh)
        axes = {a: getattr(shape, a) for a in AXES if a in given}
    result = plan(config, args.batch_size, args.block_size, acc, args.memory_fraction, verify=not args.no_verify,
                  micro_batches=args.micro_batches, remat=args.remat, loss=args.loss, compute_dtype=args.dtype,
                  lora=adapters, offload_optimizer=CHOICES[args.offload_optimizer], **axes)
    text = result.to_json(indent=2)
    if distributed.join().process_id == 0:  # of several processes, process 0 writes and prints
        if args.dump:
            Path(args.dump).write_text(text + "\n")
        print(text if args.json else table(result) + "\n  " + verified_line(result))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from moai_jax.cli import run_script

    return run_script(run, args)


if __name__ == "__main__":
    sys.exit(main())
