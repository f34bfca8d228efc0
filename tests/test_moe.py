"""Mixture-of-Experts: Mixtral, Qwen3-MoE and OLMoE against transformers (logits, load-balancing loss, export);
expert parallelism against one device (losses and gradients over 10 steps on four meshes); the capacity factor.
The user's side (finetune.py, bad inputs, LoRA, generation, benchmark) is in test_moe_train.py."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from test_trainer import make_batches

from moai_jax.models import Decoder, ModelConfig, load_pretrained, param_count, save_pretrained
from moai_jax.models.moe import router_losses
from moai_jax.sharding.annotate import logical_sharding
from moai_jax.sharding.mesh import MeshShape, make_mesh
from moai_jax.sharding.rules import tree_shardings
from moai_jax.train import IGNORE, decoder_loss

# one xdist worker runs these tests (--dist loadgroup): they share the one-device reference run
pytestmark = pytest.mark.xdist_group("moe")

SMALL = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, max_position_embeddings=512, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5)
CASES = {
    "mixtral": (transformers.MixtralConfig, dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(intermediate_size=128, moe_intermediate_size=48, num_experts=8,
                                                    num_experts_per_tok=3, head_dim=16, norm_topk_prob=False)),
    "olmoe": (transformers.OlmoeConfig, dict(intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                                             norm_topk_prob=True, eos_token_id=2, pad_token_id=1)),
}


def make_hf_model(case: str, path, fused: bool = False):
    """A random transformers model of a tiny config, saved with its own save_pretrained (per-expert tensors,
    or with `fused` transformers 5's in-memory layout, gate_up_proj [E, 2I, H])."""
    config_class, kwargs = CASES[case]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**SMALL, **kwargs),
                                                          attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    model.save_pretrained(path, save_original_format=not fused)
    return model


def token_ids(batch=2, length=24):
    return np.random.default_rng(0).integers(0, SMALL["vocab_size"], (batch, length))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_router_loss_and_export_match_transformers(case, tmp_path):
    hf_model = make_hf_model(case, tmp_path / "hf")
    ids = token_ids()
    with torch.no_grad():
        out = hf_model(torch.tensor(ids), labels=torch.tensor(ids), output_router_logits=True)
    model = load_pretrained(tmp_path / "hf", attention="xla")
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), out.logits.numpy(), atol=1e-4, rtol=0)
    # the training loss: next-token loss + router_aux_loss_coef · load-balancing loss, as transformers adds them
    labels = np.concatenate([ids[:, 1:], np.full((2, 1), IGNORE)], axis=1)
    loss_sum, tokens, extra = decoder_loss()(model, {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels)})
    np.testing.assert_allclose(float(extra["router_loss"] / tokens), out.aux_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(float(loss_sum / tokens), out.loss.item(), rtol=1e-5)
    assert param_count(model.config) == sum(p.numel() for p in hf_model.parameters())

    save_pretrained(model, tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(torch.tensor(ids)).logits.numpy(), out.logits.numpy(), atol=1e-6, rtol=0)


def test_fused_expert_layout_loads(tmp_path):
    hf_model = make_hf_model("qwen3_moe", tmp_path, fused=True)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    ids = token_ids()
    with torch.no_grad():
        want = hf_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(load_pretrained(tmp_path, attention="xla")(jnp.asarray(ids))), want,
                               atol=1e-4, rtol=0)


# Expert parallelism: tiny Qwen3-MoE (8 experts, top-2, per-head q/k norms), 8 rows of 32 tokens, 10 SGD steps.
CONFIG = ModelConfig(model_type="qwen3_moe", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                     moe_intermediate_size=32, norm_topk_prob=True, router_aux_loss_coef=0.01)
BATCH, SEQ, STEPS = 8, 32, 10


@functools.cache
def sgd_run(mesh: str, micro_batches: int = 1, implementation: str = "auto"):
    """Per step: (loss, router loss, gradients) of the real MoE training loss, 10 SGD steps jitted over `mesh`
    (a pipeline if stage > 1, with `micro_batches`); and the compiled step's HLO and the final parameters."""
    shape = MeshShape.parse(mesh)
    model = Decoder(CONFIG, rngs=nnx.Rngs(0), attention="xla", moe_implementation=implementation)
    model.pipeline_stages, model.pipeline_micro_batches = shape.stage, micro_batches
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    device_mesh = make_mesh(shape, jax.devices()[: shape.size])
    shardings = tree_shardings(nnx.to_pure_dict(nnx.get_partition_spec(params)), nnx.to_pure_dict(params), device_mesh)
    params = jax.device_put(nnx.to_pure_dict(params), shardings)
    loss = decoder_loss()

    def step(params, batch):
        def mean_loss(params):
            with logical_sharding(device_mesh):
                loss_sum, tokens, extra = loss(nnx.merge(graphdef, params, rest), batch)
            return loss_sum / tokens, extra["router_loss"] / tokens
        (value, router), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
        return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), value, router, grads

    batches = make_batches(STEPS, BATCH, SEQ)
    compiled = jax.jit(step, out_shardings=(shardings, None, None, shardings)).lower(params, batches[0]).compile()
    history = []
    for batch in batches:
        params, value, router, grads = compiled(params, batch)
        history.append((float(value), float(router), jax.device_get(grads)))
    return history, compiled.as_text(), params


@pytest.mark.parametrize("mesh, micro_batches", [
    ("expert=8", 1), ("expert=4,data=2", 1), ("expert=2,fsdp=2,tensor=2", 1), ("stage=2,expert=4", 2),
])
def test_expert_parallel_matches_one_device(mesh, micro_batches):
    reference, _, _ = sgd_run("data=1")
    history, hlo, params = sgd_run(mesh, micro_batches)
    assert "all-to-all" in hlo  # tokens travel to their experts and back
    for (loss, router, grads), (want_loss, want_router, want_grads) in zip(history, reference):
        assert abs(loss - want_loss) < 1e-5 and abs(router - want_router) < 1e-5
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert reference[-1][0] < reference[0][0]  # it learns
    if mesh == "expert=8":  # each device holds 1/8 of every expert weight
        for name in ("gate_proj", "up_proj", "down_proj"):
            weight = params["layers"]["mlp"][name]
            assert weight.addressable_shards[0].data.size * 8 == weight.size
            assert weight.addressable_shards[0].data.shape[1] == CONFIG.num_experts // 8


def test_sorted_experts_under_data_and_fsdp_run_on_each_devices_own_rows():
    """Without expert parallelism the grouped matmul runs in a shard_map over data and fsdp (models/moe.py): the
    same losses and gradients as one device, and no device gathers the others' rows for it."""
    reference, _, _ = sgd_run("data=1")
    history, hlo, _ = sgd_run("data=2,fsdp=2", implementation="sorted")
    for (loss, router, grads), (want_loss, want_router, want_grads) in zip(history, reference):
        assert abs(loss - want_loss) < 1e-5 and abs(router - want_router) < 1e-5
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    rows = BATCH * SEQ * CONFIG.num_experts_per_tok  # the token-expert pairs of the whole batch
    assert f"[{rows},{CONFIG.hidden_size}]" not in hlo and f"[{rows // 4},{CONFIG.hidden_size}]" in hlo


def test_capacity_factor_drops_and_counts_and_a_large_one_is_dropless():
    """The sorted path with capacities, eagerly on one device: each expert takes at most ceil(T·k/E · factor) pairs;
    the drops counted are exactly the pairs above that; room for every token gives the dropless result."""
    from moai_jax.models.moe import MoE

    e, k = CONFIG.num_experts, CONFIG.num_experts_per_tok
    x = jax.random.normal(jax.random.key(1), (2, 16, CONFIG.hidden_size))

    def run(**fields):
        return MoE(dataclasses.replace(CONFIG, **fields), rngs=nnx.Rngs(0), dtype=jnp.float32,
                   param_dtype=jnp.float32)(x, None, "dense" if not fields else "sorted")
    dropless, stats = run()
    roomy, roomy_stats = run(capacity_factor=e / k)  # capacity = every token
    np.testing.assert_allclose(roomy, dropless, atol=1e-5, rtol=0)
    assert float(roomy_stats[..., -1].sum()) == 0
    tight, tight_stats = run(capacity_factor=0.5)
    counts = np.asarray(stats.sum(axis=(0, 1))[:e])
    capacity = int(np.ceil(32 * k / e * 0.5))
    assert float(tight_stats[..., -1].sum()) == np.maximum(counts - capacity, 0).sum() > 0
    losses = router_losses(tight_stats.sum(axis=(0, 1)), dataclasses.replace(CONFIG, capacity_factor=0.5))
    assert float(losses["dropped_fraction"]) == pytest.approx(np.maximum(counts - capacity, 0).sum() / (32 * k))
    assert np.abs(np.asarray(tight - dropless)).max() > 1e-3  # the dropped pairs' share is gone
