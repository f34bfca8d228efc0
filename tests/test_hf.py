"""Hugging Face parity: logits, loss and gradients against transformers' PyTorch models; load/save round trips."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import AxisType, NamedSharding

from moai_jax.models import ModelConfig, load_pretrained, save_pretrained
from moai_jax.sharding.rules import partition_spec

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=512)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 10000.0}
CASES = {
    "llama-grouped-untied": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-full-tied": (transformers.LlamaConfig,
                        dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3-rope-scaling": (transformers.LlamaConfig,
                            dict(num_attention_heads=4, num_key_value_heads=1, rope_parameters=LLAMA3_ROPE)),
    "mistral": (transformers.MistralConfig, dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=64)),
    "qwen2-bias": (transformers.Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen2-tied": (transformers.Qwen2Config,
                   dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)),
}


def make_hf_model(case: str, path):
    """A random transformers model of a tiny config, saved to `path` with its own save_pretrained."""
    config_class, kwargs = CASES[case]
    config = config_class(**SMALL, **kwargs, rms_norm_eps=1e-5)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def token_ids(batch=2, length=24, seed=0):
    return np.random.default_rng(seed).integers(0, SMALL["vocab_size"], (batch, length))


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    hf_model = make_hf_model(case, tmp_path)
    ids = token_ids()
    model = load_pretrained(tmp_path, attention="xla")
    logits = np.asarray(model(jnp.asarray(ids)))
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, torch_logits(hf_model, ids), atol=1e-4, rtol=0)


def test_blockwise_attention_matches_transformers(tmp_path):
    hf_model = make_hf_model("llama-grouped-untied", tmp_path)
    ids = token_ids(length=32)
    model = load_pretrained(tmp_path, attention="blockwise")
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), torch_logits(hf_model, ids), atol=1e-4, rtol=0)


def test_loss_and_gradients_match_pytorch(tmp_path):
    hf_model = make_hf_model("qwen2-bias", tmp_path)
    ids = token_ids(length=16)
    out = hf_model(torch.tensor(ids), labels=torch.tensor(ids))
    out.loss.backward()
    hf_grads = {n: p.grad.numpy() for n, p in hf_model.named_parameters()}

    model = load_pretrained(tmp_path, attention="blockwise", remat="matmuls")
    graphdef, params = nnx.split(model)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params)(jnp.asarray(ids))[:, :-1]
        labels = jnp.asarray(ids)[:, 1:]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1).mean()

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    grads = nnx.to_pure_dict(grads)
    assert abs(float(loss) - out.loss.item()) / out.loss.item() < 1e-4
    e, n, h = 64, 4, 16
    pairs = {
        "model.embed_tokens.weight": grads["embedding"],
        "lm_head.weight": grads["lm_head"].T,
        "model.norm.weight": grads["final_norm"]["weight"],
        "model.layers.0.self_attn.q_proj.weight": grads["layers"]["attention"]["q_proj"][0].reshape(e, n * h).T,
        "model.layers.1.self_attn.k_proj.bias": grads["layers"]["attention"]["k_bias"][1].reshape(-1),
        "model.layers.0.self_attn.o_proj.weight": grads["layers"]["attention"]["o_proj"][0].reshape(n * h, e).T,
        "model.layers.1.mlp.down_proj.weight": grads["layers"]["mlp"]["down_proj"][1].T,
        "model.layers.0.input_layernorm.weight": grads["layers"]["input_norm"]["weight"][0],
    }
    for name, ours in pairs.items():
        ref = hf_grads[name]
        assert np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max() < 1e-4, name


def test_round_trip_hf_load_save_transformers(tmp_path):
    hf_model = make_hf_model("llama3-rope-scaling", tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    save_pretrained(model, tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    ids = token_ids()
    np.testing.assert_allclose(torch_logits(reloaded.eval(), ids), torch_logits(hf_model, ids), atol=1e-6, rtol=0)


def test_save_splits_into_shards_with_index(tmp_path):
    make_hf_model("qwen2-tied", tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    save_pretrained(model, tmp_path / "ours", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((tmp_path / "ours" / f).is_file() for f in files)
    assert "lm_head.weight" not in index["weight_map"]
    ids = jnp.asarray(token_ids())
    np.testing.assert_array_equal(np.asarray(load_pretrained(tmp_path / "ours")(ids)), np.asarray(model(ids)))


def test_config_round_trips_through_config_json(tmp_path):
    make_hf_model("llama3-rope-scaling", tmp_path)
    config = ModelConfig.from_pretrained(tmp_path)
    assert config.rope_scaling["rope_type"] == "llama3" and config.num_kv_heads == 1
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_dict())
    assert hf_config.rope_parameters["factor"] == 8.0 and hf_config.num_key_value_heads == 1


def test_load_places_each_tensor_on_its_sharding(tmp_path):
    make_hf_model("llama-grouped-untied", tmp_path / "hf")
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
    config = ModelConfig.from_pretrained(tmp_path / "hf")
    from moai_jax.models import Decoder

    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))), nnx.Param)
    shardings = jax.tree.map(
        lambda v: NamedSharding(mesh, partition_spec(v.out_sharding, v.shape, dict(mesh.shape))),
        abstract, is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    sharded = load_pretrained(tmp_path / "hf", shardings=shardings)
    q_proj = sharded.layers.attention.q_proj[...]
    assert q_proj.sharding.spec == partition_spec(("layers", "embed", "heads", "head_dim"), q_proj.shape,
                                                  dict(mesh.shape))
    assert len({str(s.index) for s in q_proj.addressable_shards}) == 8
    plain = load_pretrained(tmp_path / "hf")
    np.testing.assert_array_equal(np.asarray(q_proj), np.asarray(plain.layers.attention.q_proj[...]))
    save_pretrained(sharded, tmp_path / "ours")
    ids = jnp.asarray(token_ids())
    np.testing.assert_array_equal(np.asarray(load_pretrained(tmp_path / "ours")(ids)), np.asarray(plain(ids)))


def test_bfloat16_parameters_load_and_save(tmp_path):
    make_hf_model("llama-grouped-untied", tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf", dtype="bfloat16", param_dtype="bfloat16")
    assert model.embedding[...].dtype == jnp.bfloat16
    assert model(jnp.asarray(token_ids())).dtype == jnp.float32
    save_pretrained(model, tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
