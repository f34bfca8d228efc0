"""Export a training checkpoint as a Hugging Face model folder (config.json, safetensors, tokenizer).

    python scripts/export.py --checkpoint-dir runs/ckpt --save-model-dir runs/model
    python scripts/export.py --checkpoint-dir runs/ckpt --step 1000 --save-model-dir runs/model-1000 --dtype bfloat16

The folder loads with `transformers.AutoModelForCausalLM.from_pretrained(...)`. A LoRA run's checkpoint
exports as a PEFT adapter folder (`peft.PeftModel.from_pretrained(base, folder)`), or with
--merge-lora as the full model with the adapters merged into its base.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint-dir", required=True, help="the --checkpoint-dir of a finetune.py run")
    p.add_argument("--save-model-dir", required=True, help="write the Hugging Face model folder here")
    p.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the latest)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="convert the weights on the way out (default: as trained, float32)")
    p.add_argument("--merge-lora", action="store_true",
                   help="a LoRA checkpoint: write the base with the adapters merged in, not a PEFT adapter folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from moai_jax.cli import run_script

    return run_script(run, args)


def run(args: argparse.Namespace) -> int:
    from moai_jax.export import export

    out = export(args.checkpoint_dir, args.save_model_dir, step=args.step, dtype=args.dtype, merge_lora=args.merge_lora)
    print(f"Model: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
