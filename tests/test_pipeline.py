"""Pipeline stages against no pipeline: same loss and gradients on 8 simulated devices, checkpoints that
move between stage counts, parameters and optimizer state split by the stage count, the planner's choice."""

import dataclasses
import functools
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx
from test_trainer import make_batches

from moai_jax.accelerator import Accelerator, hardware_profile
from moai_jax.checkpoint import Checkpoints
from moai_jax.errors import FlavorError
from moai_jax.models import Decoder, ModelConfig
from moai_jax.optimizer import adamw
from moai_jax.planner import plan
from moai_jax.planner.plan import Plan
from moai_jax.sharding.annotate import logical_sharding
from moai_jax.sharding.mesh import MeshShape, make_mesh
from moai_jax.sharding.rules import tree_shardings
from moai_jax.step import pipeline_micro_batches
from moai_jax.train import IGNORE, cross_entropy_sum
from moai_jax.trainer import Trainer

# one xdist worker runs these tests (--dist loadgroup): they share the cached no-pipeline reference
pytestmark = pytest.mark.xdist_group("pipeline")

# tiny, with 4 layers so that 4 stages divide them and 4 key/value heads so that tensor=2 divides them
CONFIG = dataclasses.replace(ModelConfig.preset("tiny"), num_layers=4, num_heads=8, num_kv_heads=4, head_dim=8)
BATCH, SEQ = 16, 32


@functools.cache
def loss_and_grads(mesh: str, micro_batches: int = 1):
    """The mean loss over a packed batch and its gradients, jitted over `mesh` (a pipeline if stage > 1)."""
    shape = MeshShape.parse(mesh)
    model = Decoder(CONFIG, rngs=nnx.Rngs(0), attention="xla")
    p = Plan(flavor=shape.size, hardware="cpu", mesh=shape, batch_size=BATCH, seq_len=SEQ, micro_batches=micro_batches)
    assert pipeline_micro_batches(model, p) == (1 if shape.stage > 1 else micro_batches)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    device_mesh = make_mesh(shape, jax.devices()[: shape.size])
    shardings = tree_shardings(nnx.to_pure_dict(nnx.get_partition_spec(params)), nnx.to_pure_dict(params), device_mesh)
    params = jax.device_put(nnx.to_pure_dict(params), shardings)
    batch = make_batches(1, BATCH, SEQ)[0]

    def mean_loss(params, batch):
        with logical_sharding(device_mesh):
            model = nnx.merge(graphdef, params, rest)
            return cross_entropy_sum(model, batch) / np.sum(batch["labels"] != IGNORE)

    loss, grads = jax.jit(jax.value_and_grad(mean_loss), out_shardings=(None, shardings))(params, batch)
    return float(loss), jax.device_get(grads)


@pytest.mark.parametrize("mesh, micro_batches", [  # 1, stages and 2 × stages micro-batches
    ("stage=2", 1), ("stage=2,data=2,tensor=2", 4), ("stage=4,fsdp=2", 4),
])
def test_pipeline_matches_no_pipeline(mesh, micro_batches):
    loss, grads = loss_and_grads(mesh, micro_batches)
    ref_loss, ref_grads = loss_and_grads("data=1")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads)


def test_checkpoints_move_between_stage_counts(tmp_path):
    """Saved with 4 stages, resumed with 1, and the reverse: the losses of an uninterrupted run (the
    pipeline's with remat full, which recomputes whole stages). XLA's own account of the compiled steps:
    the arguments per device (parameters, Adam moments, batch), less the batch, fall by the stage count."""
    batches = make_batches(4, 8, SEQ, seed=1)
    trainers = {mesh: Trainer(Decoder(CONFIG, rngs=nnx.Rngs(0), attention="xla"), adamw(1e-3), 8, SEQ,  # built eagerly
                              Accelerator(8), mesh, micro_batches=micro_batches, remat=remat)
                for mesh, micro_batches, remat in (("stage=4,data=2", 4, "full"), ("data=8", 1, "none"))}
    state_bytes = {}
    for mesh, trainer in trainers.items():
        (executable,) = trainer._compiled.values()  # the step the planner compiled to verify, which the trainer runs
        batch_bytes = 4 * 4 * 8 * SEQ // trainer.plan.mesh.batch_shards  # four int32 [batch, length] inputs
        state_bytes[mesh] = executable.memory_analysis().argument_size_in_bytes - batch_bytes
    assert abs(state_bytes["stage=4,data=2"] * 4 / state_bytes["data=8"] - 1) < 0.02, state_bytes  # final norm whole
    straight = {}
    for mesh, trainer in trainers.items():
        losses = [float(trainer.step(b)["loss"]) for b in batches[:2]]
        with Checkpoints(tmp_path / mesh) as checkpoints:
            checkpoints.save(trainer, 2)
        straight[mesh] = losses + [float(trainer.step(b)["loss"]) for b in batches[2:]]
    np.testing.assert_allclose(straight["stage=4,data=2"], straight["data=8"], rtol=1e-5)
    for saved, resumed in (("stage=4,data=2", "data=8"), ("data=8", "stage=4,data=2")):
        with Checkpoints(tmp_path / saved) as checkpoints:
            checkpoints.restore(trainers[resumed], 2)
        losses = [float(trainers[resumed].step(b)["loss"]) for b in batches[2:]]
        np.testing.assert_allclose(losses, straight[saved][2:], rtol=1e-5)


def test_planner_pipelines_where_links_between_hosts_are_slow():
    """MoAI's Llama3-70B on 64 MI250s: with 25 GB/s between hosts gathering weights over fsdp=32 hides
    under compute and no pipeline wins; at 1.25 GB/s it does not, and 8 stages (fsdp inside a host) win."""
    mi250 = hardware_profile("mi250")
    fast = plan(ModelConfig.preset("llama3-70b"), 512, 1024, SimpleNamespace(flavor=64, hardware=mi250), verify=False)
    assert fast.mesh.stage == 1 and "no pipeline: the best with stages" in fast.why
    slow_links = dataclasses.replace(mi250, inter_host_bandwidth=1.25e9)
    slow = plan(ModelConfig.preset("llama3-70b"), 512, 1024, SimpleNamespace(flavor=64, hardware=slow_links),
                verify=False)
    assert slow.mesh.stage == 8 and slow.mesh.size // slow.mesh.stage <= mi250.devices_per_host
    assert "pipeline of 8 stages" in slow.why and "fsdp weight gathers" in slow.why


def test_planner_stages_only_where_layers_divide():
    acc = Accelerator(8, "cpu")
    with pytest.raises(FlavorError, match="does not divide the model's 4 layers"):
        plan(CONFIG, 16, SEQ, acc, verify=False, stage=8)
    chosen = plan(CONFIG, 16, SEQ, acc, verify=False, stage=4)
    assert chosen.mesh.stage == 4 and chosen.micro_batches >= 4 and "num_stages 4" in chosen.summary()
    assert "No PP" in plan(CONFIG, 16, SEQ, acc, verify=False, stage=1).summary()
    with pytest.raises(FlavorError, match="stage=3 does not divide the model's 4 layers"):
        Trainer(lambda: Decoder(CONFIG, rngs=nnx.Rngs(0)), adamw(1e-3), 12, SEQ, Accelerator(6), "stage=3,data=2")
