"""Bad input: each user mistake raises a MoaiError subclass that names the file and the tensor."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from moai_jax.errors import DataError, ModelConfigError, WeightsError
from moai_jax.models import ModelConfig, dtype_from_name, load_pretrained, load_tokenizer

HF_CONFIG = {
    "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
}


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny Llama directory written by hand: config.json + model.safetensors of zeros."""
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    tensors = {"model.embed_tokens.weight": (256, 64), "model.norm.weight": (64,), "lm_head.weight": (256, 64)}
    for i in range(2):
        for name, shape in {"self_attn.q_proj.weight": (64, 64), "self_attn.k_proj.weight": (32, 64),
                            "self_attn.v_proj.weight": (32, 64), "self_attn.o_proj.weight": (64, 64),
                            "mlp.gate_proj.weight": (128, 64), "mlp.up_proj.weight": (128, 64),
                            "mlp.down_proj.weight": (64, 128), "input_layernorm.weight": (64,),
                            "post_attention_layernorm.weight": (64,)}.items():
            tensors[f"model.layers.{i}.{name}"] = shape
    save_file({n: np.zeros(s, np.float32) for n, s in tensors.items()}, str(tmp_path / "model.safetensors"))
    return tmp_path


def rewrite(checkpoint, change):
    tensors = load_file(str(checkpoint / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(checkpoint / "model.safetensors"))


def test_the_hand_written_checkpoint_loads(checkpoint):
    assert load_pretrained(checkpoint).layers.attention.k_proj[...].shape == (2, 64, 2, 16)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelConfigError, match="does-not-exist.*does not exist"):
        load_pretrained(tmp_path / "does-not-exist")


def test_config_without_model_type(checkpoint):
    (checkpoint / "config.json").write_text(json.dumps({k: v for k, v in HF_CONFIG.items() if k != "model_type"}))
    with pytest.raises(ModelConfigError, match="config.json has no 'model_type'.*llama"):
        load_pretrained(checkpoint)


def test_unsupported_architecture_lists_the_supported(checkpoint):
    (checkpoint / "config.json").write_text(json.dumps(HF_CONFIG | {"model_type": "bloom"}))
    with pytest.raises(ModelConfigError, match="config.json.*'bloom'.*llama.*mistral.*qwen2.*gpt2"):
        load_pretrained(checkpoint)


def test_missing_weights_file(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no model.safetensors or model.safetensors.index.json"):
        load_pretrained(checkpoint)


def test_missing_tensor_names_file_and_tensor(checkpoint):
    rewrite(checkpoint, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"model.safetensors has no tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_pretrained(checkpoint)


def test_misshaped_tensor_names_file_tensor_and_what_to_change(checkpoint):
    rewrite(checkpoint, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}))
    with pytest.raises(WeightsError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' "
                                           r"has shape \[64, 64\], but config.json implies \[32, 64\]"):
        load_pretrained(checkpoint)


def test_extra_tensor_is_named(checkpoint):
    rewrite(checkpoint, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}))
    with pytest.raises(WeightsError, match="does not use: model.layers.0.self_attn.o_proj.bias"):
        load_pretrained(checkpoint)


def test_index_naming_a_missing_shard(checkpoint):
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="index.json names model-00002-of-00002.safetensors, which is missing"):
        load_pretrained(checkpoint)


def test_unknown_dtype_name_lists_the_known(checkpoint):
    assert dtype_from_name("bfloat16") is not None
    with pytest.raises(ModelConfigError, match="'float8'.*float32, bfloat16, float16"):
        load_pretrained(checkpoint, dtype="float8")


def test_unknown_preset_lists_presets():
    with pytest.raises(ModelConfigError, match="'llama9'.*llama3-8b.*tiny"):
        ModelConfig.preset("llama9")


def test_tokenizer_loads_from_local_files_and_missing_one_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no usable tokenizer"):
        load_tokenizer(tmp_path)
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path)("hello world")["input_ids"] == [1, 2]
