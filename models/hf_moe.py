"""Mixture-of-Experts layers in Hugging Face checkpoints ↔ the MoE's stacked expert weights (models/moe.py).

On disk (the Hub's layout, which transformers 5's save_pretrained writes too) every expert has its own tensors:
Mixtral `block_sparse_moe.experts.{e}.w1/w3/w2` (gate, up, down), Qwen3-MoE and OLMoE
`mlp.experts.{e}.gate_proj/up_proj/down_proj`, each [out, in], and the router `gate.weight` [experts, embed].
transformers 5 fuses them in memory, and writes them so with `save_original_format=False`: `mlp.experts.gate_up_proj`
[experts, 2 · mlp, embed] (gate first) and `mlp.experts.down_proj` [experts, embed, mlp]. Both are read; checkpoints
are written one tensor per expert. OLMoE's q/k norms span the whole projection ([heads · head_dim]).

Ours: `mlp.router` [embed, experts], `mlp.gate_proj`/`up_proj` [experts, embed, mlp], `mlp.down_proj`
[experts, mlp, embed], each stacked over layers in front.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

EXPERT = "{e}"  # where a per-expert tensor's name holds its expert's index
# transformers 5's fused experts: HF [experts, out, in] ↔ ours [experts, in, out], gate_up_proj split on axis 1
FUSED_LAYOUT = dict(to_ours=lambda a: a.transpose(0, 2, 1), to_hf=lambda a: a.transpose(0, 2, 1),
                    hf_shape=lambda s: (s[0], s[2], s[1]), fused_axis=1)
_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}  # gate, up, down of each expert on disk (the others: *_proj)
_DENSE_MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
_OLMOE_QK_NORMS = {  # over the whole projection: HF [heads * head_dim] ↔ ours [heads, head_dim]
    "self_attn.q_norm.weight": (("attention", "q_norm", "weight"), "bias"),
    "self_attn.k_norm.weight": (("attention", "k_norm", "weight"), "bias"),
}


def expert_modules(model_type: str, prefix: str) -> dict[str, str]:
    """Our expert weight → its Hugging Face module inside a layer, "{e}" standing for the expert."""
    names = dict(zip(("gate_proj", "up_proj", "down_proj"), _EXPERT_NAMES.get(model_type, ("gate_proj", "up_proj",
                                                                                            "down_proj"))))
    return {ours: f"{prefix}.experts.{EXPERT}.{theirs}" for ours, theirs in names.items()}


def is_fused(tensor_names) -> bool:
    """Whether a checkpoint holds transformers 5's fused experts rather than one tensor per expert."""
    return "model.layers.0.mlp.experts.gate_up_proj" in tensor_names


def moe_layer_tensors(model_type: str, prefix: str, dense_layer: dict, fused: bool) -> dict:
    """A MoE model's tensors per layer (Hugging Face name → (our path, layout name)): the dense model's attention
    and norms, the router and the experts (a list of parts: one fused tensor, split along the layout's fused axis)."""
    layer = {k: v for k, v in dense_layer.items() if k not in _DENSE_MLP}
    layer |= _OLMOE_QK_NORMS if model_type == "olmoe" else {}
    if fused:
        return layer | {"mlp.gate.weight": (("mlp", "router"), "transposed"),
                        "mlp.experts.gate_up_proj": [(("mlp", "gate_proj"), "experts_fused"),
                                                     (("mlp", "up_proj"), "experts_fused")],
                        "mlp.experts.down_proj": (("mlp", "down_proj"), "experts_fused")}
    experts = {f"{module}.weight": (("mlp", ours), "transposed")
               for ours, module in expert_modules(model_type, prefix).items()}
    return layer | {f"{prefix}.gate.weight": (("mlp", "router"), "transposed")} | experts


def stacked_experts(read: Callable[[str], np.ndarray], names: tuple[str, ...], experts: int, to_ours, index, dtype):
    """The part `index` ([layers, experts, ...]) of a parameter stacked from one tensor per layer and expert
    (`names` layer-major), each read on its own."""
    layers = range(len(names) // experts)[index[0]]
    return np.stack([np.stack([to_ours(read(names[i * experts + j]))[index[2:]] for j in range(experts)[index[1]]])
                     .astype(dtype) for i in layers])
