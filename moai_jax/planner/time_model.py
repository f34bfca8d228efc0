"""The time model: seconds of one train step on the target hardware, compute plus exposed communication.

    compute        training FLOPs (remat recompute included) / (devices × peak × efficiency), where the
                   efficiency falls as each device's matmuls shrink (few tokens per micro-batch, or the
                   narrower matmuls of a tensor split)
    data           gradient all-reduce over `data`, once per step, overlapped with compute
    fsdp           weights all-gathered forward and backward and gradients reduce-scattered, once per
                   micro-batch, overlapped with compute
    tensor         two all-reduces of [tokens, hidden] activations per layer, forward and backward: on
                   the critical path
Each axis uses the link it spans: devices are laid out tensor innermost, then fsdp, then data, so an
axis whose group (with the axes inside it) exceeds a host crosses the slower inter-host links.
"""

from __future__ import annotations

import math

from moai_jax.accelerator import Hardware
from moai_jax.models import ModelConfig, flops_per_token, param_count
from moai_jax.sharding.mesh import MeshShape

PEAK_EFFICIENCY = 0.55  # of peak FLOP/s that large bfloat16 matmuls reach in a training step
HALF_EFFICIENCY_ROWS = 1024  # matmul rows (tokens per device per micro-batch) at which half of it is lost
# Per doubling of `tensor`: the layer's all-reduces sit between its matmuls, which then cannot
# overlap with anything, and the split matmuls run below peak; tensor parallelism pays off only
# when the per-device batch would otherwise fall below a sequence or memory runs out.
TENSOR_EFFICIENCY_LOSS = 0.15
OVERLAP = 0.8  # share of compute time that can hide data / fsdp communication
MICRO_BATCH_OVERHEAD = 0.01  # seconds per micro-batch: loop, gradient accumulation, launch
REMAT_FLOPS = {"none": 1.0, "matmuls": 1.05, "full": 4 / 3}  # training FLOPs relative to no recompute


def _bandwidth(hardware: Hardware, span: int) -> float:
    return hardware.intra_host_bandwidth if span <= hardware.devices_per_host else hardware.inter_host_bandwidth


def estimate_seconds(config: ModelConfig, batch_size: int, seq_len: int, mesh: MeshShape, hardware: Hardware, *,
                     micro_batches: int = 1, remat: str = "none", compute_bytes: int = 2) -> dict[str, float]:
    """Estimated seconds of one step, split into compute, per-axis communication and total."""
    devices = mesh.size
    tokens = batch_size * seq_len
    flops = flops_per_token(config, seq_len) * tokens * REMAT_FLOPS[remat]
    rows = tokens / micro_batches / mesh.batch_shards  # matmul rows per device per micro-batch
    work = rows / mesh.tensor  # tensor parallelism narrows each device's matmuls as much as fewer rows would
    efficiency = (PEAK_EFFICIENCY * work / (work + HALF_EFFICIENCY_ROWS)
                  * (1 - TENSOR_EFFICIENCY_LOSS * math.log2(mesh.tensor)))
    compute = flops / (devices * hardware.peak_flops * efficiency) + MICRO_BATCH_OVERHEAD * micro_batches

    params = param_count(config)
    grad_bytes = 4 * params / (mesh.fsdp * mesh.tensor)
    t, f, d = mesh.tensor, mesh.fsdp, mesh.data
    data = 2 * (d - 1) / d * grad_bytes / _bandwidth(hardware, t * f * d) if d > 1 else 0.0
    fsdp = 0.0
    if f > 1:
        shard_volume = params / t * (f - 1) / f
        per_micro = shard_volume * (2 * compute_bytes + 4)  # gather fwd + bwd, reduce-scatter f32 grads
        fsdp = micro_batches * per_micro / _bandwidth(hardware, t * f)
    tensor = 0.0
    if t > 1:
        passes = 3 if remat == "full" else 2  # forward (+ recompute) and backward
        volume = 2 * passes * config.num_layers * rows * config.hidden_size * compute_bytes * 2 * (t - 1) / t
        tensor = micro_batches * volume / _bandwidth(hardware, t)
    exposed = max(0.0, data + fsdp - OVERLAP * compute)
    total = compute + exposed + tensor
    return {"compute": compute, "data": data, "fsdp": fsdp, "tensor": tensor, "total": total}
