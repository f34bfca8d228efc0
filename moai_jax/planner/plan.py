"""The Plan: how one training step is laid out over the flavor's devices, and why.

Frozen and JSON-serializable: it is what the user sees, what is logged, what a checkpoint records.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from moai_jax.sharding.infer import describe
from moai_jax.sharding.mesh import MeshShape
from moai_jax.sizes import format_bytes

LOSS_MODES = ("whole", "chunked")


@dataclasses.dataclass(frozen=True)
class Plan:
    flavor: int
    hardware: str
    mesh: MeshShape
    batch_size: int
    seq_len: int
    micro_batches: int = 1
    remat: str = "none"
    loss: str = "whole"  # "chunked": logits are computed over the sequence in chunks, never whole
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    offload_optimizer: bool = False  # AdamW's moments live in host memory, brought to the devices for the update
    estimated_bytes_per_device: dict[str, int] | None = None  # term → bytes, with "total"
    verified_bytes_per_device: int | None = None
    verified_on: str | None = None  # the backend that compiled the verifying step
    budget_bytes_per_device: int | None = None
    estimated_step_seconds: dict[str, float] | None = None  # compute, communication, total
    estimated_tokens_per_sec: float | None = None
    estimated_mfu: float | None = None
    why: str = "mesh given by the user"
    alternatives: tuple[dict[str, Any], ...] = ()  # the next-ranked candidates, each with why it lost
    planning_seconds: dict[str, float] | None = None  # rank, verify, total
    candidates_considered: int | None = None
    candidates_fitting: int | None = None  # whose estimated memory fits the budget
    parameter_shardings: dict[str, str] | None = None  # a user's model: parameter path → where its sharding came from
    measured_step_seconds: float | None = None  # autotuning: this plan's step, timed on the real devices
    lora: dict | None = None  # LoRA's settings (models.lora.LoraConfig.to_dict()) when only adapters train
    # the verifying compile's collectives (planner/compiled_collectives.py): the step's seconds with them in
    # place of the time model's guessed communication, and the bytes one device sends per step by term and kind
    compiled_step_seconds: dict[str, float] | None = None
    compiled_collective_bytes: dict[str, int] | None = None

    @property
    def batch_per_device(self) -> float:
        """Sequences each device computes per micro-batch (a fraction under tensor parallelism)."""
        return self.batch_size / self.micro_batches / self.mesh.batch_shards

    def summary(self) -> str:
        """The chosen configuration in one line, as MoAI prints its selected config."""
        tp = f"TP {self.mesh.tensor}" if self.mesh.tensor > 1 else "No TP"
        tp += "".join(f" | {name} {n}" for name, n in (("EP", self.mesh.expert), ("CP", self.mesh.context)) if n > 1)
        extra = "" if self.lora is None else f" | LoRA r {self.lora['r']} on {','.join(self.lora['targets'])}"
        extra += " | optimizer state in host memory" if self.offload_optimizer else ""
        pp = (f"num_stages {self.mesh.stage}, num_micro_batches {self.micro_batches}" if self.mesh.stage > 1
              else "No PP")
        return (f"flavor {self.flavor} ({self.hardware}) | mesh {self.mesh} | micro-batches {self.micro_batches} | "
                f"batch per device {self.batch_per_device:g} | {pp} | {tp} | remat {self.remat} | loss {self.loss} | "
                f"compute {self.compute_dtype}{extra}")

    def compiled_line(self) -> str | None:
        """"as compiled: 0.412 s a step (fsdp all-gathers 12.3 GiB, ...); the model guessed 0.398 s" (None
        before a compile read the step's collectives)."""
        if self.compiled_step_seconds is None:
            return None
        sent = ", ".join(f"{k}s {format_bytes(v)}" for k, v in (self.compiled_collective_bytes or {}).items() if v)
        guessed = (self.estimated_step_seconds or {}).get("total", 0.0)
        return (f"as compiled: {self.compiled_step_seconds['total']:.3f} s a step ({sent or 'no collectives'} per "
                f"device); the model guessed {guessed:.3f} s")

    def __str__(self) -> str:
        text = f"{self.summary()}\nwhy: {self.why}"
        if self.compiled_step_seconds is not None:
            text += "\n" + self.compiled_line()
        if self.parameter_shardings:
            text += "\n" + describe(self.parameter_shardings)
        return text

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["batch_per_device"] = self.batch_per_device
        d["alternatives"] = list(self.alternatives)
        return d

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in fields}
        values["mesh"] = MeshShape(**values["mesh"])
        values["alternatives"] = tuple(values.get("alternatives", ()))
        return cls(**values)
