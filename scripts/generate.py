"""Answer prompts with a model on one virtual accelerator of `--flavor` devices.

    python scripts/generate.py --model-name-or-path runs/model --prompt "Once upon a time"
    python scripts/generate.py --model-name-or-path runs/model --flavor 8 --prompts-file prompts.jsonl \\
        --max-new-tokens 32 --temperature 0.7 --top-p 0.9 --seed 0
    python scripts/generate.py --checkpoint-dir runs/ckpt --prompts-file prompts.jsonl   # a training checkpoint

The model is a Hugging Face folder (a finetune.py --save-model-dir output is one), a preset name
(random weights), or the latest checkpoint of a finetune.py run. Prompts are batched with left
padding and answered in one jitted prefill-and-decode loop with a key/value cache; the weights are
split over the flavor's devices as in training (fsdp/tensor), the prompts over `data`. Temperature 0
(the default) is greedy decoding. A `.jsonl` prompts file may hold rows of an instructions data
set, rendered with the prompt the model was trained on (see moai_jax/data/prompts.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-name-or-path", default=None,
                   help="a Hugging Face model folder, or a preset name (random weights) such as tiny; with "
                        "--checkpoint-dir, the model the checkpoint must hold (default: the one it was trained from)")
    p.add_argument("--checkpoint-dir", default=None, help="generate with the weights of a finetune.py checkpoint")
    p.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the latest)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt, as it is (repeat for several)")
    p.add_argument("--prompts-file", default=None,
                   help="more prompts: a .jsonl file of strings or instruction rows, or a text file of one per line")
    p.add_argument("--flavor", default="1", help="devices behind the one virtual accelerator (default 1)")
    p.add_argument("--mesh", default=None, help="fix the device mesh, e.g. data=4,tensor=2 (default: automatic)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 for greedy decoding (default), more to sample: higher is more random")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens holding this "
                   "much probability (default 1: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default 0)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from moai_jax.cli import run_script

    return run_script(run, args)


def run(args: argparse.Namespace) -> int:
    from moai_jax.accelerator import Accelerator, parse_flavor, simulate_devices
    from moai_jax.data import load_tokenizer_for
    from moai_jax.data.prompts import read_prompts
    from moai_jax.errors import GenerationError
    from moai_jax.generation import Generator, check_prompts, check_settings, encode
    from moai_jax.sharding.mesh import MeshShape

    flavor = parse_flavor(args.flavor)
    simulate_devices(flavor)  # before JAX starts its backends
    check_settings(args.max_new_tokens, args.temperature, args.top_p)
    prompts = args.prompt + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise GenerationError("no prompts to answer; pass --prompt TEXT or a --prompts-file that holds prompts")
    if args.model_name_or_path is None and args.checkpoint_dir is None:
        raise GenerationError("pass --model-name-or-path (a Hugging Face folder or a preset) or --checkpoint-dir")
    config, source = model_config(args)
    tokenizer = load_tokenizer_for(source)
    prompt_ids = encode(tokenizer, prompts)
    check_prompts(prompt_ids, config, args.max_new_tokens)  # before loading any weights

    accelerator = Accelerator(flavor)
    dtype = args.dtype if args.dtype != "auto" else ("float32" if accelerator.platform == "cpu" else "bfloat16")
    model, mesh = load_model(args, config, accelerator, dtype)
    generator = Generator(model, tokenizer, mesh=mesh)
    result = generator.run(prompt_ids, args.max_new_tokens, args.temperature, args.top_p, args.seed)

    where = f"{flavor} simulated CPU devices" if accelerator.simulated else f"{flavor} {accelerator.platform} device(s)"
    mesh_shape = MeshShape(**dict(generator.mesh.shape))
    print(f"moai_jax: {config.model_type} {args.checkpoint_dir or source} on {where}, mesh {mesh_shape}")
    for i, (prompt, ids) in enumerate(zip(prompts, result.token_ids), start=1):
        print(f"--- prompt {i} ---\n{prompt.rstrip()}\n--- answer {i} ---")
        print(tokenizer.decode(ids, skip_special_tokens=True))
    print(f"Generated {result.new_tokens} tokens for {len(prompts)} prompts in {result.seconds:.2f} s: "
          f"{result.tokens_per_second:.1f} tokens/s (compiled in {result.compile_seconds:.2f} s)")
    return 0


def model_config(args: argparse.Namespace):
    """The model's config and where its tokenizer comes from (for a checkpoint: the model it was trained
    from, unless --model-name-or-path names one, which the checkpoint must then hold)."""
    from moai_jax.models import ModelConfig

    def config_of(name: str) -> ModelConfig:
        return ModelConfig.from_pretrained(name) if Path(name).is_dir() else ModelConfig.preset(name)

    if args.checkpoint_dir is None:
        return config_of(args.model_name_or_path), args.model_name_or_path
    from moai_jax.checkpoint import Checkpoints

    with Checkpoints(args.checkpoint_dir, keep=None, writable=False) as checkpoints:
        if args.model_name_or_path is not None:
            checkpoints.check_model(config_of(args.model_name_or_path), args.step)
            return config_of(args.model_name_or_path), args.model_name_or_path
        meta = checkpoints.metadata(args.step)
    return ModelConfig(**meta["model_config"]), (meta.get("run") or {}).get("model_name_or_path") or "tiny"


def load_model(args: argparse.Namespace, config, accelerator, dtype: str):
    """The model, its weights placed on the generation mesh, and the mesh."""
    import jax.numpy as jnp
    from flax import nnx
    from moai_jax.models import Decoder, load_pretrained

    from moai_jax.generation import generation_mesh, param_shardings

    if args.checkpoint_dir is not None:
        from moai_jax.checkpoint import load_model as load_checkpoint

        model, _ = load_checkpoint(args.checkpoint_dir, args.step, devices=accelerator.devices)
        return model, generation_mesh(model, accelerator, args.mesh)
    build = lambda: Decoder(config, rngs=nnx.Rngs(args.seed), dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))  # noqa: E731
    abstract = nnx.eval_shape(build)
    mesh = generation_mesh(abstract, accelerator, args.mesh)
    if not Path(args.model_name_or_path).is_dir():
        return build(), mesh  # a preset: random weights
    return load_pretrained(args.model_name_or_path, dtype, dtype, shardings=param_shardings(abstract, mesh)), mesh


if __name__ == "__main__":
    sys.exit(main())
