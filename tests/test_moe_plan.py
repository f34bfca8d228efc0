"""The planner on Mixture-of-Experts models: presets' parameter counts, expert parallelism chosen where it must
be, the plan saying so, and the memory model against a compiled tiny MoE step."""

import dataclasses
import math

import pytest

from moai_jax import Accelerator, plan
from moai_jax.models import ModelConfig, param_count
from moai_jax.models.config import active_param_count
from moai_jax.planner.memory import estimate_bytes, param_shapes
from moai_jax.sharding.mesh import MeshShape
from moai_jax.sizes import parse_bytes

# Published totals and active parameters, in billions (model cards of the Hugging Face checkpoints)
PUBLISHED = {"mixtral-8x7b": (46.7, 12.9), "qwen3-30b-a3b": (30.5, 3.3), "qwen3-235b-a22b": (235.0, 22.0),
             "olmoe-1b-7b": (6.9, 1.3)}
# test_moe's tiny Qwen3-MoE, 8 experts, top-2
TINY_MOE = ModelConfig(model_type="qwen3_moe", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=32)


@pytest.mark.parametrize("name", PUBLISHED)
def test_moe_presets_have_the_published_parameter_counts(name):
    config = ModelConfig.preset(name)
    total, active = PUBLISHED[name]
    assert param_count(config) / 1e9 == pytest.approx(total, rel=0.005)
    assert active_param_count(config) / 1e9 == pytest.approx(active, rel=0.02)  # published to 2 or 3 digits
    assert sum(math.prod(shape) for shape, _ in param_shapes(config).values()) == param_count(config)


def test_planner_splits_the_experts_where_nothing_else_fits():
    """fsdp and context fixed at 1, one key/value head (no tensor split), one layer (no stages): the 64
    experts' weights and Adam state replicated over data do not fit 300 MB; split over expert they do."""
    config = dataclasses.replace(TINY_MOE, num_kv_heads=1, num_layers=1, hidden_size=256, moe_intermediate_size=512,
                                 num_experts=64)
    acc = Accelerator(8, "h100", device_memory=parse_bytes("300MB"))
    chosen = plan(config, 16, 128, acc, verify=False, fsdp=1, context=1)
    e = chosen.mesh.expert
    assert e > 1 and f"EP {e}" in chosen.summary()
    assert f"expert={e}: each device holds 1/{e}" in chosen.why
    replicated = plan(config, 16, 128, Accelerator(8, "h100"), verify=False, fsdp=1, context=1, expert=1)
    assert replicated.estimated_bytes_per_device["total"] > chosen.budget_bytes_per_device


def test_memory_estimate_of_a_compiled_expert_parallel_step():
    acc = Accelerator(8, "cpu")
    verified = plan(TINY_MOE, 8, 64, acc, data=1, fsdp=1, tensor=1, expert=8, micro_batches=1, remat="none",
                    loss="whole")
    assert "EP 8" in verified.summary()
    estimated = verified.estimated_bytes_per_device["total"]
    assert verified.estimated_bytes_per_device["experts"] > 0
    assert estimated == pytest.approx(verified.verified_bytes_per_device, rel=0.15)  # measured +2%


def test_a_pipeline_on_gpus_holds_its_stacked_gradients_beside_their_sum():
    """Compile-only H100s keep the backward scan's per-layer gradients and the micro-batches' sum (mixtral-8x7b,
    stage=2 on 16: docs/moe.md); XLA:CPU's fit keeps one copy."""
    mesh = MeshShape(stage=2, expert=4)
    for family, copies in (("gpu", 2), ("cpu", 1)):
        terms = estimate_bytes(TINY_MOE, 16, 64, mesh, micro_batches=4, remat="full", family=family)
        assert terms["gradients"] == pytest.approx(copies * terms["parameters"], abs=1)


def test_gpu_blocks_run_the_routed_rows_where_ragged_dot_copies_them_for_every_local_expert():
    """XLA's GPU compiler runs ragged_dot as one dense dot over every group (the experts term's RAGGED_EXPANSION):
    a grouped MLP's backward on compile-only H100s grows by the term's bytes per local expert. The blocks
    (models/grouped_matmul.py) grow by less than two experts' copies, within the memory model's BLOCKS term."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from moai_jax.models import moe
    from moai_jax.models.grouped_matmul import block_count, block_rows
    from moai_jax.planner.experts import BLOCKS, RAGGED_EXPANSION
    from moai_jax.step import without_persistent_cache

    acc = Accelerator(1, "h100")
    if not acc.compile_only:
        pytest.skip(f"no compile-only H100 here: {acc.fallback}")
    rows, d, f = 2048, 512, 256
    on = SingleDeviceSharding(acc.devices[0])

    def temp_bytes(experts, platform):
        shaped = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=on)  # noqa: E731
        weights = (shaped((experts, d, f)), shaped((experts, d, f)), shaped((experts, f, d)))
        args = (shaped((rows, d)), weights, shaped((rows,), jnp.int32))

        def loss(x, weights, ids):
            return jnp.sum(moe._grouped_experts(x, ids, tuple((w,) for w in weights), jax.nn.silu).astype(jnp.float32))
        with without_persistent_cache(), pytest.MonkeyPatch.context() as patch:  # compile-only: nothing to load
            patch.setattr(moe, "_platform", lambda: platform)  # "tpu": the ragged_dot path, compiled for the H100
            compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    one, ragged = temp_bytes(1, "tpu"), temp_bytes(9, "tpu")
    expand_d, expand_f = RAGGED_EXPANSION["gpu"]
    per_expert = rows * (expand_d * d + expand_f * f) * 2
    assert (ragged - one) / 8 == pytest.approx(per_expert, rel=0.15)
    blocks = temp_bytes(9, "gpu")
    block_d, block_f = BLOCKS["gpu"]
    padded = block_count(rows, 9, block_rows(rows, 9)) * block_rows(rows, 9)
    assert blocks - one < min(2 * per_expert, padded * (block_d * d + block_f * f) * 2)
