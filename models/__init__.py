"""Decoder models (Llama, Mistral, Qwen2) with logical axis names, and their Hugging Face checkpoints."""

from moai_jax.models.config import ModelConfig, dtype_from_name, flops_per_token, param_count
from moai_jax.models.hf import load_pretrained, load_tokenizer, save_pretrained
from moai_jax.models.llama import Decoder

__all__ = [
    "Decoder",
    "ModelConfig",
    "dtype_from_name",
    "flops_per_token",
    "load_pretrained",
    "load_tokenizer",
    "param_count",
    "save_pretrained",
]
