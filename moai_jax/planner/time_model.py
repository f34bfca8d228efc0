"""The time model: seconds of one train step on the target hardware, compute plus exposed communication.

    compute        training FLOPs (remat recompute included) / (devices × peak × efficiency), where the
                   efficiency falls as each device's matmuls shrink in either outer dimension: fewer rows
                   (tokens per device per micro-batch) or narrower columns (a tensor split cuts every
                   weight's columns or rows `tensor` ways, while each device keeps all the micro-batch's
                   rows)
    data           gradient all-reduce over `data`, once per step, overlapped with compute
    fsdp           weights all-gathered forward and backward and gradients reduce-scattered, once per
                   micro-batch, overlapped with compute; gradients travel in the compute dtype, as XLA
                   compiles the step (the output head's in float32)
    tensor         per layer, two all-reduces of the [tokens, hidden] activations in each pass (the same
                   bytes as sequence parallelism's two all-gathers and two reduce-scatters) over the link
                   `tensor` spans: the forward ones (and remat's recompute) sit between dependent matmuls,
                   on the critical path; the backward ones overlap the weight-gradient matmuls, which do
                   not wait for them (a third of the step's FLOPs): only what exceeds those is exposed
    bubble         under a pipeline, the ticks a stage waits for its first or after its last
                   micro-batch: compute × (stages − 1) / micro_batches, so that compute + bubble is
                   compute stretched over micro_batches + stages − 1 ticks (an idle share of
                   (stages − 1) / (micro_batches + stages − 1)); an interleaved schedule (Megatron's
                   virtual stages: each device holds `virtual_stages` chunks of layers) divides it by
                   `virtual_stages` (moai_jax's own pipeline is GPipe: 1)
    context        under context parallelism, each layer's keys and values all-gathered over `context`
                   (forward, backward) and their gradients reduce-scattered: on the critical path
    stage          each tick's [rows, length, hidden] activations passed to the next stage, forward and
                   backward, and the last stage's outputs handed to the head: on the critical path
    expert         under expert parallelism, each MoE layer's token-expert pairs sent to the experts'
                   devices and back by all-to-all, forward and backward: on the critical path
                   (planner/experts.py); on a GPU also the grouped matmul's loop steps (its blocks).
                   A MoE model's compute counts its active parameters (the router and the k experts a
                   token is routed to); outside the MoE layers `expert` splits the
                   batch and shards the weights like fsdp, while the experts' weights stay on their devices
    host           with the optimizer state in host memory, its two float32 moments of every trained element a
                   device holds, brought over the host link for the update and sent back (the directions
                   overlap): after backward, so not hidden behind compute
Each axis uses the link it spans: devices are laid out tensor innermost, then context, expert, fsdp,
data and stage, so an axis whose group (with the axes inside it) exceeds a host crosses the slower inter-host
links. Under a pipeline each stage works on its share of the layers: its weights are gathered over
fsdp once per tick, its gradients all-reduced over data.
"""

from __future__ import annotations

from collections.abc import Mapping

from moai_jax.accelerator import Hardware
from moai_jax.models import ModelConfig, flops_per_token, param_count
from moai_jax.models.lora import LoraConfig, adapter_param_count
from moai_jax.models.lora import flops_per_token as lora_flops_per_token
from moai_jax.planner.experts import all_to_all_seconds, block_loop_seconds, expert_param_count, replicated_flops
from moai_jax.sharding.mesh import MeshShape

PEAK_EFFICIENCY = 0.53  # of peak FLOP/s large bfloat16 matmuls reach in a training step (fitted: planner/published.py)
HALF_EFFICIENCY_ROWS = 768  # matmul rows (tokens per device per micro-batch) at which half of it is lost
HALF_EFFICIENCY_COLUMNS = 384  # matmul columns per device (a tensor split narrows them) at which half is lost
BACKWARD_WEIGHT_SHARE = 1 / 3  # of a step's FLOPs: the weight-gradient matmuls, which need no all-reduce
OVERLAP = 0.8  # share of compute time that can hide data / fsdp communication
MICRO_BATCH_OVERHEAD = 0.01  # seconds per micro-batch: loop, gradient accumulation, launch
REMAT_FLOPS = {"none": 1.0, "matmuls": 1.05, "full": 4 / 3}  # training FLOPs relative to no recompute
STAGE_RECOMPUTE_FLOPS = 1 / 3  # under a pipeline, remat full also recomputes each stage's forward once
# LoRA: the recomputed forward (2 · N) weighs more against a step without weight gradients (4 · N).
LORA_REMAT_FLOPS = {"none": 1.0, "matmuls": 1.05, "full": 3 / 2}


def link_bandwidth(hardware: Hardware, span: int) -> float:
    """Bytes/s per device over the link a group of `span` consecutive devices needs: inside a host or across."""
    return hardware.intra_host_bandwidth if span <= hardware.devices_per_host else hardware.inter_host_bandwidth


def estimate_seconds(config: ModelConfig, batch_size: int, seq_len: int, mesh: MeshShape, hardware: Hardware, *,
                     micro_batches: int = 1, remat: str = "none", compute_bytes: int = 2,
                     lora: LoraConfig | None = None, virtual_stages: int = 1,
                     overlap_collectives: bool = False, collectives: Mapping[str, float] | None = None,
                     gradient_bytes: int | None = None, offload_optimizer: bool = False) -> dict[str, float]:
    """Estimated seconds of one step, split into compute, per-axis communication and total. With
    `lora`, no base weight gradient is computed, all-reduced or reduce-scattered (`lora_work`).
    Two schedules moai_jax's step does not have, for published runs: `virtual_stages` > 1, an
    interleaved pipeline; `overlap_collectives`, tensor-parallel collectives and stage transfers
    overlapped with the matmuls like data and fsdp traffic (Megatron's userbuffers and overlap_p2p_comm).
    `collectives`: seconds of communication per term (data, fsdp, tensor, context, expert, stage) read from
    the compiled step (planner/compiled_collectives.py), in place of the guessed ones: the step "as compiled".
    `gradient_bytes`: bytes per gradient element on the wire, for a published framework (None: moai_jax's).
    `offload_optimizer`: the optimizer state is kept in host memory (the "host" term)."""
    devices = mesh.size
    tokens = batch_size * seq_len
    recompute = REMAT_FLOPS[remat] + (STAGE_RECOMPUTE_FLOPS if mesh.stage > 1 and remat == "full" else 0.0)
    if lora is None:
        per_token, trained = flops_per_token(config, seq_len) * recompute, param_count(config)
    else:
        per_token, trained = lora_work(config, seq_len, lora, remat)
    if hardware.name != "cpu":  # the sorted path's experts beyond the routed pairs (gathered rows, GPU's dense dot)
        per_token += replicated_flops(config, seq_len, mesh, hardware.name) * REMAT_FLOPS[remat]
    flops = per_token * tokens
    rows = tokens / micro_batches / mesh.batch_shards / mesh.context  # matmul rows per device per micro-batch
    efficiency = PEAK_EFFICIENCY * rows / (rows + HALF_EFFICIENCY_ROWS) * split_efficiency(config.hidden_size,
                                                                                         mesh.tensor)
    ticks = pipeline_ticks(mesh, micro_batches, virtual_stages)  # micro-batch passes over a device's layers
    compute = flops / (devices * hardware.peak_flops * efficiency) + MICRO_BATCH_OVERHEAD * ticks

    params, experts = param_count(config), expert_param_count(config)
    s, t, d, x = mesh.stage, mesh.tensor, mesh.data, mesh.expert
    f = mesh.fsdp * mesh.context * x  # weights shard over context and (outside the experts) expert too
    trained_experts = experts if lora is None else adapter_param_count(config, lora, experts_only=True)
    # Gradients on the wire: moai_jax's compiled step sends them in the compute dtype, but the output head's
    # (its logits accumulate in float32) in float32 (docs/time-model.md, "Collectives as compiled"); a published
    # framework that reduces them in float32 says so (`gradient_bytes`=4)
    wire = compute_bytes if gradient_bytes is None else gradient_bytes
    head = config.vocab_size * config.hidden_size if gradient_bytes is None and lora is None else 0
    head_extra = (4 - wire) * head / (t * s)  # bytes per device, before the fsdp split
    grad_bytes = wire * trained / (f * t * s) + head_extra / f  # the experts' too: experts over expert
    data = 2 * (d - 1) / d * grad_bytes / link_bandwidth(hardware, t * f * d) if d > 1 else 0.0
    fsdp = 0.0
    if f > 1:  # the experts' weights are gathered over fsdp × context only: each device keeps its own experts
        fe = f // x
        shard_volume = (params - experts) / t / s * (f - 1) / f + experts / x / t / s * (fe - 1) / fe
        trained_volume = ((trained - trained_experts) / t / s * (f - 1) / f
                          + trained_experts / x / t / s * (fe - 1) / fe)
        # gather forward and backward, reduce-scatter the gradients of what trains
        per_micro = shard_volume * 2 * compute_bytes + trained_volume * wire + head_extra * (f - 1) / f
        fsdp = ticks * per_micro / link_bandwidth(hardware, t * f)
    forward_passes = 2 if remat == "full" else 1  # of the tensor-parallel all-reduces; backward has one
    # one pass's all-reduces, each moving 2 (t − 1) / t of a [rows, hidden] activation
    per_pass = ticks * 2 * config.num_layers / s * rows * config.hidden_size * compute_bytes * 2 * (t - 1) / t
    tensor = (forward_passes + 1) * per_pass / link_bandwidth(hardware, t)
    context = context_seconds(config, seq_len, rows, mesh, hardware, ticks, remat, compute_bytes)
    expert = all_to_all_seconds(config, rows, mesh, link_bandwidth(hardware, x * mesh.context * t), ticks, remat,
                                compute_bytes)
    bubble, stage = pipeline_seconds(config, seq_len, batch_size, mesh, hardware, micro_batches, compute,
                                     compute_bytes, virtual_stages)
    if collectives is not None:
        data, fsdp, tensor, context, expert, stage = (collectives.get(term, 0.0) for term in
                                                      ("data", "fsdp", "tensor", "context", "expert", "stage"))
    expert += block_loop_seconds(config, rows, mesh, ticks, remat, hardware.name)  # not traffic: never replaced
    if not overlap_collectives:  # the backward all-reduces overlap the weight-gradient matmuls
        weight_grads = 0.0 if lora else BACKWARD_WEIGHT_SHARE * flops / recompute
        hidden_under = weight_grads / (devices * hardware.peak_flops * efficiency)
        backward = tensor / (forward_passes + 1)
        tensor = tensor - backward + max(0.0, backward - hidden_under)
    host = 2 * 4 * trained / (f * t * s) / hardware.host_link_bandwidth if offload_optimizer else 0.0
    if overlap_collectives:
        total = compute + bubble + max(0.0, data + fsdp + tensor + stage - OVERLAP * compute) + context + expert
    else:
        total = compute + bubble + max(0.0, data + fsdp - OVERLAP * compute) + tensor + stage + context + expert
    return {"compute": compute, "data": data, "fsdp": fsdp, "tensor": tensor, "bubble": bubble, "stage": stage,
            "context": context, "expert": expert, "host": host, "total": total + host}


def context_seconds(config: ModelConfig, seq_len: int, rows: float, mesh: MeshShape, hardware: Hardware,
                    ticks: float, remat: str, compute_bytes: int) -> float:
    """Context parallelism's K/V traffic: per layer and micro-batch, the keys and values all-gathered over
    `context` in forward (again under remat full's recompute), again in backward, and their gradients
    reduce-scattered, each moving (context − 1) / context of the sequence's K/V over the link the
    context axis (inside tensor's) spans; on the critical path, like tensor's all-reduces (0 without)."""
    c = mesh.context
    if c == 1:
        return 0.0
    kv_heads = config.num_kv_heads / mesh.tensor
    sequences = rows * c / seq_len  # rows are this device's tokens: 1 / context of each sequence
    kv_bytes = sequences * seq_len * 2 * kv_heads * config.head_dim * compute_bytes * (c - 1) / c
    passes = 3 + (remat == "full")
    return ticks * config.num_layers / mesh.stage * passes * kv_bytes / link_bandwidth(hardware, c * mesh.tensor)


def pipeline_ticks(mesh: MeshShape, micro_batches: int, virtual_stages: int = 1) -> float:
    """How many times a device runs its layers in one step: once per micro-batch, plus the stages − 1
    ticks of a pipeline's fill and drain (each 1 / virtual_stages of the layers when interleaved)."""
    return micro_batches + (mesh.stage - 1) / virtual_stages


def pipeline_seconds(config: ModelConfig, seq_len: int, batch_size: int, mesh: MeshShape, hardware: Hardware,
                     micro_batches: int, compute: float, compute_bytes: int,
                     virtual_stages: int = 1) -> tuple[float, float]:
    """(bubble, stage-to-stage transfer) seconds of a pipeline; (0, 0) without one. Interleaved, each
    micro-batch crosses stages × virtual_stages − 1 chunk boundaries instead of stages − 1."""
    if mesh.stage == 1:
        return 0.0, 0.0
    bubble = compute * (mesh.stage - 1) / (micro_batches * virtual_stages)
    rows = batch_size / micro_batches / mesh.batch_shards
    per_tick = rows * seq_len * config.hidden_size * compute_bytes * 2  # forward and backward
    handed_to_head = 2 * batch_size / mesh.batch_shards * seq_len * config.hidden_size * compute_bytes
    link = link_bandwidth(hardware, mesh.size)  # stage is outermost: its neighbours are a whole sub-mesh apart
    return bubble, (virtual_stages * pipeline_ticks(mesh, micro_batches, virtual_stages) * per_tick
                    + handed_to_head) / link


def split_efficiency(width: int, tensor: int) -> float:
    """The share of its matmul efficiency a model `width` wide keeps when `tensor` cuts each device's
    slice to width / tensor columns (1 without a split)."""
    narrow = width / tensor
    return narrow / (narrow + HALF_EFFICIENCY_COLUMNS) / (width / (width + HALF_EFFICIENCY_COLUMNS))


def lora_work(config: ModelConfig, seq_len: int, lora: LoraConfig, remat: str) -> tuple[float, int]:
    """LoRA's training FLOPs per token (recompute included) and its trained parameters, the adapters."""
    return (lora_flops_per_token(config, seq_len, lora) * LORA_REMAT_FLOPS[remat],
            adapter_param_count(config, lora))
