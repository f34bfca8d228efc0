"""The time model against published training runs (pure arithmetic: nothing is compiled)."""

import pytest

from moai_jax.planner.published import RUNS, TOLERANCE


@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_time_model_stays_within_25_percent_of_published_runs(run):
    assert abs(run.error()) <= TOLERANCE, (
        f"{run.name}: estimated {run.estimate():,.2f}, published {run.published:,.2f} ({run.error():+.1%})")
