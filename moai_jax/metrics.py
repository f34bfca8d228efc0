"""What a run reports: the step line, step timing, the metrics file, and the closing summary.

The step line is MoAI's, exactly: `[Step 4/17944] | Loss: 2.03125 | Duration: 1.27 | Throughput: 12882.87 tokens/sec`.
Metrics are read back one step late, so the host never stalls the device: step i is timed from
the moment step i-1's results arrived to the moment its own did.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np

from moai_jax.errors import SettingError


def step_line(step: int, total: int, loss: float, duration: float, tokens_per_sec: float) -> str:
    """MoAI's log line; the loss at its full float32 precision (shortest exact form)."""
    return (f"[Step {step}/{total}] | Loss: {str(np.float32(loss))} | Duration: {duration:.2f} | "
            f"Throughput: {tokens_per_sec:.2f} tokens/sec")


class StepTimer:
    """Times steps whose results are device arrays, reading each back only after the next is dispatched."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self._pending: tuple[int, Any] | None = None
        self._last = time.perf_counter()

    def push(self, step: int, metrics: Any) -> dict[str, float] | None:
        """Hand over step `step`'s (unfinished) metrics; returns the previous step's, finished and timed."""
        done, self._pending = self.finish(), (step, metrics)
        return done

    def finish(self) -> dict[str, float] | None:
        """Wait for the pending step and return its metrics with `step`, `duration` and `tokens_per_sec`."""
        if self._pending is None:
            return None
        step, metrics = self._pending
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        duration, self._last, self._pending = now - self._last, now, None
        return {"step": step, **values, "duration": duration, "tokens_per_sec": self.tokens_per_step / duration}


class MetricsFile:
    """One JSON object per logged step (and TensorBoard scalars when tensorboardX is installed).
    Opened at once, so a path that cannot be written fails before any work."""

    def __init__(self, path: str | Path | None, tensorboard_dir: str | Path | None = None):
        self._file: TextIO | None = None
        if path:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self._file = open(path, "a", buffering=1)
            except OSError as e:
                raise SettingError(f"cannot write the metrics file {path} ({e.strerror or type(e).__name__}); pass a "
                                   "--metrics-file this user can write to") from None
        self._board = None
        if tensorboard_dir:
            from tensorboardX import SummaryWriter
            self._board = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        if self._file:
            self._file.write(json.dumps(record) + "\n")
        if self._board:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._board.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._board:
            self._board.close()

    def __enter__(self) -> MetricsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def summary(steps: int, tokens: int, tokens_per_sec: list[float], final_loss: float | None, model_dir: str | None) -> str:
    """The closing lines of a run: steps, tokens, mean throughput after the first step, loss, model."""
    steady = tokens_per_sec[1:] or tokens_per_sec
    mean = sum(steady) / len(steady) if steady else 0.0
    loss = "n/a" if final_loss is None else str(np.float32(final_loss))
    where = model_dir or "not saved (pass --save-model-dir DIR to save it)"
    return (f"Done: {steps} steps, {tokens} tokens, mean throughput {mean:.2f} tokens/sec (after the first step), "
            f"final loss {loss}\nModel: {where}")
