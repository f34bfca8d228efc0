"""The Decoder on its own: packed sequences, attention implementations, remat, logical names, presets, counts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moai_jax.errors import ModelConfigError
from moai_jax.models import Decoder, ModelConfig, flops_per_token, param_count
from moai_jax.models.attention import attention, blockwise_attention

TINY = ModelConfig.preset("tiny")
PUBLISHED = {
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-0.6b": 596_049_920,
    "qwen3-8b": 8_190_735_360,
    "qwen3-32b": 32_762_123_264,
    "gemma2-2b": 2_614_341_888,
    "gemma2-9b": 9_241_705_984,
    "gemma2-27b": 27_227_128_320,
    "gpt2": 124_439_808,
    "gpt2-xl": 1_557_611_200,
    "baichuan2-7b": 7_505_973_248,
    "baichuan2-13b": 13_896_668_160,
}


def random_qkv(length, batch=2, heads=4, kv_heads=2, head_dim=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim))
    k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim))
    return q, k, v


def packed_segments(length, cuts=(10, 20)):
    """Three documents and three padding tokens (segment 0) in each of two rows."""
    row = np.zeros(length, np.int32)
    row[: cuts[0]], row[cuts[0] : cuts[1]], row[cuts[1] : length - 3] = 1, 2, 3
    return jnp.asarray(np.stack([row, row]))


@pytest.mark.parametrize("length,block", [(37, 8), (12, 128)])
def test_blockwise_matches_xla_values_and_gradients(length, block):
    q, k, v = random_qkv(length)
    segments = packed_segments(length, cuts=(length // 3, 2 * length // 3))
    weights = jax.random.normal(jax.random.key(1), q.shape)

    def loss(implementation, q, k, v):
        if implementation == "blockwise":
            out = blockwise_attention(q, k, v, segments, block_size=block)
        else:
            out = attention(q, k, v, segments, implementation="xla")
        return (out * weights).sum(), out

    def value_and_grads(implementation):
        return jax.jit(jax.value_and_grad(lambda *a: loss(implementation, *a), (0, 1, 2), has_aux=True))(q, k, v)

    (_, out_xla), grads_xla = value_and_grads("xla")
    (_, out_block), grads_block = value_and_grads("blockwise")
    np.testing.assert_allclose(out_block, out_xla, atol=1e-5, rtol=0)
    for g_block, g_xla in zip(grads_block, grads_xla):
        np.testing.assert_allclose(g_block, g_xla, atol=1e-5, rtol=0)


def _shapes_in(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield getattr(var.aval, "shape", ())
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    yield from _shapes_in(inner)


def test_blockwise_never_holds_length_by_length_scores():
    length = 256
    q, k, v = random_qkv(length, batch=1)
    segments = jnp.zeros((1, length), jnp.int32)
    grad = jax.grad(lambda q, k, v: blockwise_attention(q, k, v, segments, block_size=32).sum(), (0, 1, 2))
    jaxpr = jax.make_jaxpr(grad)(q, k, v).jaxpr
    shapes = list(_shapes_in(jaxpr))
    assert shapes and not [s for s in shapes if list(s).count(length) >= 2]
    blocks = length // 32  # forward and backward visit only the blocks on or below the diagonal
    assert sorted(_scan_lengths(jaxpr)) == [blocks * (blocks + 1) // 2] * 2


def _scan_lengths(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            yield eqn.params["length"]
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if isinstance(inner, jax.extend.core.Jaxpr):
                yield from _scan_lengths(inner)


@pytest.mark.parametrize("implementation", ["xla", "blockwise"])
def test_packed_sequences_equal_each_document_alone(implementation):
    model = Decoder(TINY, rngs=nnx.Rngs(0), attention=implementation)
    length, cuts = 32, (10, 20)
    forward = nnx.jit(lambda model, ids, segments, positions: model(ids, segment_ids=segments, positions=positions))
    ids = jax.random.randint(jax.random.key(2), (2, length), 0, TINY.vocab_size)
    segments = packed_segments(length, cuts)
    starts = np.array([0, cuts[0], cuts[1], length - 3])
    positions = jnp.asarray(np.arange(length) - starts[np.searchsorted(starts, np.arange(length), "right") - 1])
    packed = forward(model, ids, segments, jnp.broadcast_to(positions, (2, length)))
    assert np.isfinite(np.asarray(packed)).all()
    for start, stop in [(0, cuts[0]), (cuts[0], cuts[1]), (cuts[1], length - 3)]:
        alone = forward(model, ids[:, start:stop], None, None)
        np.testing.assert_allclose(packed[:, start:stop], alone, atol=1e-5, rtol=0)


def test_remat_policies_give_the_same_gradients():
    ids = jax.random.randint(jax.random.key(3), (2, 16), 0, TINY.vocab_size)
    model = Decoder(TINY, rngs=nnx.Rngs(0), attention="blockwise")
    grads = {}
    for remat in ("none", "matmuls", "full"):
        model.remat = remat
        graphdef, params = nnx.split(model)
        grads[remat] = jax.jit(jax.grad(lambda p, g=graphdef: nnx.merge(g, p)(ids).std()))(params)
    for remat in ("matmuls", "full"):
        for a, b in zip(jax.tree.leaves(grads[remat]), jax.tree.leaves(grads["none"])):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_hidden_states_and_logits_compose_the_call():
    model = Decoder(dataclasses.replace(TINY, tie_word_embeddings=True), rngs=nnx.Rngs(0))
    ids = jnp.arange(16).reshape(1, 16)
    hidden = model.hidden_states(ids)
    assert hidden.shape == (1, 16, TINY.hidden_size)
    np.testing.assert_array_equal(model.logits(hidden), model(ids))


def test_every_parameter_carries_logical_names_and_layers_are_stacked():
    model = Decoder(TINY, rngs=nnx.Rngs(0))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    assert tuple(specs["layers"]["attention"]["q_proj"]) == ("layers", "embed", "heads", "head_dim")
    assert tuple(specs["layers"]["attention"]["k_proj"]) == ("layers", "embed", "kv_heads", "head_dim")
    assert tuple(specs["layers"]["attention"]["o_proj"]) == ("layers", "heads", "head_dim", "embed")
    assert tuple(specs["layers"]["mlp"]["down_proj"]) == ("layers", "mlp", "embed")
    assert tuple(specs["embedding"]) == ("vocab", "embed") and tuple(specs["lm_head"]) == ("embed", "vocab")
    layer_params = jax.tree.leaves(nnx.state(model.layers, nnx.Param))
    assert all(p.shape[0] == TINY.num_layers for p in layer_params)
    count = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == param_count(TINY)


def test_model_runs_sharded_under_a_mesh():
    from jax.sharding import AxisType, NamedSharding

    from moai_jax.sharding.annotate import logical_sharding
    from moai_jax.sharding.rules import partition_spec

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    model = Decoder(TINY, rngs=nnx.Rngs(0), attention="blockwise", remat="full")
    ids = jax.random.randint(jax.random.key(4), (4, 16), 0, TINY.vocab_size)
    expected = model(ids)
    graphdef, params = nnx.split(model)
    shardings = jax.tree.map(
        lambda v: NamedSharding(mesh, partition_spec(v.out_sharding, v.shape, dict(mesh.shape))),
        params, is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    params = jax.device_put(params, shardings)

    @jax.jit
    def forward(params, ids):
        with logical_sharding(mesh):
            return nnx.merge(graphdef, params)(ids)

    np.testing.assert_allclose(forward(params, ids), expected, atol=1e-5)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_param_count_of_presets_matches_published(name):
    assert param_count(ModelConfig.preset(name)) == PUBLISHED[name]


def test_flops_per_token_formula():
    config = ModelConfig.preset("llama3-8b")
    matmul_params = param_count(config) - config.vocab_size * config.hidden_size - (2 * 32 + 1) * 4096
    assert flops_per_token(config, 4096) == 6 * matmul_params + 6 * 32 * 4096 * 32 * 128
    assert flops_per_token(config, 2048) < flops_per_token(config, 4096)


def test_presets_and_configs_are_hashable_and_replaceable():
    config = ModelConfig.preset("llama3.1-8b")
    assert config.rope_scaling["rope_type"] == "llama3"
    assert hash(config) == hash(ModelConfig.preset("llama3.1-8b"))
    assert dataclasses.replace(config, num_layers=2).num_layers == 2
    assert ModelConfig.preset("tiny").num_kv_heads < ModelConfig.preset("tiny").num_heads


def test_mistral_rejects_sequences_longer_than_its_window():
    model = Decoder(dataclasses.replace(TINY, model_type="mistral", sliding_window=8), rngs=nnx.Rngs(0))
    assert model(jnp.zeros((1, 8), jnp.int32)).shape == (1, 8, TINY.vocab_size)
    with pytest.raises(ModelConfigError, match="sliding window of 8"):
        model(jnp.zeros((1, 9), jnp.int32))


@pytest.mark.parametrize("kwargs,match", [
    (dict(attention="flash"), "attention 'flash'.*blockwise"),
    (dict(remat="some"), "remat 'some'.*matmuls"),
])
def test_unknown_attention_or_remat_is_a_config_error(kwargs, match):
    with pytest.raises(ModelConfigError, match=match):
        Decoder(TINY, rngs=nnx.Rngs(0), **kwargs)


def test_auto_attention_is_blockwise_on_cpu():
    from moai_jax.models.attention import resolve

    assert resolve("auto", jnp.bfloat16, 128) == "blockwise"
    assert resolve("xla", jnp.float32, 16) == "xla"
