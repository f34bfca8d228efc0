"""Context parallelism against one device: the same losses and gradients over 10 steps on every mesh, with
and without packing; the balanced layout; memory falling with the context degree; LoRA, pipeline stages and
checkpoints under it."""

import dataclasses
import functools
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_trainer import make_batches

from moai_jax.accelerator import Accelerator, hardware_profile
from moai_jax.checkpoint import Checkpoints
from moai_jax.errors import FlavorError
from moai_jax.models import Decoder, ModelConfig
from moai_jax.models import attention as attention_lib
from moai_jax.models import context
from moai_jax.models.lora import LoraConfig
from moai_jax.optimizer import adamw
from moai_jax.planner import plan
from moai_jax.sharding.mesh import MeshShape
from moai_jax.step import compile_step
from moai_jax.trainer import Trainer

# one xdist worker runs these tests (--dist loadgroup): they share the one-device reference
pytestmark = pytest.mark.xdist_group("context")

CONFIG = ModelConfig.preset("tiny")  # 2 layers, width 64, 4 heads over 2 key/value heads (tensor=2 divides them)
# Attention blocks of 16 tokens rather than the models' 128: 128 tokens then hold the blocks 1,024 would (8 on one
# device; under context=8, 2 × 8 chunks of one block; under context=2, two blocks a chunk), at a fraction of the cost.
BATCH, SEQ, STEPS, BLOCK = 2, 128, 10, 16
MESHES = ("context=8", "context=4,fsdp=2", "context=2,data=2,tensor=2", "stage=2,context=4")


@pytest.fixture(scope="module", autouse=True)
def attention_blocks():
    """Every model of these tests attends by blocks of BLOCK tokens (one device and every mesh alike)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention_lib, "attention", functools.partial(attention_lib.attention, block_size=BLOCK))
        yield


def keeping_gradients(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx`, with the step's gradients kept in its state (so a test can read them)."""
    def init(params):
        return jax.tree.map(jnp.zeros_like, params), tx.init(params)

    def update(grads, state, params=None):
        updates, inner = tx.update(grads, state[1], params)
        return updates, (grads, inner)

    return optax.GradientTransformation(init, update)


def batches():
    """Packed rows (two documents each) for the first half, then plain rows (one document each, every
    token but the last labelled): the same keys, so one compiled step runs both."""
    packed = make_batches(STEPS, BATCH, SEQ)
    plain = [{"input_ids": b["input_ids"],
              "labels": np.concatenate([b["input_ids"][:, 1:], np.full((BATCH, 1), -100)], 1),
              "segment_ids": np.ones((BATCH, SEQ), np.int32), "positions": np.tile(np.arange(SEQ), (BATCH, 1))}
             for b in packed[STEPS // 2:]]
    return packed[: STEPS // 2] + plain


OPTIMIZER = keeping_gradients(adamw(1e-3))


@functools.cache
def run(mesh: str, lora: LoraConfig | None = None, steps: int = STEPS):
    """The trainer after `steps` steps, with each step's loss and gradients."""
    shape = MeshShape.parse(mesh)
    trainer = Trainer(lambda: Decoder(CONFIG, rngs=nnx.Rngs(0), attention="blockwise"), OPTIMIZER,
                      BATCH, SEQ, Accelerator(shape.size), shape, micro_batches=2 if shape.stage > 1 else 1,
                      remat="none", lora=lora)
    losses, grads = [], []
    for batch in batches()[:steps]:
        losses.append(float(trainer.step(batch)["loss"]))
        grads.append(jax.device_get(trainer.state.opt_state[0]))
    return trainer, np.array(losses), grads


@pytest.mark.parametrize("mesh", MESHES)
def test_context_parallel_matches_one_device(mesh):
    _, losses, grads = run(mesh)
    _, ref_losses, ref_grads = run("data=1")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for step, (g, ref) in enumerate(zip(grads, ref_grads)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"step {step}"), g, ref)


def test_balanced_layout_gives_every_device_the_same_work():
    """Device d holds chunks d and 2cp - 1 - d; every device computes as many block pairs, and together
    they compute exactly the causal pairs of one device."""
    np.testing.assert_array_equal(context.balanced_order(16, 4).reshape(4, 4) // 2,
                                  [[0, 0, 7, 7], [1, 1, 6, 6], [2, 2, 5, 5], [3, 3, 4, 4]])
    table = context.local_pairs(64, 4, 4)  # [devices, 4, pairs]
    blocks = 64 // 4
    pairs = {(int(q), int(k)) for d in range(4) for q, k in zip(table[d, 1], table[d, 3])}
    assert pairs == {(q, k) for q in range(blocks) for k in range(q + 1)}
    assert table.shape[2] * 4 == len(pairs)
    batch = context.balanced_batch({"input_ids": np.arange(32).reshape(2, 16)}, 4)
    np.testing.assert_array_equal(batch["positions"][0], context.balanced_order(16, 4))


def test_peak_memory_falls_with_the_context_degree():
    """The same 2 × 128 batch on 1, 2 and 8 devices along context: XLA's peak bytes per device fall. The
    one-device and context=8 steps are the trainers' own (compiled above); context=2 is one more compile."""
    one, eight = run("data=1")[0], run("context=8")[0]
    two = dataclasses.replace(eight.plan, flavor=2, mesh=MeshShape(context=2))
    abstract = nnx.eval_shape(lambda: Decoder(CONFIG, rngs=nnx.Rngs(0), attention="blockwise"))
    peaks = [one.compiled_bytes_per_device(),
             compile_step(two, abstract, jax.devices(), OPTIMIZER)[2].bytes_per_device,
             eight.compiled_bytes_per_device()]
    assert all(a > b for a, b in zip(peaks, peaks[1:])), peaks


def test_lora_under_context_parallelism():
    """Adapters on the keys and values (whose inputs the context axis gathers) and on the MLP, 2 steps."""
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, targets=("k", "v", "down"))
    _, losses, grads = run("context=4,fsdp=2", lora, steps=2)
    _, ref_losses, ref_grads = run("data=1", lora, steps=2)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads[-1], ref_grads[-1])


def test_checkpoints_move_between_context_and_no_context(tmp_path):
    """Saved under context=8 and resumed on one device, and the reverse: the next step's loss is the
    saving run's. The saving run takes one step more first, so a restore that did nothing would show."""
    extra = make_batches(4, BATCH, SEQ, seed=1)
    trainers = {"context=8": run("context=8")[0], "data=1": run("data=1")[0]}
    for i, (saved, resumed) in enumerate((("context=8", "data=1"), ("data=1", "context=8"))):
        trainers[saved].step(extra[2 * i])
        with Checkpoints(tmp_path / saved) as checkpoints:
            checkpoints.save(trainers[saved], i)
        with Checkpoints(tmp_path / saved) as checkpoints:
            checkpoints.restore(trainers[resumed], i)
        losses = [float(trainers[name].step(extra[2 * i + 1])["loss"]) for name in (saved, resumed)]
        np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_planner_splits_long_sequences_only_when_it_must():
    """llama3-8b on 8 H100s, batch 8 (ranked only; scripts/plan.py verifies by compiling): at 1,024 tokens
    no context parallelism; at 131,072 a sequence fits on no single device, so the plan splits it and says so.
    A fixed context is honored, and a block size that 2 × context does not divide is one clear error."""
    h100 = types.SimpleNamespace(flavor=8, hardware=hardware_profile("h100"), devices=[])
    config = ModelConfig.preset("llama3-8b")
    assert plan(config, 8, 1024, h100, verify=False).mesh.context == 1
    long = plan(config, 8, 131072, h100, verify=False)
    assert long.mesh.context > 1 and "no plan that keeps a sequence on one device fits" in long.why
    fixed = plan(config, 8, 131072, h100, verify=False, context=8)
    assert fixed.mesh.context == 8 and "context=8 (fixed)" in fixed.why
    with pytest.raises(FlavorError, match="2 × 4 chunks, which the block size 1004 does not divide"):
        plan(config, 8, 1004, h100, verify=False, context=4)


def test_finetune_command_explains_a_bad_block_size_in_one_line():
    """scripts/finetune.py --dry-run --mesh context=4,fsdp=2 at a block size 2 × 4 does not divide: one error line,
    exit status 2, before any compile (scripts/plan.py plans through the same `plan`)."""
    script = [sys.executable, str(Path(__file__).resolve().parent.parent / "scripts/finetune.py"),
              "--model-name-or-path", "llama3-8b", "--flavor", "8", "--hardware", "h100", "--batch-size", "8",
              "--dry-run", "--block-size", "1004", "--mesh", "context=4,fsdp=2"]
    bad = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.splitlines() == [
        "error: context=4 splits each sequence into 2 × 4 chunks, which the block size 1004 does not divide; use a "
        "block size that is a multiple of 8"], bad.stderr
