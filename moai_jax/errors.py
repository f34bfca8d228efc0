"""The errors a user can cause. Each message says what to change; scripts print it as one line and exit 2."""

import math
import sys


class MoaiError(Exception):
    """Base of every user-facing moai_jax error."""


class ModelConfigError(MoaiError):
    """A model directory, config.json, preset or dtype that moai_jax cannot use."""


class ModelError(MoaiError):
    """A user's model, loss function or partition rules that moai_jax cannot train."""


class WeightsError(MoaiError):
    """A safetensors file with a missing, extra or misshaped tensor."""


class FlavorError(MoaiError):
    """A flavor, mesh or batch that does not fit the devices or the model."""


class DataError(MoaiError):
    """A data set or tokenizer that cannot feed the model."""


class CheckpointError(MoaiError):
    """A checkpoint folder that cannot be read from or written to."""


class NoPlanFits(MoaiError):
    """No parallelization plan fits the device memory."""


class SettingError(MoaiError):
    """A setting that cannot be meant or used: a negative learning rate, a metrics file that cannot be written."""


def check_range(name: str, value: float | None, low: float, high: float | None = None, *, above: bool = False) -> None:
    """A SettingError unless `value` is None or a finite number from `low` (exclusive when `above`) to `high`."""
    if value is None:
        return
    if math.isfinite(value) and (value > low if above else value >= low) and (high is None or value <= high):
        return
    if high is not None:
        span = f"in {'(' if above else '['}{low:g}, {high:g}]"
    else:
        span = f"above {low:g}" if above else f"at least {low:g}"
    raise SettingError(f"{name} must be {span}, not {value}")


class GenerationError(MoaiError):
    """Prompts or generation settings that the model cannot generate from."""


class LoraError(MoaiError):
    """LoRA options that cannot adapt the model (rank, alpha, dropout, targets)."""


def report_error(error: MoaiError) -> int:
    """Print a user's mistake as the one line `error: ...` on stderr; returns the scripts' exit status, 2."""
    print(f"error: {error}", file=sys.stderr)
    return 2
