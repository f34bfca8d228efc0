"""`@acc.jit`: three single-device programs, unchanged but for the decorator, on 8 simulated devices.

Each program below is written as its tutorial writes it, without moai_jax; a test runs it once under
`nnx.jit` / `jax.jit` on one device and once under `acc.jit` on eight, and compares the losses.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import moai_jax as moai

STEPS = 10


def batches(rows=16, features=32, classes=8, steps=STEPS):
    rng = np.random.default_rng(0)
    return [{"x": rng.normal(size=(rows, features)).astype(np.float32),
             "y": rng.integers(0, classes, rows).astype(np.int32)} for _ in range(steps)]


# -- program 1: the Flax NNX tutorial's loop ------------------------------------------------------
class MLP(nnx.Module):
    def __init__(self, features, hidden, classes, *, rngs):
        self.linear1 = nnx.Linear(features, hidden, rngs=rngs)
        self.linear2 = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x):
        return self.linear2(jax.nn.relu(self.linear1(x)))


def nnx_loss(model, batch):
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), logits


def tutorial_step(model, optimizer, metrics, batch):
    (loss, logits), grads = nnx.value_and_grad(nnx_loss, has_aux=True)(model, batch)
    metrics.update(loss=loss, logits=logits, labels=batch["y"])
    optimizer.update(model, grads)
    return loss


def nnx_train_step(model, optimizer, batch):
    (loss, _), grads = nnx.value_and_grad(nnx_loss, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    return loss


def tutorial_metrics():
    return nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))


def nnx_program(jit, hidden=256, seed=0, rows=slice(None)):
    """`rows`: the rows of every global batch this process passes (all of them when it is alone)."""
    model = MLP(32, hidden, 8, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)), wrt=nnx.Param)
    metrics = tutorial_metrics()
    train_step = jit(tutorial_step)
    losses = [float(train_step(model, optimizer, metrics, {k: v[rows] for k, v in batch.items()}))
              for batch in batches()]
    return losses, model, optimizer, train_step, metrics.compute()


# -- program 2: a functional TrainState step with an EMA of the parameters ------------------------
class EmaState(train_state.TrainState):
    ema_params: Any


def apply(params, x):
    return jax.nn.relu(x @ params["dense1"]["kernel"] + params["dense1"]["bias"]) @ params["dense2"]["kernel"]


def ema_train_step(state, batch):
    def loss_fn(params):
        logits = state.apply_fn(params, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state = state.apply_gradients(grads=grads)
    ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state.ema_params, state.params)
    return state.replace(ema_params=ema), loss


def ema_state():
    k1, k2 = jax.random.split(jax.random.key(1))
    params = {"dense1": {"kernel": jax.random.normal(k1, (32, 256)) * 0.1, "bias": jnp.zeros(256)},
              "dense2": {"kernel": jax.random.normal(k2, (256, 8)) * 0.1}}
    return EmaState.create(apply_fn=apply, params=params, tx=optax.adam(1e-2), ema_params=params)


def ema_program(jit, step=ema_train_step):
    train_step, state, losses = jit(step), ema_state(), []
    for batch in batches():
        state, loss = train_step(state, batch)
        losses.append(float(loss))
    return losses, state, train_step


# -- program 3: distillation, a frozen teacher and a trained student --------------------------------
def distill_step(student, teacher, optimizer, batch):
    targets = jax.nn.softmax(jax.lax.stop_gradient(teacher(batch["x"])) / 2.0)

    def loss_fn(student):
        logits = student(batch["x"]) / 2.0
        return optax.softmax_cross_entropy(logits, targets).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(student)
    optimizer.update(student, grads)
    return loss


def distill_program(jit):
    teacher, student = MLP(32, 512, 8, rngs=nnx.Rngs(7)), MLP(32, 128, 8, rngs=nnx.Rngs(8))
    optimizer = nnx.Optimizer(student, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    train_step = jit(distill_step)
    return [float(train_step(student, teacher, optimizer, batch)) for batch in batches()], teacher, train_step


@pytest.fixture(scope="session")
def acc():
    return moai.Accelerator(8)


@pytest.fixture(scope="session")
def tutorial(acc):
    return nnx_program(nnx.jit), nnx_program(lambda f: acc.jit(f, fsdp=8))


def shard_fraction(array) -> float:
    return array.addressable_shards[0].data.size / array.size


def test_nnx_tutorial_loop_matches_one_device_with_fsdp_shards(tutorial, capsys):
    (one, *_, one_metrics), (eight, model, optimizer, train_step, metrics) = tutorial
    np.testing.assert_allclose(eight, one, atol=1e-5)
    for name in ("accuracy", "loss"):  # the metrics the step updated in place
        assert float(metrics[name]) == pytest.approx(float(one_metrics[name]), abs=1e-5)
    assert train_step.plan.mesh.fsdp == 8
    kernel = model.linear1.kernel.get_value()
    adam = optimizer.opt_state[1][0]
    for array in (kernel, adam.mu["linear1"]["kernel"].get_value(), adam.nu["linear1"]["kernel"].get_value()):
        assert len(array.sharding.device_set) == 8 and shard_fraction(array) == 1 / 8
    assert shard_fraction(model.linear2.bias.get_value()) == 1  # small: kept whole
    assert "micro-batching and remat" in train_step.plan.why and "loss_fn" in train_step.plan.why


def test_plan_is_printed_once(acc, capsys):
    *_, train_step, _ = nnx_program(lambda f: acc.jit(f, fsdp=8))  # the tutorial's step again: a cached compile
    assert capsys.readouterr().out.count(train_step.plan.summary()) == 1


def test_train_state_with_ema_matches_one_device(acc):
    one, _, _ = ema_program(jax.jit)
    eight, state, _ = ema_program(lambda f: acc.jit(f, fsdp=8))
    np.testing.assert_allclose(eight, one, atol=1e-5)
    # the EMA weights and Adam's moments are split as their parameters are
    for tree in (state.params, state.ema_params, state.opt_state[0].mu, state.opt_state[0].nu):
        assert shard_fraction(tree["dense1"]["kernel"]) == 1 / 8


def test_distillation_matches_one_device(acc):
    one, _, _ = distill_program(nnx.jit)
    eight, teacher, train_step = distill_program(lambda f: acc.jit(f, data=2, fsdp=4))
    np.testing.assert_allclose(eight, one, atol=1e-5)
    assert train_step.plan.mesh.sizes()["data"] == 2
    assert shard_fraction(teacher.linear1.kernel.get_value()) == 1 / 4  # the teacher is sharded too


def test_state_over_one_device_budget_gets_a_plan_that_fits():
    small = moai.Accelerator(8, device_memory=1_000_000)  # a budget of 800 kB per device
    one, model, optimizer, *_ = nnx_program(nnx.jit, hidden=2048)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state((model, optimizer))))
    eight, _, _, train_step, _ = nnx_program(small.jit, hidden=2048)
    plan = train_step.plan
    assert state_bytes > plan.budget_bytes_per_device  # parameters and Adam state alone: 1 MB
    assert plan.verified_bytes_per_device <= plan.budget_bytes_per_device
    assert plan.mesh.fsdp > 1
    np.testing.assert_allclose(eight, one, atol=1e-5)


def test_state_restores_onto_another_flavor(tutorial, tmp_path):
    from moai_jax.checkpoint import Checkpoints  # Orbax: imported where used (jit_processes.py imports this file)

    _, (_, model, optimizer, train_step, _) = tutorial
    with Checkpoints(tmp_path) as checkpoints:
        checkpoints.save_state(STEPS, {"model": model, "optimizer": optimizer}, plan=train_step.plan)
    four = moai.Accelerator(4).jit(tutorial_step, fsdp=4)
    restored = MLP(32, 256, 8, rngs=nnx.Rngs(1))
    restored_optimizer = nnx.Optimizer(restored, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)),
                                       wrt=nnx.Param)
    batch = batches()[0]
    four.place(restored, restored_optimizer, tutorial_metrics(), batch)
    with Checkpoints(tmp_path) as checkpoints:
        _, meta = checkpoints.restore_state({"model": restored, "optimizer": restored_optimizer})
    assert meta["plan"]["mesh"]["fsdp"] == 8
    assert shard_fraction(restored.linear1.kernel.get_value()) == 1 / 4
    # the next step on 4 devices is the next step on 8
    assert float(four(restored, restored_optimizer, tutorial_metrics(), batch)) == pytest.approx(
        float(train_step(model, optimizer, tutorial_metrics(), batch)), abs=1e-5)


def test_batch_the_data_axes_do_not_divide(acc):
    train_step = acc.jit(nnx_train_step)
    model = MLP(32, 64, 8, rngs=nnx.Rngs(0))
    with pytest.raises(moai.FlavorError, match=r"argument 'batch'.* 12 rows.*8 or 16"):
        train_step(model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param), batches(rows=12)[0])


def test_step_returning_state_of_another_structure(acc):
    def forgets_ema(state, batch):
        state, loss = ema_train_step(state, batch)
        return state.replace(ema_params={"dense1": state.ema_params["dense1"]}), loss

    message = r"argument 'state' with another structure.*gone: state/ema_params/dense2"
    with pytest.raises(moai.ModelError, match=message):
        acc.jit(forgets_ema)(ema_state(), batches()[0])


def test_non_array_leaf(acc):
    model = MLP(32, 64, 8, rngs=nnx.Rngs(0))
    batch = dict(batches()[0], name="mnist")
    with pytest.raises(moai.ModelError, match=r"argument 'batch' holds a str at batch/name"):
        acc.jit(nnx_train_step)(model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param), batch)


def test_each_process_passes_its_rows(monkeypatch):
    """In a job of two processes, 4 rows from each make a global batch of 8 (as with the Trainer)."""
    from moai_jax.jit_arguments import argument

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    batch = argument("batch", batches(rows=4)[0], None)
    assert batch.kind == "batch"
    assert [s.shape for s in batch.abstract()] == [(8, 32), (8,)]


def test_two_processes_each_passing_its_rows_match_one_device(tutorial):
    """One short job of 2 processes × 4 devices (the launcher, gloo on this CPU): the same losses."""
    (one, *_), _ = tutorial
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MOAI_INIT_TIMEOUT": "60"}
    run = subprocess.run([sys.executable, "-m", "moai_jax.launch", "--processes", "2", "--",
                          str(Path(__file__).parent / "jit_processes.py")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    np.testing.assert_allclose(json.loads(run.stdout.strip().splitlines()[-1]), one, atol=1e-5)
