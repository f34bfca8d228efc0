"""Models a user brings (tests/user_models.py: no moai_jax import) trained on every mesh as on one device.

One reference run per model on one device; every other run compares its losses with it.
"""

import functools

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec
from flax import nnx
from user_models import TRANSFORMER_RULES, Classifier, MLPLM, TinyTransformer, classifier_loss

import moai_jax as moai
from moai_jax.sharding.infer import MIN_SHARDED_ELEMENTS
from moai_jax.sharding.mesh import MeshShape

# one xdist worker runs these tests (--dist loadgroup): they share the cached one-device reference runs
pytestmark = pytest.mark.xdist_group("user_models")

BATCH, SEQ, STEPS = 16, 32, 10


def token_batches(seed=0):
    """Learnable rows: counting sequences with a random start and stride."""
    rng = np.random.default_rng(seed)
    starts, strides = rng.integers(0, 256, (STEPS, BATCH, 1)), rng.integers(1, 4, (STEPS, BATCH, 1))
    return [{"input_ids": ((a + s * np.arange(SEQ)) % 256).astype(np.int32)} for a, s in zip(starts, strides)]


def feature_batches(seed=0):
    """Float features whose class is the argmax of a fixed projection; some examples weigh nothing."""
    rng = np.random.default_rng(seed)
    projection = rng.normal(size=(32, 10))
    out = []
    for _ in range(STEPS):
        x = rng.normal(size=(BATCH, 32)).astype(np.float32)
        out.append({"features": x, "label": np.argmax(x @ projection, axis=1).astype(np.int32),
                    "weight": (rng.random(BATCH) > 0.25).astype(np.float32)})
    return out


MODELS = {  # name → (builder, loss_fn, batches)
    "mlp": (lambda: MLPLM(nnx.Rngs(0)), None, token_batches),
    "transformer": (lambda: TinyTransformer(nnx.Rngs(0)), None, token_batches),
    "classifier": (lambda: Classifier(nnx.Rngs(0)), classifier_loss, feature_batches),
}


def trainer_for(name, mesh=None, accelerator=None, rules=None, built=False, **knobs):
    """A Trainer of model `name`: given the function that builds it (built under jit straight into its
    shards) or, `built`, the model itself (built once more eagerly, cheaper for tiny tests)."""
    build, loss_fn, batches = MODELS[name]
    example = batches()[0] if loss_fn else None
    accelerator = accelerator or moai.Accelerator(MeshShape.parse(mesh).size)
    return moai.Trainer(build() if built else build, optax.adamw(1e-2), BATCH, None if loss_fn else SEQ,
                        accelerator, mesh, loss_fn=loss_fn, rules=rules, example_batch=example, **knobs)


@functools.cache
def run(name, mesh, rules=False):
    trainer = trainer_for(name, mesh, rules=TRANSFORMER_RULES if rules else None, built=True, micro_batches=1,
                          remat="none")
    return np.array([float(trainer.step(b)["loss"]) for b in MODELS[name][2]()]), trainer


@pytest.mark.parametrize("name", list(MODELS))
# fsdp=8 splits every large parameter; data=2,fsdp=4 adds the data axis (data=8 alone adds no other code path)
@pytest.mark.parametrize("mesh", ["fsdp=8", "data=2,fsdp=4"])
def test_every_mesh_matches_one_device(name, mesh):
    reference, _ = run(name, "data=1")
    losses, trainer = run(name, mesh)
    assert reference[-1] < reference[0] * 0.95  # it learns
    np.testing.assert_allclose(losses, reference, rtol=1e-5)
    if mesh == "fsdp=8":  # every large parameter, and its Adam moments, 1/8 per device
        adam = trainer.state.opt_state[0]
        for tree in (trainer.state.params, adam.mu, adam.nu):
            for path, x in jax.tree_util.tree_leaves_with_path(tree):
                if x.size >= MIN_SHARDED_ELEMENTS:
                    assert all(s.data.size * 8 == x.size for s in x.addressable_shards), jax.tree_util.keystr(path)
        assert "inferred" in str(trainer.plan)


@pytest.mark.parametrize("mesh", ["fsdp=4,tensor=2", "data=2,tensor=4"])
def test_partition_rules_give_tensor_parallelism(mesh):
    reference, _ = run("transformer", "data=1")
    losses, trainer = run("transformer", mesh, rules=True)
    np.testing.assert_allclose(losses, reference, rtol=1e-5)
    origins = trainer.plan.parameter_shardings
    assert origins["blocks/0/up/kernel"].startswith("rule") and "'tensor'" in origins["blocks/0/up/kernel"]
    assert origins["blocks/0/norm1/scale"].startswith("inferred")
    query = trainer.param_shardings["blocks"][0]["attn"]["query"]["kernel"]
    assert query.spec[1] == "tensor"  # [embed, heads, head_dim]: heads split


def test_model_too_big_for_one_device_gets_a_plan_that_fits():
    reference, one_device = run("mlp", "data=1")
    needed = one_device.plan.verified_bytes_per_device
    trainer = trainer_for("mlp", accelerator=moai.Accelerator(8, device_memory=int(needed / 2 / 0.8)))
    plan = trainer.plan
    assert plan.verified_bytes_per_device <= plan.budget_bytes_per_device < needed
    assert "compiled" in plan.why and plan.planning_seconds["compile"] > 0
    losses = [float(trainer.step(b)["loss"]) for b in token_batches()]
    np.testing.assert_allclose(losses, reference, rtol=1e-5)


class PooledLM(nnx.Module):
    """Returns one score vector per row, not per position."""

    def __init__(self, rngs):
        self.embed, self.head = nnx.Embed(256, 64, rngs=rngs), nnx.Linear(64, 256, rngs=rngs)

    def __call__(self, input_ids):
        return self.head(self.embed(input_ids).mean(axis=1))


def test_bad_inputs_say_what_to_change():
    accelerator = moai.Accelerator(8)

    def trainer(model, seq_len=SEQ, **kw):
        return moai.Trainer(model, optax.adamw(1e-3), BATCH, seq_len, accelerator, "fsdp=8", micro_batches=1,
                            remat="none", **kw)

    with pytest.raises(moai.ModelError, match=r"returned shape \(16, 256\).*logits \[batch, length, vocab\]"):
        trainer(lambda: PooledLM(nnx.Rngs(0)))
    mlp = MODELS["mlp"][0]
    with pytest.raises(moai.ModelError, match="unknown logical axis 'hidden'"):
        trainer(mlp, rules=[(r"up/kernel", ("embed", "hidden"))])
    with pytest.raises(moai.ModelError, match="unknown mesh axis 'model'"):
        trainer(mlp, rules=[(r"up/kernel", PartitionSpec(None, "model"))])
    with pytest.raises(moai.ModelError, match="'attention/kernel' matches no parameter; paths look like: "):
        trainer(mlp, rules=[(r"attention/kernel", ("embed", "mlp"))])

    _, classifier = run("classifier", "fsdp=8")
    batch = feature_batches()[0]
    del batch["weight"]
    with pytest.raises(moai.DataError, match="lacks 'weight'"):
        classifier.step(batch)
    with pytest.raises(moai.DataError, match=r"loss_fn reads batch\['weight'\]"):  # found while planning
        trainer(MODELS["classifier"][0], None, loss_fn=classifier_loss, example_batch=batch)
