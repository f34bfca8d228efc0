"""The shape of a decoder model: read from a Hugging Face config.json or a named preset.

One frozen dataclass covers every family (Llama, Mistral, Qwen2, Qwen3, Gemma 2, GPT-2, Baichuan 2, and the
Mixture-of-Experts Mixtral, Qwen3-MoE and OLMoE);
what sets a family apart from Llama is in `families.py`. `from_pretrained` reads the
config.json of a Hugging Face directory (transformers 4 or 5 layout), `to_hf_dict` writes one that
`transformers.AutoConfig` reads back. `param_count` and `flops_per_token` serve the planner and MFU.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from moai_jax.errors import ModelConfigError

from moai_jax.models.families import (ACTIVATIONS, FAMILIES, MOE_FAMILIES, Family, family_fields_from_hf,
                                     family_to_hf, gpt2_fields_from_hf)

ARCHITECTURES = {model_type: family.architecture for model_type, family in FAMILIES.items()}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ROPE_TYPES = ("default", "llama3")


def dtype_from_name(name: Any) -> Any:
    """"float32" / "bfloat16" / "float16" (or a numpy/jax dtype) → the jnp dtype."""
    if isinstance(name, str):
        if name not in DTYPES:
            raise ModelConfigError(f"unknown dtype {name!r}; use one of: {', '.join(DTYPES)}")
        return DTYPES[name]
    return jnp.dtype(name).type


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer: RMSNorm, rotary positions, grouped-query attention, SwiGLU."""

    model_type: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    hidden_act: str = "silu"  # the MLP's activation (GPT-2 and Gemma 2 use GELU variants)
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2 power (Gemma 2); None: head_dim
    attn_logit_softcapping: float | None = None  # Gemma 2: scores → cap · tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: logits → cap · tanh(logits / cap)
    alibi: bool = False  # Baichuan 2 13B: ALiBi attention biases instead of rotary positions
    num_experts: int = 0  # experts per Mixture-of-Experts layer (0: a dense model)
    num_experts_per_tok: int = 2  # top-k: the experts each token is routed to
    moe_intermediate_size: int = 0  # each expert's MLP width (0: intermediate_size, as Mixtral and OLMoE)
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1 (Mixtral always does)
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss (transformers' aux_loss) in the loss
    router_z_loss_coef: float = 0.0  # weight of the router z-loss (mean squared log-sum-exp of router logits)
    capacity_factor: float | None = None  # None: dropless; else an expert takes ceil(tokens·k/E · factor) tokens
    decoder_sparse_step: int = 1  # Qwen3-MoE: layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here (those layers have a dense MLP)

    def __post_init__(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise ModelConfigError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ModelConfigError(f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        if self.attention_bias and self.model_type not in ("qwen2", "gpt2"):
            raise ModelConfigError(
                f"attention_bias is only supported for qwen2 and gpt2, not {self.model_type}; "
                "Llama's attention_bias also puts a bias on o_proj, which moai_jax does not model"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ModelConfigError(f"unsupported hidden_act {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.num_experts:
            _check_experts(self)
        if self.alibi and self.model_type != "baichuan":
            raise ModelConfigError(f"alibi is only supported for baichuan (Baichuan 2 13B), not {self.model_type}")

    @property
    def expert_size(self) -> int:
        """The width of each expert's MLP."""
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def sparse_layers(self) -> tuple[bool, ...]:
        """Per layer: does it have a Mixture-of-Experts MLP (all False for a dense model)?"""
        return tuple(bool(self.num_experts) and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
                     for i in range(self.num_layers))

    @property
    def family(self) -> Family:
        """What sets this model's family apart from Llama."""
        return FAMILIES[self.model_type]

    def __hash__(self) -> int:
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """A published model's config by name, e.g. "llama3-8b" or "tiny"."""
        from moai_jax.models.presets import PRESETS

        if name not in PRESETS and ("/" in name or name.startswith((".", "~")) or Path(name).exists()):
            what = "is a file, not a model folder" if Path(name).exists() else "does not exist"
            raise ModelConfigError(f"model folder {name} {what}; pass a Hugging Face model folder (one holding "
                                   "config.json) or a preset name such as tiny")
        if name not in PRESETS:
            raise ModelConfigError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read `path/config.json` of a Hugging Face model directory."""
        path = Path(path)
        if not path.is_dir():
            raise ModelConfigError(f"model directory {path} does not exist; pass a Hugging Face model folder")
        file = path / "config.json"
        if not file.is_file():
            raise ModelConfigError(f"{file} is missing; a Hugging Face model folder holds a config.json")
        try:
            hf = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{file} is not valid JSON: {e}") from e
        return cls.from_hf_dict(hf, source=str(file))

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json") -> ModelConfig:
        """Build from the contents of a Hugging Face config.json (`source` names it in errors)."""
        model_type = hf.get("model_type")
        if model_type is None:
            raise ModelConfigError(
                f"{source} has no 'model_type'; add one of: {', '.join(ARCHITECTURES)}"
            )
        if model_type not in ARCHITECTURES:
            raise ModelConfigError(
                f"{source}: unsupported model_type {model_type!r}; supported: "
                + ", ".join(f"{t} ({a})" for t, a in ARCHITECTURES.items())
            )
        try:
            return cls._build(cls._fields_from_hf(model_type, hf, source), source)
        except KeyError as e:
            raise ModelConfigError(f"{source} has no {e.args[0]!r}, which a {model_type} config.json needs") from e

    @staticmethod
    def _fields_from_hf(model_type: str, hf: dict, source: str) -> dict:
        if model_type == "gpt2":  # GPT-2's config.json names everything its own way
            return gpt2_fields_from_hf(hf, source)
        family = family_fields_from_hf(model_type, hf, source)  # the keys Llama's config does not have
        if hf.get("mlp_bias", False):
            raise ModelConfigError(f"{source}: an MLP with bias (mlp_bias) is not supported")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        rope.setdefault("rope_type", rope.pop("type", "default"))
        sliding_window = hf.get("sliding_window")
        if model_type in ("qwen2", "qwen3", "qwen3_moe") and not hf.get("use_sliding_window", False):
            sliding_window = None
        num_heads = hf["num_attention_heads"]
        return dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope_theta=rope_theta,
            rope_scaling=None if rope["rope_type"] == "default" else rope,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            sliding_window=sliding_window,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        ) | family

    @classmethod
    def _build(cls, fields: dict, source: str) -> ModelConfig:
        try:
            return cls(**fields)
        except ModelConfigError as e:
            raise ModelConfigError(f"{source}: {e}") from e

    def to_hf_dict(self) -> dict:
        """The config.json that transformers reads back as this model."""
        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        hf = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": rope,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.model_type == "llama":
            hf |= {"attention_bias": False, "mlp_bias": False}
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            hf |= {"use_sliding_window": self.sliding_window is not None, "sliding_window": self.sliding_window}
        if self.model_type == "qwen3":
            hf["attention_bias"] = False
        return family_to_hf(self, hf)


def _check_experts(c: ModelConfig) -> None:
    """A Mixture-of-Experts config that routes each token to existing experts, or what to change."""
    if c.model_type not in MOE_FAMILIES:
        raise ModelConfigError(f"num_experts is set for {c.model_type}, which has no Mixture-of-Experts layers; "
                               f"use one of: {', '.join(MOE_FAMILIES)}")
    if not 1 <= c.num_experts_per_tok <= c.num_experts:
        raise ModelConfigError(f"num_experts_per_tok ({c.num_experts_per_tok}) must be between 1 and num_experts "
                               f"({c.num_experts}): a token cannot be routed to more experts than exist")
    if c.capacity_factor is not None and c.capacity_factor <= 0:
        raise ModelConfigError(f"capacity_factor must be positive (got {c.capacity_factor}); None routes dropless")
    if c.decoder_sparse_step < 1:
        raise ModelConfigError(f"decoder_sparse_step must be at least 1 (got {c.decoder_sparse_step})")


def param_count(config: ModelConfig) -> int:
    """Exact number of parameters, as Hugging Face counts them (lm_head only when untied)."""
    c, f = config, config.family
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    attention = c.hidden_size * (2 * q_out + 2 * kv_out) + (q_out + 2 * kv_out if c.attention_bias else 0)
    attention += (c.hidden_size if f.output_bias else 0) + (2 * c.head_dim if f.qk_norm else 0)
    attention += q_out + kv_out - 2 * c.head_dim if f.qk_norm_whole else 0
    mlp = _mlp_matrices(c) * c.hidden_size * c.intermediate_size
    mlp += 0 if f.gated_mlp else c.intermediate_size + c.hidden_size  # GPT-2's MLP biases
    norm = c.hidden_size * (2 if f.norm == "layer" else 1)  # LayerNorm has a bias too
    layer = attention + (4 if f.sandwich_norms else 2) * norm
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    positions = c.max_position_embeddings * c.hidden_size if f.learned_positions else 0
    sparse = sum(c.sparse_layers)
    mlps = (c.num_layers - sparse) * mlp + sparse * _moe_params(c, c.num_experts)
    return c.num_layers * layer + mlps + embeddings + positions + norm


def active_param_count(config: ModelConfig) -> int:
    """The parameters one token uses: `param_count` with each MoE layer's experts cut to the k it is routed to."""
    c = config
    sparse = sum(c.sparse_layers)
    return param_count(c) - sparse * (_moe_params(c, c.num_experts) - _moe_params(c, c.num_experts_per_tok))


def _moe_params(config: ModelConfig, experts: int) -> int:
    """A Mixture-of-Experts MLP with `experts` experts: the router and each expert's gated MLP."""
    return config.num_experts * config.hidden_size + experts * 3 * config.hidden_size * config.expert_size


def _mlp_matrices(config: ModelConfig) -> int:
    return 3 if config.family.gated_mlp else 2


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), causal attention counted once.

        6 · N_matmul + 6 · L · s · h · d

    N_matmul counts the weights of every matmul, lm_head included even when tied to the embedding
    (the embedding lookup, norms and biases are not matmuls). Each matmul weight costs 2 FLOPs per
    token forward and 4 backward. Attention's QKᵀ and AV cost 2 · 2 · s · h · d per token and layer
    forward for full attention, ×3 with backward = 12 · L · s · h · d, halved for the causal mask.
    Gemma 2's sliding-window layers are counted as full causal attention. A Mixture-of-Experts layer
    counts its router and the k experts a token is routed to (its active parameters).
    """
    c = config
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    dense_mlp, sparse = _mlp_matrices(c) * c.hidden_size * c.intermediate_size, sum(c.sparse_layers)
    matmul_params = (c.num_layers * c.hidden_size * (2 * q_out + 2 * kv_out) + (c.num_layers - sparse) * dense_mlp
                     + sparse * _moe_params(c, c.num_experts_per_tok) + c.vocab_size * c.hidden_size)
    attention = 6 * c.num_layers * seq_len * c.num_heads * c.head_dim
    return float(6 * matmul_params + attention)
