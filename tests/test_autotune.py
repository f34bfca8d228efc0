"""Autotuning: the planner's best candidates timed on the (simulated) devices, the fastest run, the
measurements cached so the next run does not measure again."""

import jax
from flax import nnx

import moai_jax as moai
from moai_jax import autotune
from moai_jax.models import Decoder, ModelConfig
from moai_jax.optimizer import adamw

TINY = ModelConfig.preset("tiny")


def tiny_trainer(accelerator):
    return moai.Trainer(lambda: Decoder(TINY, rngs=nnx.Rngs(0)), adamw(1e-3), 16, 32, accelerator, autotune=2)


def test_autotune_runs_the_fastest_measured_candidate_and_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOAI_JAX_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
    accelerator = moai.Accelerator(8)
    calls = []
    timed = autotune.time_steps
    monkeypatch.setattr(autotune, "time_steps", lambda run, steps=1: calls.append(1) or timed(run, steps))

    built = Decoder(TINY, rngs=nnx.Rngs(0))  # a built model: every candidate is timed on copies of its arrays
    first = moai.Trainer(built, adamw(1e-3), 16, 32, accelerator, autotune=2)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(nnx.state(built)))
    candidates = autotune.candidate_plans(TINY, 16, 32, accelerator, 2, compute_dtype="float32")
    cache = autotune._read(tmp_path / "autotune.json")
    measured = cache[autotune.shape_key(TINY, first.plan)]
    assert len(calls) == 2 and sorted(measured) == sorted(autotune.layout_key(p) for p in candidates)
    assert first.plan.measured_step_seconds == round(min(measured.values()), 6)
    assert autotune.layout_key(first.plan) == min(measured, key=measured.get)
    assert "fastest, chosen" in first.autotune_report and first.plan.verified_bytes_per_device

    second = tiny_trainer(accelerator)  # same shape: chosen from the cache, nothing timed again
    assert len(calls) == 2 and "2 from the cache" in second.autotune_report
    assert autotune.layout_key(second.plan) == autotune.layout_key(first.plan)
    batch = autotune.synthetic_batch(16, 32, TINY.vocab_size)
    assert jax.numpy.isfinite(second.step(batch)["loss"])
