"""Fine-tune a decoder model on one virtual accelerator of `--flavor` devices.

    python scripts/finetune.py --flavor 8                        # built-in tiny model and data set
    python scripts/finetune.py --flavor 8 --model-name-or-path ./Meta-Llama-3-8B \\
        --dataset-name-or-path ./cnn_dailymail --batch-size 64 --block-size 1024

Write the training as if for one device; moai_jax splits the batch, shards the parameters and
places the work over the flavor's devices. On a machine without an accelerator the devices are
simulated, so every flavor runs (slowly) on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

# a Mixture-of-Experts model's step also reports these (moai_jax/train.py): the metrics file gets them
ROUTER_METRICS = ("router_loss", "router_z_loss", "dropped_fraction")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="1", help="devices behind the one virtual accelerator: 1, 8, 64, ... (default 1)")
    p.add_argument("--model-name-or-path", default="tiny",
                   help="a Hugging Face model directory, or a preset name (random weights) such as tiny, llama3-8b "
                        "(default tiny)")
    p.add_argument("--dataset-name-or-path", default=None,
                   help="a .jsonl/.json/.parquet/.csv/.txt file or folder, a datasets save_to_disk folder, or a hub "
                        "name when online (default: the small built-in data set)")
    p.add_argument("--dataset-format", default=None, choices=("text", "instructions", "summarization"),
                   help="how to read the data set's columns (default: detected from the column names)")
    p.add_argument("--no-packing", action="store_true",
                   help="pad each document to its own row instead of packing several into one block")
    p.add_argument("--batch-size", type=int, default=32, help="global batch: sequences per step over all devices")
    p.add_argument("--block-size", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the data set (default 1)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: all epochs)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 2e-4 with --use-lora, else 1e-5 for a pretrained model and "
                        "3e-3 for a preset's random weights)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default 3%% of the steps)")
    p.add_argument("--log-interval", type=int, default=1, help="print the step line every N steps (default 1)")
    p.add_argument("--eval-step", type=int, default=0, help="evaluate on the held-out split every N steps (0: never)")
    p.add_argument("--save-model-dir", default=None,
                   help="write the trained model here in Hugging Face format (config.json + safetensors)")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights and data order (default 0)")
    p.add_argument("--mesh", default=None,
                   help="fix the device mesh, e.g. data=2,fsdp=2,tensor=2 or stage=4,fsdp=2 (product = flavor; "
                        "default: automatic, chosen by the planner)")
    p.add_argument("--hardware", default=None,
                   help="hardware profile to plan for: h100 (= h100-sxm), h100-pcie, h200, b200, a100-80gb, a100-40gb, "
                        "mi250, mi300x, tpu-v5e, tpu-v5p, tpu-v6e, cpu (default: detected from the devices)")
    p.add_argument("--dry-run", action="store_true",
                   help="plan and verify the step for --hardware (compiled for it when absent), train nothing")
    p.add_argument("--device-memory", default=None, help="override the memory of one device, e.g. 64GB or 300MB")
    p.add_argument("--devices-per-host", type=int, default=None, help="override how many devices share a host")
    p.add_argument("--memory-fraction", type=float, default=0.8,
                   help="share of each device's memory a plan may use, in (0, 1] (default 0.8)")
    p.add_argument("--micro-batches", type=int, default=None, help="split each step's batch into N micro-batches")
    p.add_argument("--remat", choices=("none", "matmuls", "full"), default=None,
                   help="recompute activations in backward: none, matmuls (save matmul outputs), full")
    p.add_argument("--offload-optimizer", choices=("auto", "on", "off"), default="auto",
                   help="keep AdamW's moments in host memory: on, off, or auto (only where no plan fits on the "
                        "devices)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype; parameters stay float32 (default: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="save training checkpoints (Orbax) here, every --save-steps steps and at the end")
    p.add_argument("--save-steps", type=int, default=500, help="steps between checkpoints (default 500)")
    p.add_argument("--keep", type=int, default=3, help="complete checkpoints to keep, newest first (default 3)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --checkpoint-dir, on this run's flavor and mesh")
    p.add_argument("--metrics-file", default=None,
                   help="append one JSON object per logged step: step, loss, duration, tokens_per_sec, learning_rate, "
                        "grad_norm (and a Mixture-of-Experts model's router_loss, router_z_loss, dropped_fraction)")
    p.add_argument("--sample-prompts", default=None,
                   help="a prompts file (as scripts/generate.py reads it): print the model's greedy answers to its "
                        "prompts at each evaluation and at the end")
    from moai_jax import distributed  # one job of several processes: python -m moai_jax.launch, srun, ...

    distributed.add_arguments(p)
    p.add_argument("--autotune", type=int, default=0, metavar="K",
                   help="compile the planner's K best candidates, time a few steps of each on the devices and run "
                        "the fastest (measurements cached per model, hardware, flavor, batch and length; default 0: "
                        "the planner's estimate decides)")

    from moai_jax.models import lora  # LoRA: --use-lora, --lora-r, --lora-alpha, --lora-dropout, --lora-targets

    lora.add_arguments(p)
    p.add_argument("--merge-lora", action="store_true",
                   help="with --use-lora, --save-model-dir gets the merged full model instead of a PEFT adapter folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from moai_jax.cli import run_script

    return run_script(run, args)


def check_settings(args: argparse.Namespace) -> None:
    """Refuse numbers that cannot be meant (a negative or NaN learning rate, a fraction above 1), before any work."""
    from moai_jax.errors import check_range

    for name in ("batch_size", "block_size", "epochs", "log_interval", "max_steps", "save_steps", "devices_per_host"):
        check_range(f"--{name.replace('_', '-')}", getattr(args, name), 1)
    for name in ("warmup_steps", "eval_step", "seed", "weight_decay"):
        check_range(f"--{name.replace('_', '-')}", getattr(args, name), 0)
    check_range("--lr", args.lr, 0, above=True)
    check_range("--memory-fraction", args.memory_fraction, 0, 1, above=True)


def run(args: argparse.Namespace) -> int:
    import jax

    from moai_jax import distributed
    from moai_jax.accelerator import parse_flavor, simulate_devices
    from moai_jax.metrics import MetricsFile

    distributed.join_from_args(args)  # alone, or one process of several: before JAX starts its backends
    distributed.agree("arguments", {k: v for k, v in vars(args).items() if k != "process_id"},
                      "start every process with the same arguments")
    flavor = parse_flavor(args.flavor)
    simulate_devices(flavor)  # before JAX starts its backends
    check_settings(args)
    from moai_jax.models import lora

    args.lora = lora.from_arguments(args)
    if args.merge_lora and args.lora is None:
        raise lora.LoraError("--merge-lora needs --use-lora; add --use-lora or drop --merge-lora")
    # before any work: a metrics file or checkpoint folder that cannot be written fails fast
    with MetricsFile(args.metrics_file if jax.process_index() == 0 else None) as metrics_file:  # one line per step
        checkpoints = open_checkpoints(args)
        # on every way out, the last save is finished; of several processes, only process 0 prints
        with checkpoints or contextlib.nullcontext(), distributed.only_first_prints():
            return train(args, flavor, checkpoints, metrics_file)


def dry_run(args: argparse.Namespace, config, accelerator, dtype: str) -> int:
    """--dry-run: the plan the run would train with, verified by the compiler of its hardware; no step runs."""
    from moai_jax.offload import CHOICES
    from moai_jax.planner import plan
    from moai_jax.planner.explain import table
    from moai_jax.planner.verify import verified_line
    from moai_jax.trainer import fixed_axes

    result = plan(config, args.batch_size, args.block_size, accelerator, args.memory_fraction,
                  micro_batches=args.micro_batches, remat=args.remat, compute_dtype=dtype, lora=args.lora,
                  offload_optimizer=CHOICES[args.offload_optimizer],
                  **fixed_axes(args.mesh)[1])
    print(table(result) + "\n  " + verified_line(result))
    return 0


def train(args: argparse.Namespace, flavor: int, checkpoints, metrics_file) -> int:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from moai_jax.models import Decoder, ModelConfig, load_pretrained

    from moai_jax import data
    from moai_jax.accelerator import Accelerator
    from moai_jax.checkpoint import check_writable
    from moai_jax.errors import SettingError
    from moai_jax.generation import SamplePrompts
    from moai_jax.metrics import StepTimer, step_line, summary
    from moai_jax.offload import CHOICES
    from moai_jax.optimizer import adamw, learning_rate_schedule, warmup_length
    from moai_jax.trainer import Trainer

    if args.save_model_dir:
        check_writable(Path(args.save_model_dir), "--save-model-dir")

    from moai_jax.sizes import parse_bytes

    memory = parse_bytes(args.device_memory) if args.device_memory else None
    accelerator = Accelerator(flavor, args.hardware, device_memory=memory, devices_per_host=args.devices_per_host)
    pretrained = Path(args.model_name_or_path).is_dir()
    config = (ModelConfig.from_pretrained(args.model_name_or_path) if pretrained
              else ModelConfig.preset(args.model_name_or_path))
    if args.lora is not None:
        args.lora.check(config)
    if args.resume:
        checkpoints.check_model(config)  # before loading anything big
    dtype = args.dtype if args.dtype != "auto" else ("float32" if accelerator.platform == "cpu" else "bfloat16")
    if args.dry_run:
        return dry_run(args, config, accelerator, dtype)

    tokenizer = data.load_tokenizer_for(args.model_name_or_path)
    samples = SamplePrompts(args.sample_prompts, tokenizer, config) if args.sample_prompts else None
    dataset = data.load_dataset(args.dataset_name_or_path, tokenizer, args.block_size, format=args.dataset_format,
                                packing=not args.no_packing, seed=args.seed,
                                max_positions=config.max_position_embeddings, vocab_size=config.vocab_size)
    batches = data.Batches(dataset, args.batch_size, seed=args.seed, epochs=args.epochs,
                           process_index=jax.process_index(), process_count=jax.process_count())
    total = min(batches.steps, args.max_steps or batches.steps)
    if args.warmup_steps is not None and args.warmup_steps > total:
        raise SettingError(f"--warmup-steps {args.warmup_steps} is beyond the run's {total} steps; use at most {total}")
    lr, lr_source = (args.lr, "--lr") if args.lr is not None else default_learning_rate(pretrained, args.lora)
    schedule = learning_rate_schedule(lr, total, warmup_steps=args.warmup_steps)
    optimizer = adamw(schedule, weight_decay=args.weight_decay)
    learning_rates = jax.device_get(jax.vmap(schedule)(jnp.arange(total)))  # once, not a device call per step

    build = lambda: Decoder(config, rngs=nnx.Rngs(args.seed), dtype=jnp.dtype(dtype))  # noqa: E731
    load = (lambda shardings: load_pretrained(args.model_name_or_path, dtype=jnp.dtype(dtype), shardings=shardings)
            ) if pretrained and (not args.resume or args.lora) else None  # a checkpoint holds all but a LoRA base
    trainer = Trainer(build, optimizer, args.batch_size, args.block_size, accelerator, args.mesh,
                      micro_batches=args.micro_batches, remat=args.remat, params=load,
                      memory_fraction=args.memory_fraction, lora=args.lora, autotune=args.autotune,
                      offload_optimizer=CHOICES[args.offload_optimizer])
    if trainer.autotune_report:
        print(trainer.autotune_report)
    where = f"{flavor} simulated CPU devices" if accelerator.simulated else f"{flavor} {accelerator.platform} device(s)"
    print(f"moai_jax: {config.model_type} {args.model_name_or_path} on {where}: {trainer.plan.summary()}")
    warmup = warmup_length(total, args.warmup_steps)
    print(f"Optimizer: AdamW, peak learning rate {lr:g} ({lr_source}), {warmup} warmup step{'s' * (warmup != 1)}, "
          f"then cosine decay to {0.1 * lr:g}")
    print(f"Data: {len(dataset.train)} training rows of {args.block_size} tokens, packing efficiency "
          f"{dataset.packing_efficiency:.1%}, {total} steps")
    if dataset.dropped:
        print(f"Data: {dataset.dropped}")
    start = 0
    if args.resume:
        saved = checkpoints.restore(trainer)
        for note in checkpoints.skipped:  # damaged checkpoints passed over
            print(f"Resume: {note}")
        start = saved["step"]
        batches = data.Batches(dataset, args.batch_size, seed=args.seed, epochs=args.epochs, position=saved["data_position"],
                               process_index=jax.process_index(), process_count=jax.process_count())
        print(f"Resumed from the checkpoint of step {start} in {checkpoints.directory} "
              f"(saved at flavor {saved['plan']['flavor']})")
    print(f"Compiled the train step in {trainer.compile():.2f} s", flush=True)

    timer = StepTimer(args.batch_size * args.block_size)
    rates, final_loss = [], None

    def report(done):
        nonlocal final_loss
        if done is None:
            return
        step, final_loss = done["step"], done["loss"]
        rates.append(done["tokens_per_sec"])
        if step % args.log_interval == 0 or step == total:
            print(step_line(step, total, done["loss"], done["duration"], done["tokens_per_sec"]), flush=True)
            metrics_file.write({"step": step, "loss": done["loss"], "duration": done["duration"],
                                "tokens_per_sec": done["tokens_per_sec"], "learning_rate": float(learning_rates[step - 1]),
                                "grad_norm": done["grad_norm"]} | {k: done[k] for k in ROUTER_METRICS if k in done})

    for step, batch in enumerate(batches, start=start + 1):
        if step > total:
            break
        report(timer.push(step, trainer.step(batch)))
        if checkpoints and (step % args.save_steps == 0 or step == total):
            checkpoints.save(trainer, step, data_position=batches.position, seed=args.seed,  # async
                             run={"model_name_or_path": args.model_name_or_path, "total_steps": total})
        if args.eval_step and step % args.eval_step == 0:
            report(timer.finish())
            eval_batches = data.Batches(dataset, args.batch_size, seed=args.seed, split="eval",
                                        process_index=jax.process_index(), process_count=jax.process_count())
            print(f"[Eval {step}/{total}] | Loss: {trainer.evaluate(eval_batches):.6f}", flush=True)
            if samples:
                samples.show(trainer.model, trainer.mesh, f"{step}/{total}")
            timer = StepTimer(args.batch_size * args.block_size)
    report(timer.finish())
    if samples and not (args.eval_step and total % args.eval_step == 0):  # not twice after a last evaluation
        samples.show(trainer.model, trainer.mesh, "end")

    if args.save_model_dir:
        save_model(trainer.model, tokenizer, args, checkpoints)
    if checkpoints:
        checkpoints.wait()  # the last save's failure, if any, before the summary
    print(summary(len(rates), len(rates) * args.batch_size * args.block_size, rates, final_loss, args.save_model_dir))
    return 0


def default_learning_rate(pretrained: bool, lora) -> tuple[float, str]:
    """The peak learning rate when --lr is not given, and why: LoRA adapters start at zero and need a
    rate some 10x a full fine-tune's (PEFT's examples and the QLoRA paper use 1e-4 to 2e-4)."""
    if lora is not None:
        return 2e-4, "the LoRA default; --lr to change"
    if pretrained:
        return 1e-5, "the default for a pretrained model; --lr to change"
    return 3e-3, "the default for a preset's random weights; --lr to change"


def save_model(model, tokenizer, args: argparse.Namespace, checkpoints) -> None:
    """Write the trained model to --save-model-dir (every process gathers, process 0 writes); when that
    fails and checkpoints are on, the error names the checkpoint to export the same weights from."""
    from moai_jax.errors import CheckpointError
    from moai_jax.export import write_model

    try:
        write_model(model, args.save_model_dir, lora=args.lora, merge=args.merge_lora,
                    base_model_name_or_path=args.model_name_or_path, tokenizer=tokenizer)
    except CheckpointError as e:
        if checkpoints is None:
            raise
        checkpoints.wait()  # the last step's save, started just before
        raise CheckpointError(f"{e}; the trained weights are in the checkpoint of step {checkpoints.latest_step()}: "
                              f"python scripts/export.py --checkpoint-dir {checkpoints.directory} --save-model-dir "
                              f"{args.save_model_dir}") from None


def open_checkpoints(args: argparse.Namespace):
    """The run's checkpoint folder, checked writable (and, with --resume, holding a checkpoint), or None."""
    from moai_jax.checkpoint import Checkpoints
    from moai_jax.errors import CheckpointError

    if args.checkpoint_dir is None:
        if args.resume:
            raise CheckpointError("--resume needs --checkpoint-dir, the folder of the run to continue")
        return None
    checkpoints = Checkpoints(args.checkpoint_dir, keep=args.keep)
    if args.resume:
        with contextlib.ExitStack() as on_error:
            on_error.callback(checkpoints.close)
            checkpoints.metadata()  # CheckpointError when there is none
            on_error.pop_all()
    return checkpoints


if __name__ == "__main__":
    sys.exit(main())
