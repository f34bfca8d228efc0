"""A model, or a training checkpoint's model, written as a Hugging Face folder.

    write_model(trainer.model, "runs/model", tokenizer=tokenizer)   # config.json + safetensors + tokenizer
    export("runs/ckpt", "runs/model")                              # the latest intact checkpoint's model

A LoRA model is written as a PEFT adapter folder, or merged into its base. The files go to a hidden
sibling folder renamed into place when complete, so a full disk never leaves half a model that
looks whole.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax

from moai_jax.checkpoint import load_base, load_model
from moai_jax.checkpoint_faults import disk_full
from moai_jax.errors import CheckpointError
from moai_jax.models import lora as lora_lib


def write_model(model: Any, out: str | Path, *, lora: lora_lib.LoraConfig | None = None, merge: bool = False,
                base_model_name_or_path: str | None = None, dtype: str | None = None, tokenizer: Any = None) -> Path:
    """Write a model (and `tokenizer`, when it can save itself) as a Hugging Face folder; a LoRA model as
    a PEFT adapter folder, or merged into its base (a full model) with `merge`. The files go to a sibling
    folder renamed to `out` when all are written: `out` never holds half a model."""
    from moai_jax.models import save_pretrained
    from moai_jax.models.peft import save_adapters

    out = Path(out).absolute()
    partial, writer = out.with_name(f".{out.name}.partial"), jax.process_index() == 0
    try:
        if writer:
            shutil.rmtree(partial, ignore_errors=True)
        if lora is not None and not merge:
            save_adapters(model, partial, lora, base_model_name_or_path)
        else:
            save_pretrained(lora_lib.merge(model) if lora is not None else model, partial, dtype=dtype)
        if writer and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(partial))
        if writer:
            _replace(out, partial)
    except Exception as e:  # noqa: BLE001 - safetensors reports a full disk as a SafetensorError
        if not (isinstance(e, OSError) or disk_full(e)):
            raise
        if writer:
            shutil.rmtree(partial, ignore_errors=True)
        if disk_full(e):
            raise CheckpointError(f"the disk is full: the model could not be written to {out}, and nothing of it was "
                                  "left there; free space there or pass another --save-model-dir") from None
        raise CheckpointError(f"cannot write the model to {out} ({getattr(e, 'strerror', None) or e}); pass a "
                              "writable --save-model-dir") from None
    return out


def _replace(out: Path, complete: Path) -> None:
    """Rename folder `complete` to `out`, replacing what `out` held (an earlier export, an empty folder)."""
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    complete.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def export(checkpoint_dir: str | Path, save_model_dir: str | Path, *, step: int | None = None,
           dtype: str | None = None, tokenizer: Any = None, merge_lora: bool = False) -> Path:
    """Write a checkpoint's model (the latest by default) in Hugging Face format: config.json,
    safetensors (gathered to the host one tensor at a time) and, when the run's tokenizer can be
    found (or `tokenizer` is given) and can save itself, its files. A LoRA checkpoint gives a PEFT
    adapter folder, or with `merge_lora` the base with the adapters merged in."""
    from flax import nnx

    model, meta = load_model(checkpoint_dir, step)
    lora = (meta.get("plan") or {}).get("lora")
    lora = None if lora is None else lora_lib.LoraConfig(**lora)
    if merge_lora and lora is None:
        raise CheckpointError(f"--merge-lora needs a LoRA checkpoint; {checkpoint_dir} holds a full model, which "
                              "exports as it is")
    source = (meta.get("run") or {}).get("model_name_or_path")
    if merge_lora:
        adapters = nnx.state(model, nnx.Param)
        model = load_base(meta, lora)
        nnx.update(model, adapters)
    if tokenizer is None and source is not None:
        from moai_jax.data import load_tokenizer_for
        tokenizer = load_tokenizer_for(source)
    return write_model(model, save_model_dir, lora=lora, merge=merge_lora, base_model_name_or_path=source,
                       dtype=dtype, tokenizer=tokenizer)
