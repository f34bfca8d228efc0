"""The time model against published training runs (pure arithmetic: nothing is compiled)."""

import dataclasses

import pytest

from moai_jax.accelerator import hardware_profile
from moai_jax.models import ModelConfig
from moai_jax.planner.published import RUNS, TOLERANCE
from moai_jax.planner.time_model import estimate_seconds
from moai_jax.sharding.mesh import MeshShape


@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_time_model_stays_within_25_percent_of_published_runs(run):
    assert abs(run.error()) <= TOLERANCE, (
        f"{run.name}: estimated {run.estimate():,.2f}, published {run.published:,.2f} ({run.error():+.1%})")


def test_schedules_of_published_runs():
    """Interleaving divides the bubble by the virtual stages; overlapped collectives hide under compute; a
    tensor split pays its collectives over the link it spans."""
    config, h100 = ModelConfig.preset("llama3.1-70b"), hardware_profile("h100")
    mesh = MeshShape(stage=4, data=4, tensor=4)

    def seconds(hardware=h100, **schedule):
        return estimate_seconds(config, 128, 8192, mesh, hardware, micro_batches=32, **schedule)

    gpipe, interleaved, overlapped = seconds(), seconds(virtual_stages=5), seconds(overlap_collectives=True)
    assert gpipe["bubble"] == pytest.approx(gpipe["compute"] * 3 / 32)
    assert interleaved["bubble"] == pytest.approx(interleaved["compute"] * 3 / (32 * 5))
    assert interleaved["stage"] > gpipe["stage"]  # five times the chunk boundaries to cross
    assert overlapped["total"] == pytest.approx(gpipe["total"] - gpipe["tensor"] - gpipe["stage"])
    slow_nvlink = seconds(dataclasses.replace(h100, intra_host_bandwidth=h100.intra_host_bandwidth / 2))
    assert slow_nvlink["tensor"] > gpipe["tensor"] and slow_nvlink["compute"] == gpipe["compute"]
