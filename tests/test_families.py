"""Qwen3, GPT-2, Gemma 2 and Baichuan 2 (rotary and ALiBi) against their PyTorch references, on tiny configs.

Each family's reference model (transformers, or tests/baichuan_reference.py) is built once and shared:
logits, loss and gradients; Hugging Face → load → save → Hugging Face; the same losses on one device and 2×2×2.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from baichuan_reference import BaichuanForCausalLM
from moai_jax.accelerator import Accelerator
from moai_jax.models import Decoder, ModelConfig, load_pretrained, param_count, save_pretrained
from moai_jax.models.hf import _hf_tensors
from moai_jax.optimizer import adamw
from moai_jax.planner.memory import param_shapes
from moai_jax.sharding.mesh import MeshShape
from moai_jax.trainer import Trainer

VOCAB = 256
LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
BAICHUAN = dict(model_type="baichuan", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, rms_norm_eps=1e-6, model_max_length=64, hidden_act="silu")
FAMILIES = {
    "qwen3": lambda: transformers.Qwen3Config(**LLAMA_LIKE, head_dim=16, tie_word_embeddings=True),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64),
    "gemma2": lambda: transformers.Gemma2Config(**LLAMA_LIKE, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                                attn_logit_softcapping=2.0, final_logit_softcapping=1.5),
    "baichuan2-7b": lambda: BAICHUAN | {"position_embedding": "rope", "max_position_embeddings": 64},
    "baichuan2-13b": lambda: BAICHUAN | {"num_attention_heads": 8},  # ALiBi (inferred: hidden_size != 4096), 8 slopes
}


def _randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name or ".ln_" in name
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if is_norm and name.endswith("weight") else 0.08 * torch.randn_like(p))
    return model.eval()


@functools.cache
def reference(family: str, tmp_root: str):
    """(the PyTorch model, its Hugging Face folder) of a tiny random model of `family`."""
    from pathlib import Path

    path = Path(tmp_root) / family
    config = FAMILIES[family]()
    if family.startswith("baichuan"):
        model = _randomize(BaichuanForCausalLM(config))
        model.save(path)
    else:
        model = _randomize(transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager"))
        model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("families"))


def torch_logits(model, ids):
    with torch.no_grad():
        out = model(torch.tensor(ids))
    return (out if isinstance(out, torch.Tensor) else out.logits).numpy()


def token_ids(batch=2, length=24, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def _torch_loss_and_grads(model, ids):
    model.zero_grad()
    logits = model(torch.tensor(ids))
    logits = logits if isinstance(logits, torch.Tensor) else logits.logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), torch.tensor(ids[:, 1:]).reshape(-1))
    loss.backward()
    return loss.item(), {n: p.grad.numpy().copy() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_loss_and_gradients_match_the_reference(family, tmp_root):
    ref, path = reference(family, tmp_root)
    ids = token_ids()
    expected = torch_logits(ref, ids)
    if family in ("gemma2", "baichuan2-13b"):  # "xla" has its own code for soft-capping, windows and ALiBi
        logits = load_pretrained(path, attention="xla")(jnp.asarray(ids))
        np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)

    ref_loss, ref_grads = _torch_loss_and_grads(ref, ids)
    model = load_pretrained(path, attention="blockwise", remat="matmuls")
    graphdef, params = nnx.split(model)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params)(jnp.asarray(ids))
        log_probs = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(log_probs, jnp.asarray(ids)[:, 1:, None], axis=-1).mean(), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)
    assert abs(float(loss) - ref_loss) / ref_loss < 1e-4
    # the gradients as Hugging Face tensors: the same conversion save_pretrained does
    ours = {name: gather() for name, _, gather in _hf_tensors(nnx.merge(graphdef, grads), np.float32)}
    assert set(ours) == set(ref_grads)  # a tied lm_head is neither's own parameter
    for name, ref_grad in ref_grads.items():
        assert np.abs(ours[name] - ref_grad).max() / np.abs(ref_grad).max() < 1e-4, name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_save_round_trip_gives_identical_logits(family, tmp_root, tmp_path):
    ref, path = reference(family, tmp_root)
    save_pretrained(load_pretrained(path), tmp_path)
    if family.startswith("baichuan"):
        reloaded = BaichuanForCausalLM.load(tmp_path)
    else:
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = token_ids()
    np.testing.assert_array_equal(torch_logits(reloaded, ids), torch_logits(ref, ids))
    assert ModelConfig.from_pretrained(tmp_path) == ModelConfig.from_pretrained(path)


def _batches(steps=2, batch=8, seq=32):
    """Two packed documents per row, with their own positions."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        ids = rng.integers(0, VOCAB, (batch, seq)).astype(np.int32)
        cut = rng.integers(4, seq - 4, (batch, 1))
        pos = np.arange(seq)[None, :]
        labels = np.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        labels[pos == cut - 1] = -100
        out.append({"input_ids": ids, "labels": labels, "segment_ids": np.where(pos < cut, 1, 2).astype(np.int32),
                    "positions": np.where(pos < cut, pos, pos - cut).astype(np.int32)})
    return out


@pytest.mark.parametrize("family", ["qwen3", "gpt2", "gemma2", "baichuan2-13b"])  # 7B: Llama's parts + NormHead
def test_same_losses_on_every_mesh(family, tmp_root):
    _, path = reference(family, tmp_root)
    config = ModelConfig.from_pretrained(path)
    losses = {}
    # 2×2×2 splits each family's own weights and heads; data=8 alone splits only the batch, as for every family
    # (test_trainer), so it adds no code path here
    for mesh in ("data=1,fsdp=1,tensor=1", "data=2,fsdp=2,tensor=2"):
        # built eagerly: no initializer to compile for each mesh (test_trainer builds under jit into the shards)
        trainer = Trainer(Decoder(config, rngs=nnx.Rngs(0)), adamw(1e-3), 8, 32, Accelerator(MeshShape.parse(mesh).size),
                          mesh)
        losses[mesh] = [float(trainer.step(b)["loss"]) for b in _batches()]
    ref = losses.pop("data=1,fsdp=1,tensor=1")
    for mesh, got in losses.items():
        np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=mesh)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parameters_carry_logical_names_and_counts_agree(family, tmp_root):
    _, path = reference(family, tmp_root)
    config = ModelConfig.from_pretrained(path)
    state = nnx.state(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))), nnx.Param)
    variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert all(len(v.out_sharding) == len(v.shape) for v in variables)
    count = sum(math.prod(v.shape) for v in variables)
    assert count == param_count(config) == sum(math.prod(s) for s, _ in param_shapes(config).values())

