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
}
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
    return {}


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
    return hf
