"""LoRA adapters as a PEFT folder: adapter_config.json and adapter_model.safetensors.

    save_adapters(model, "runs/adapter", base_model_name_or_path="./Meta-Llama-3-8B")

The folder loads over the Hugging Face base with `peft.PeftModel.from_pretrained(base, "runs/adapter")`.
PEFT's `lora_A.weight` is [r, in_features] and `lora_B.weight` [out_features, r], one per layer;
ours are stacked over layers with the weight's own axes (A [*in, r], B [r, *out]).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from moai_jax.models.lora import TARGETS, LoraConfig, adapters

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def adapter_config(lora: LoraConfig, base_model_name_or_path: str | None) -> dict:
    """The adapter_config.json that PEFT reads back as this LoRA."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": [TARGETS[t][1] for t in lora.targets],
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }


def save_adapters(model, path: str | Path, lora: LoraConfig, base_model_name_or_path: str | None = None) -> Path:
    """Write `model`'s adapters (gathered to the host one at a time) as a PEFT folder at `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for target, adapter in adapters(model).items():
        module = TARGETS[target][3]
        a = np.asarray(jax.device_get(adapter.a[...]), np.float32)  # [layers, *in, r]
        b = np.asarray(jax.device_get(adapter.b[...]), np.float32)  # [layers, r, *out]
        for i in range(a.shape[0]):
            name = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, lora.r).T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(lora.r, -1).T)
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(adapter_config(lora, base_model_name_or_path), indent=2))
    return path
