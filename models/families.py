"""What sets each model family apart from Llama, and how its Hugging Face config.json says so.

The Decoder (llama.py) is Llama's: pre-norm RMSNorm blocks, rotary positions, grouped-query
attention, a SwiGLU MLP. A `Family` names the parts a family changes; the Decoder reads them from
`config.family`. Sizes that vary within a family (a GELU variant, soft-capping values, ALiBi in
Baichuan 2 13B) are `ModelConfig` fields, read from config.json here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from moai_jax.errors import ModelConfigError

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),  # GPT-2's tanh approximation
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class Family:
    architecture: str  # the transformers class config.json names
    norm: str = "rms"  # "rms"; "rms_plus_one" (Gemma: x̂ · (1 + w)); "layer" (LayerNorm with bias)
    gated_mlp: bool = True  # down(act(gate x) · up x); False: GPT-2's down(act(up x + b)) + b
    learned_positions: bool = False  # GPT-2: a table of position embeddings instead of rotary
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before rotary
    qk_norm_whole: bool = False  # OLMoE: that RMSNorm over the whole q (and k) projection instead of each head
    experts_prefix: str = "mlp"  # a Mixture-of-Experts layer's name in checkpoints (Mixtral: block_sparse_moe)
    sandwich_norms: bool = False  # Gemma 2: norms on the attention's and the MLP's outputs too
    scaled_embeddings: bool = False  # Gemma 2: embeddings × sqrt(hidden_size)
    alternating_window: bool = False  # Gemma 2: sliding-window attention on even layers, global on odd
    normalized_head: bool = False  # Baichuan 2: each lm_head row scaled to unit length
    output_bias: bool = False  # GPT-2: o_proj has a bias too


FAMILIES = {
    "llama": Family("LlamaForCausalLM"),
    "mistral": Family("MistralForCausalLM"),
    "qwen2": Family("Qwen2ForCausalLM"),
    "qwen3": Family("Qwen3ForCausalLM", qk_norm=True),
    "gemma2": Family("Gemma2ForCausalLM", norm="rms_plus_one", sandwich_norms=True, scaled_embeddings=True,
                     alternating_window=True),
    "gpt2": Family("GPT2LMHeadModel", norm="layer", gated_mlp=False, learned_positions=True, output_bias=True),
    "baichuan": Family("BaichuanForCausalLM", normalized_head=True),
    "mixtral": Family("MixtralForCausalLM", experts_prefix="block_sparse_moe"),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", qk_norm=True),
    "olmoe": Family("OlmoeForCausalLM", qk_norm=True, qk_norm_whole=True),
}
MOE_FAMILIES = ("mixtral", "qwen3_moe", "olmoe")
_GPT2_UNSUPPORTED = ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn")


def sliding_layers(num_layers: int) -> list[str]:
    """Gemma 2's layer_types: sliding-window attention on even layers, full attention on odd ones."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]


def family_fields_from_hf(model_type: str, hf: dict, source: str) -> dict:
    """The ModelConfig fields a Llama-like config.json (all but GPT-2's) sets beyond Llama's keys."""
    if model_type == "gemma2":
        layer_types = hf.get("layer_types")
        if layer_types is not None and list(layer_types) != sliding_layers(hf["num_hidden_layers"]):
            raise ModelConfigError(f"{source}: Gemma 2 layer_types other than alternating sliding/full "
                                   "attention (starting with sliding) are not supported")
        if hf.get("use_bidirectional_attention"):
            raise ModelConfigError(f"{source}: use_bidirectional_attention is not supported (moai_jax is causal)")
        return {
            "hidden_act": hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
            "query_pre_attn_scalar": hf.get("query_pre_attn_scalar", 256),
            "attn_logit_softcapping": hf.get("attn_logit_softcapping"),
            "final_logit_softcapping": hf.get("final_logit_softcapping"),
            "tie_word_embeddings": hf.get("tie_word_embeddings", True),
        }
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelConfigError(f"{source}: only a SwiGLU MLP (hidden_act 'silu') is supported for {model_type}")
    if model_type == "baichuan":
        # Baichuan's config.json does not say which position scheme its modeling code uses: the 7B
        # uses rotary positions and the 13B ALiBi. Like vLLM, tell them apart by hidden_size (4096: 7B).
        alibi = hf.get("position_embedding", "rope" if hf["hidden_size"] == 4096 else "alibi") == "alibi"
        positions = hf.get("max_position_embeddings") or hf.get("model_max_length", 4096)
        return {"alibi": alibi, "max_position_embeddings": positions}
    if model_type in MOE_FAMILIES:
        return _moe_fields_from_hf(model_type, hf, source)
    return {}


def _moe_fields_from_hf(model_type: str, hf: dict, source: str) -> dict:
    """The Mixture-of-Experts fields of a Mixtral, Qwen3-MoE or OLMoE config.json."""
    if hf.get("router_jitter_noise"):
        raise ModelConfigError(f"{source}: router_jitter_noise is not supported; set it to 0")
    if hf.get("clip_qkv") is not None:
        raise ModelConfigError(f"{source}: OLMoE's clip_qkv is not supported; set it to null")
    experts = hf.get("num_local_experts") if model_type == "mixtral" else hf.get("num_experts")
    fields = {
        "num_experts": experts or hf.get("num_experts") or hf.get("num_local_experts") or 0,
        "num_experts_per_tok": hf.get("num_experts_per_tok", 2),
        "router_aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001)),
        "norm_topk_prob": True if model_type == "mixtral" else bool(hf.get("norm_topk_prob", False)),
    }
    if model_type == "qwen3_moe":
        fields |= {"moe_intermediate_size": hf["moe_intermediate_size"],
                   "decoder_sparse_step": hf.get("decoder_sparse_step", 1),
                   "mlp_only_layers": tuple(hf.get("mlp_only_layers") or ())}
    return fields


def _moe_to_hf(c, hf: dict) -> dict:
    """`hf` with the Mixture-of-Experts keys of `c`'s family."""
    common = {"num_experts_per_tok": c.num_experts_per_tok, "router_aux_loss_coef": c.router_aux_loss_coef,
              "output_router_logits": False}
    if c.model_type == "mixtral":
        return hf | common | {"num_local_experts": c.num_experts, "sliding_window": c.sliding_window,
                              "router_jitter_noise": 0.0}
    hf = hf | common | {"num_experts": c.num_experts, "norm_topk_prob": c.norm_topk_prob, "attention_bias": False}
    if c.model_type == "olmoe":
        return hf | {"clip_qkv": None}
    return hf | {"moe_intermediate_size": c.expert_size, "decoder_sparse_step": c.decoder_sparse_step,
                 "mlp_only_layers": list(c.mlp_only_layers), "use_sliding_window": c.sliding_window is not None,
                 "sliding_window": c.sliding_window}


def gpt2_fields_from_hf(hf: dict, source: str) -> dict:
    """The ModelConfig fields of a GPT-2 config.json (n_embd, n_layer, ...; Cerebras-GPT uses it too)."""
    for key in _GPT2_UNSUPPORTED:
        if hf.get(key):
            raise ModelConfigError(f"{source}: GPT-2 with {key} is not supported; set it to false")
    if not hf.get("scale_attn_weights", True):
        raise ModelConfigError(f"{source}: GPT-2 without scale_attn_weights is not supported")
    hidden, heads = hf["n_embd"], hf["n_head"]
    return dict(
        model_type="gpt2",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        num_layers=hf["n_layer"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=hf.get("n_positions", 1024),
        rms_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        attention_bias=True,
        hidden_act=hf.get("activation_function", "gelu_new"),
        bos_token_id=hf.get("bos_token_id", 50256),
        eos_token_id=hf.get("eos_token_id", 50256),
    )


def family_to_hf(config, hf: dict) -> dict:
    """`hf`, the Llama-style config.json of `config`, as its own family writes it."""
    c = config
    if c.model_type == "gpt2":
        return {
            "architectures": [c.family.architecture],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_embd": c.hidden_size,
            "n_layer": c.num_layers,
            "n_head": c.num_heads,
            "n_inner": c.intermediate_size,
            "n_positions": c.max_position_embeddings,
            "activation_function": c.hidden_act,
            "layer_norm_epsilon": c.rms_norm_eps,
            "tie_word_embeddings": c.tie_word_embeddings,
            "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id,
        }
    if c.model_type == "gemma2":
        return hf | {
            "hidden_activation": c.hidden_act,
            "attention_bias": False,
            "query_pre_attn_scalar": c.query_pre_attn_scalar,
            "attn_logit_softcapping": c.attn_logit_softcapping,
            "final_logit_softcapping": c.final_logit_softcapping,
            "sliding_window": c.sliding_window,
            "layer_types": sliding_layers(c.num_layers),
        }
    if c.model_type == "baichuan":
        return hf | {"position_embedding": "alibi" if c.alibi else "rope", "model_max_length": c.max_position_embeddings}
    if c.model_type in MOE_FAMILIES:
        return _moe_to_hf(c, hf)
    return hf
