"""LoRA adapters as a PEFT folder: adapter_config.json and adapter_model.safetensors.

    save_adapters(model, "runs/adapter", base_model_name_or_path="./Meta-Llama-3-8B")

The folder loads over the Hugging Face base with `peft.PeftModel.from_pretrained(base, "runs/adapter")`.
PEFT's `lora_A.weight` is [r, in_features] and `lora_B.weight` [out_features, r], one per layer;
ours are stacked over layers with the weight's own axes (A [*in, r], B [r, *out]).

A Mixture-of-Experts model's expert adapters go onto the experts as transformers 5 holds them, fused
(`mlp.experts.gate_up_proj` [experts, 2 · mlp, embed], `mlp.experts.down_proj` [experts, embed, mlp]), with
PEFT's `target_parameters`: there are no per-expert Linear modules left for `target_modules` to name. PEFT puts
one adapter on each fused parameter, all experts' side by side (lora_A [experts · r, in] expert-major, lora_B
[out, r · experts] rank-major). Our gate and up adapters become one on gate_up_proj of rank 2r (A stacked, B
block-diagonal; alpha doubled so the scale stays alpha / r) through `rank_pattern` and `alpha_pattern`, and the
config's lora_dropout is 0, which PEFT requires there (the adapters are for inference; the experts' adapters
trained without dropout).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from moai_jax.models.lora import TARGETS, LoraConfig, adapters, on_experts

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def adapter_config(lora: LoraConfig, base_model_name_or_path: str | None, config=None) -> dict:
    """The adapter_config.json that PEFT reads back as this LoRA (on `config`'s model)."""
    fused = _fused_parts(config, lora)
    modules = [TARGETS[t][1] for t in lora.targets if not (config is not None and on_experts(config, t))]
    gate_up = len(fused.get("gate_up_proj", ()))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0 if fused else lora.dropout,
        "target_modules": modules or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        **({"target_parameters": [f"mlp.experts.{p}" for p in fused]} if fused else {}),
        **({"rank_pattern": {"gate_up_proj": 2 * lora.r}, "alpha_pattern": {"gate_up_proj": 2 * lora.alpha}}
           if gate_up == 2 else {}),
    }


def _fused_parts(config, lora: LoraConfig) -> dict[str, list[str]]:
    """transformers 5's fused expert parameter → the targets adapting it (gate_up_proj: gate, up), in PEFT's order."""
    if config is None or not config.num_experts:
        return {}
    parts = {"gate_up_proj": [t for t in ("gate", "up") if t in lora.targets],
             "down_proj": ["down"] if "down" in lora.targets else []}
    return {name: targets for name, targets in parts.items() if targets}


def _fused_tensors(found: dict, lora: LoraConfig, fused: dict, layers: int) -> dict[str, np.ndarray]:
    """PEFT's tensors of the experts' adapters on the fused parameters (see the module's docstring)."""
    tensors = {}
    host = {t: (np.asarray(jax.device_get(found[t].a[...]), np.float32),  # [layers, experts, in, r]
                np.asarray(jax.device_get(found[t].b[...]), np.float32)) for names in fused.values() for t in names}
    for name, targets in fused.items():
        # PEFT nests its wrappers in the module's parameter order: gate_up_proj's sits inside down_proj's
        module = "mlp.experts.base_layer" if name == "gate_up_proj" and len(fused) == 2 else "mlp.experts"
        halves = ("gate", "up") if name == "gate_up_proj" else ("down",)
        for i in range(layers):
            a_ERI = np.concatenate([host[t][0][i].transpose(0, 2, 1) for t in targets], axis=1)  # [E, R, in]
            out = host[targets[0]][1].shape[-1]
            b_EOR = np.zeros((a_ERI.shape[0], out * len(halves), a_ERI.shape[1]), np.float32)
            for q, t in enumerate(targets):
                h = halves.index(t)
                b_EOR[:, h * out:(h + 1) * out, q * lora.r:(q + 1) * lora.r] = host[t][1][i].transpose(0, 2, 1)
            prefix = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a_ERI.reshape(-1, a_ERI.shape[-1]))
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b_EOR.transpose(1, 2, 0).reshape(
                b_EOR.shape[1], -1))
    return tensors


def save_adapters(model, path: str | Path, lora: LoraConfig, base_model_name_or_path: str | None = None) -> Path:
    """Write `model`'s adapters (gathered to the host one at a time) as a PEFT folder at `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, found, config = {}, adapters(model), model.config
    fused = _fused_parts(config, lora)
    tensors |= _fused_tensors(found, lora, fused, config.num_layers)
    for target, adapter in found.items():
        if on_experts(config, target):
            continue
        module = TARGETS[target][3]
        a = np.asarray(jax.device_get(adapter.a[...]), np.float32)  # [layers, *in, r]
        b = np.asarray(jax.device_get(adapter.b[...]), np.float32)  # [layers, r, *out]
        for i in range(a.shape[0]):
            name = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, lora.r).T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(lora.r, -1).T)
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(adapter_config(lora, base_model_name_or_path, config), indent=2))
    return path
