"""Published training runs the time model is held against, each reproduced as an estimate of the same
model, hardware, devices, batch, sequence length and parallelism.

    python -m moai_jax.planner.published      # the table: published, estimated, error

A run's figure is tokens/s per device; MoAI's seed runs are compared by their shape (the ratio of one
run's throughput to another's), since the device MoAI counts is not stated.
"""

from __future__ import annotations

import dataclasses

from moai_jax.accelerator import hardware_profile
from moai_jax.models import ModelConfig
from moai_jax.planner.time_model import estimate_seconds
from moai_jax.sharding.mesh import MeshShape

TOLERANCE = 0.25  # an estimate this far from its published figure fails tests/test_published.py

TORCHTITAN = "torchtitan benchmarks/llama3_h100_202412_torchtitan.md, Table 1 and 3 (torch.compile, bfloat16)"
NEMO = "NVIDIA dgxc-benchmarking llama3.1 README (NeMo 24.12, bfloat16): seconds per step"
MOAI = "MoAI seed page (docs.moreh.io): Llama3-8B full fine-tuning, block 1024"


@dataclasses.dataclass(frozen=True)
class Run:
    """One published step, laid out as moai_jax would lay it out."""

    model: str
    hardware: str
    mesh: dict[str, int]
    batch_size: int
    seq_len: int
    micro_batches: int
    remat: str
    virtual_stages: int = 1  # an interleaved pipeline schedule (Megatron's virtual pipeline stages)
    overlap_collectives: bool = False  # tensor-parallel and stage transfers overlapped with the matmuls
    # gradients reduced in float32: torchtitan's mixed_precision_reduce and NeMo's grad_reduce_in_fp32 default
    # to it (MoAI does not say; taken as the same), where moai_jax's XLA step sends the compute dtype's
    gradient_bytes: int = 4

    @property
    def devices(self) -> int:
        return MeshShape(**self.mesh).size

    def tokens_per_sec(self) -> float:
        """The time model's estimate for the whole step, all devices together."""
        seconds = estimate_seconds(ModelConfig.preset(self.model), self.batch_size, self.seq_len,
                                   MeshShape(**self.mesh), hardware_profile(self.hardware),
                                   micro_batches=self.micro_batches, remat=self.remat,
                                   virtual_stages=self.virtual_stages,
                                   overlap_collectives=self.overlap_collectives,
                                   gradient_bytes=self.gradient_bytes)["total"]
        return self.batch_size * self.seq_len / seconds


@dataclasses.dataclass(frozen=True)
class Published:
    name: str
    source: str
    layout: str  # the published parallelism, and how it maps onto moai_jax's axes
    published: float  # tokens/s per device, or a ratio of two runs' throughputs
    run: Run
    baseline: Run | None = None  # set: the figure is run's throughput over baseline's

    def estimate(self) -> float:
        if self.baseline is None:
            return self.run.tokens_per_sec() / self.run.devices
        return self.run.tokens_per_sec() / self.baseline.tokens_per_sec()

    def error(self) -> float:
        return self.estimate() / self.published - 1


_TT8 = Run("llama3.1-8b", "h100-96gb", {"fsdp": 8}, 16, 8192, 1, "matmuls")
_TT128 = Run("llama3.1-8b", "h100-96gb", {"fsdp": 128}, 256, 8192, 1, "matmuls")
_MOAI_16 = Run("llama3-8b", "mi250", {"fsdp": 4}, 16, 1024, 1, "full")
_MOAI_64 = Run("llama3-8b", "mi250", {"fsdp": 16}, 64, 1024, 1, "matmuls")

RUNS = (
    Published("torchtitan Llama 3.1 8B, 8 × H100 96GB", TORCHTITAN,
              "FSDP 8, local batch 2, selective AC → fsdp=8, remat matmuls (eager: 5,762)", 6667, _TT8),
    Published("torchtitan Llama 3.1 8B, 128 × H100 96GB", TORCHTITAN,
              "FSDP 128, local batch 2, selective AC → fsdp=128, remat matmuls (eager: 5,605)", 6514, _TT128),
    Published("NeMo Llama 3.1 8B, 8 × H100", NEMO,
              "DP 4 × CP 2, distributed optimizer, GBS 128, MBS 1 (12.27 s, MFU 62.5%) → fsdp=8, 16 "
              "micro-batches, remat none", 8192 * 128 / 12.27 / 8,
              Run("llama3.1-8b", "h100", {"fsdp": 8}, 128, 8192, 16, "none")),
    Published("NeMo Llama 3.1 70B, 64 × H100", NEMO,
              "TP 4 (sequence parallel, userbuffers overlap), PP 4 × VP 5 (interleaved, p2p overlapped), CP 2, "
              "DP 2, GBS 128, MBS 1 (14.66 s, MFU 54.3%) → stage=4 × data=4 × tensor=4, 32 micro-batches of one "
              "sequence, virtual stages 5, collectives overlapped, remat none", 8192 * 128 / 14.66 / 64,
              Run("llama3.1-70b", "h100", {"stage": 4, "data": 4, "tensor": 4}, 128, 8192, 32, "none",
                  virtual_stages=5, overlap_collectives=True)),
    Published("MoAI Llama3-8B: batch 64 on 16 over batch 16 on 4", MOAI,
              "12.9k → 49k tokens/s (3.8×), no PP, no TP → fsdp=4 → fsdp=16", 49_000 / 12_900,
              _MOAI_64, _MOAI_16),
    Published("MoAI Llama3-8B: batch 512 on 16 over batch 64 on 16", MOAI,
              "21.6k at 24 s per step, \"model + data parallelism\" → assumed GPipe: stage=8 × data=2, 8 "
              "micro-batches, remat full (7 of 15 ticks idle, 4/3 the FLOPs)", 21_600 / 49_000,
              Run("llama3-8b", "mi250", {"stage": 8, "data": 2}, 512, 1024, 8, "full"), _MOAI_64),
)


def table() -> str:
    rows = ["| run | parallelism (published → moai_jax) | published | estimated | error |",
            "| --- | --- | ---: | ---: | ---: |"]
    for r in RUNS:
        fmt = "{:,.2f}×" if r.baseline is not None else "{:,.0f}"
        rows.append(f"| {r.name} | {r.layout} | {fmt.format(r.published)} | {fmt.format(r.estimate())} | "
                    f"{r.error():+.1%} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
