"""The planner's terms for Mixture-of-Experts layers (models/moe.py): memory and all-to-all time.

Memory, per device:
    parameters     the router [embed, experts] (never split over `expert`) and the experts' gate, up and
                   down [experts, embed, mlp]: `experts` over `expert`, `embed` over fsdp (and context),
                   `mlp` over tensor; their gradients and Adam moments follow them (memory.py)
    experts        what the MoE layers keep for backward, by remat policy, plus one layer's working set:
                   the dispatch buffers (each device's token-expert pairs sorted and sent, the rows its
                   experts received, their outputs sent back) and the experts' MLP activations on them.
The experts run on `routed_rows` rows per device: the sorted path (GPU, TPU, and every device under
expert parallelism) has static buffers sized dropless, `expert` destinations × tokens × min(k, experts
per device) rows (k × tokens without expert parallelism), where tokens are the device's own: its shard_map
is manual over the axes that split the batch (data, fsdp, expert), but not over context, whose rows GSPMD
gathers (it cannot split `ragged_dot`'s rows). XLA:CPU without expert parallelism runs every expert on
every token of its own (experts × tokens rows, `moe.resolve`).

Time: each MoE layer sends each device's token-expert pairs to the experts' devices and back (two
all-to-alls forward, two more backward, and two again under remat full's recompute), each moving
(expert − 1) / expert of the send buffer over the link the expert axis (with context and tensor inside
it) spans: on the critical path, since the experts wait for their tokens.
"""

from __future__ import annotations

import math

from moai_jax.models import ModelConfig
from moai_jax.models.grouped_matmul import PADDING_SHARE, block_count, block_rows
from moai_jax.sharding.mesh import MeshShape

# Elements per routed row and MoE layer kept for backward, by remat policy: (expert MLP width F, hidden D)
# coefficients, fitted against 11 XLA:CPU compiles of tiny Mixtral / Qwen3-MoE steps on 8 devices
# (docs/moe.md). remat "matmuls" keeps none of the experts' matmuls: the MoE layer is recomputed whole.
SAVED = {"none": (6.0, 0.0), "matmuls": (0.0, 0.0), "full": (0.0, 0.0)}
# One MoE layer's working set per routed row while it runs (or is recomputed): gate, up and their product;
# the pairs sorted, sent, received, run and sent back, and their gradients (F, D)
WORKING = (4.49, 13.5)
# Share of the "experts" term's XLA:CPU size that a compiler family allocates (like memory.FAMILY_SCALES).
FAMILY_SHARES = {"cpu": 1.0, "gpu": 0.62, "tpu": 1.0}  # gpu: 4 compiles for 8 compile-only H100s; tpu: not fitted
# XLA's GPU compiler runs `ragged_dot` as one dense dot over every group: each projection's input is copied and
# masked once per expert of the device. (D, F) elements in the compute dtype per routed row and local expert
# beyond the first (whose copy WORKING holds), at a grouped MLP's backward: fitted on compile-only H100s, 8,192
# rows, 1 / 4 / 16 experts, D, F = 1024, 256 and 512, 1024 (qwen3-30b-a3b, 128 experts on each of 16 H100s:
# 146.2 GiB estimated, 147.1 GiB compiled; docs/moe.md). moai_jax's GPU step runs `ragged_dot` only in a
# pipeline's stages; elsewhere the blocks of models/grouped_matmul.py. The TPU's ragged_dot has its own kernel.
RAGGED_EXPANSION = {"gpu": (2.27, 2.74)}
# The blocks (models/grouped_matmul.py) on a GPU: (D, F) elements in the compute dtype per padded row (the
# buffer's rows and a block of room per local expert) beyond WORKING's one copy, at a grouped MLP's backward:
# fitted on 6 compiles for a compile-only H100 (8,192–32,768 rows, 1 and 16 experts, D 1024 / 2048, F 256–1024;
# within 8% from 32 MiB up; docs/moe.md).
BLOCKS = {"gpu": (0.91, 5.11)}
# Bytes per weight element of one MoE layer's local experts that a GPU's backward holds when they are gathered
# over fsdp (and context): the gathered weights, their gradient and the blocks' float32 sum, the float32 gradient
# before its reduce-scatter. Fitted on 4 compiles of mixtral-8x7b for 16 compile-only H100s (fsdp=16; expert=2,
# fsdp=8; expert=8, fsdp=2 with 1 and 4 micro-batches; remat full): the rest of the estimate was 2.1 to 23.9 GiB
# under, growing with the gathered experts; with it, within 3.4 GiB (docs/moe.md).
GATHERED_EXPERT_BYTES = {"gpu": 19.6}
# Seconds a step of the blocks' loop costs beyond its matmul on a GPU (a `while` loop: the body's kernel
# launches and the trip-count check): a guess, not measured on a GPU.
BLOCK_STEP_SECONDS = 10e-6


def moe_param_shapes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple]]:
    """The MoE MLP's parameters stacked over layers, with their logical names (models/moe.py)."""
    c = config
    e, x, f, nl = c.hidden_size, c.num_experts, c.expert_size, c.num_layers
    return {"router": ((nl, e, x), ("layers", "embed", None)),
            "gate_proj": ((nl, x, e, f), ("layers", "experts", "embed", "mlp")),
            "up_proj": ((nl, x, e, f), ("layers", "experts", "embed", "mlp")),
            "down_proj": ((nl, x, f, e), ("layers", "experts", "mlp", "embed"))}


def layer_expert_elements(config: ModelConfig, mesh: MeshShape) -> float:
    """One MoE layer's router and experts as one device of the `expert` axis holds them (before fsdp)."""
    c = config
    return c.hidden_size * c.num_experts + local_experts(c, mesh) * 3 * c.hidden_size * c.expert_size


def path(family: str, mesh: MeshShape) -> str:
    """How the experts run in the compiled step: "dense" (XLA:CPU without expert parallelism), "ragged" (a TPU's
    `ragged_dot`, and a GPU's in a pipeline's stages: models/moe.py) or "blocks" (models/grouped_matmul.py)."""
    if family == "cpu" and mesh.expert == 1:
        return "dense"
    return "ragged" if family == "tpu" or (family == "gpu" and mesh.stage > 1) else "blocks"


def routed_rows(config: ModelConfig, tokens: float, mesh: MeshShape, family: str) -> float:
    """Rows the experts of one device run on per MoE layer, for `tokens` tokens of this device."""
    c = config
    if path(family, mesh) == "dense":
        return c.num_experts * tokens
    shards, tokens = mesh.expert, tokens * gathered_rows(mesh)
    if c.capacity_factor is not None:  # each expert takes at most `capacity` of the tokens' pairs
        return c.num_experts * max(1, math.ceil(tokens * c.num_experts_per_tok / c.num_experts * c.capacity_factor))
    return shards * tokens * min(c.num_experts_per_tok, c.num_experts // shards)


def gathered_rows(mesh: MeshShape) -> int:
    """How many devices' tokens the sorted path's grouped matmul runs on, per device: those of the context
    devices around it (GSPMD gathers them: see the module's docstring)."""
    return mesh.context


def experts_bytes(config: ModelConfig, tokens: float, mesh: MeshShape, layers: float, remat: str,
                  activation_bytes: int, family: str, compute_bytes: int = 2) -> float:
    """The "experts" memory term: `layers` MoE layers' saved activations and one layer's working set (on a GPU
    also the blocks' padded rows, or in a pipeline's stages the grouped matmuls' inputs copied for every local
    expert, and one layer's local experts gathered over fsdp)."""
    c = config
    if not c.num_experts:
        return 0.0
    rows = routed_rows(c, tokens, mesh, family)
    width = c.expert_size / mesh.tensor if c.expert_size % mesh.tensor == 0 else c.expert_size
    saved_f, saved_d = SAVED[remat]
    work_f, work_d = WORKING
    per_row = layers * (saved_f * width + saved_d * c.hidden_size) + work_f * width + work_d * c.hidden_size
    local = local_experts(c, mesh)
    expanded = 0.0
    if family in RAGGED_EXPANSION and path(family, mesh) == "ragged":
        expand_d, expand_f = RAGGED_EXPANSION[family]
        expanded = (local - 1) * rows * (expand_d * c.hidden_size + expand_f * width) * compute_bytes
    elif family in BLOCKS and path(family, mesh) == "blocks":
        block_d, block_f = BLOCKS[family]
        size = block(c, tokens, mesh)
        padded = block_count(int(rows), local, size) * size
        expanded = padded * (block_d * c.hidden_size + block_f * width) * compute_bytes
    if family in GATHERED_EXPERT_BYTES and mesh.fsdp * mesh.context > 1:
        expanded += GATHERED_EXPERT_BYTES[family] * local * 3 * c.hidden_size * width
    return FAMILY_SHARES[family] * rows * per_row * activation_bytes + expanded


def local_experts(config: ModelConfig, mesh: MeshShape) -> int:
    """The experts one device of the `expert` axis holds."""
    c = config
    return c.num_experts // mesh.expert if c.num_experts % mesh.expert == 0 else c.num_experts


def block(config: ModelConfig, tokens: float, mesh: MeshShape) -> int:
    """The blocks' size for `tokens` tokens of a device: sized for the t · k pairs its experts get on average."""
    return block_rows(max(1, int(tokens * gathered_rows(mesh) * config.num_experts_per_tok)),
                      local_experts(config, mesh))


def block_loop_seconds(config: ModelConfig, rows: float, mesh: MeshShape, ticks: float, remat: str,
                       hardware_name: str) -> float:
    """Seconds of the blocks' loop steps beyond their matmuls in one step on a GPU (0 elsewhere): per MoE layer
    and micro-batch, the blocks the routed pairs fill, for each of the 3 projections, forward (again under remat
    full) and twice backward; `rows` are this device's tokens per micro-batch."""
    if not config.num_experts or hardware_name.startswith("tpu") or path("gpu", mesh) != "blocks":
        return 0.0
    size = block(config, rows, mesh)
    steps = rows * gathered_rows(mesh) * config.num_experts_per_tok / size + local_experts(config, mesh) / 2
    passes = 3 + (remat == "full")
    return ticks * sum(config.sparse_layers) * 3 * passes * steps * BLOCK_STEP_SECONDS


def all_to_all_seconds(config: ModelConfig, rows: float, mesh: MeshShape, bandwidth: float, ticks: float,
                       remat: str, compute_bytes: int) -> float:
    """Seconds of the MoE layers' all-to-alls in one step (0 without expert parallelism); `rows` are this
    device's tokens per micro-batch, `bandwidth` the link the expert axis spans."""
    shards = mesh.expert
    if not config.num_experts or shards == 1:
        return 0.0
    sent = routed_rows(config, rows, mesh, "gpu")  # the send buffer's rows (the sorted path's)
    per_layer = sent * config.hidden_size * compute_bytes * (shards - 1) / shards
    passes = 4 + (2 if remat == "full" else 0)
    moe_layers = sum(config.sparse_layers) / mesh.stage
    return ticks * moe_layers * passes * per_layer / bandwidth


def expert_param_count(config: ModelConfig) -> int:
    """The experts' weights of every MoE layer (not the router): what expert parallelism splits."""
    c = config
    return sum(c.sparse_layers) * c.num_experts * 3 * c.hidden_size * c.expert_size


def expert_verdict(s, fits) -> str:
    """Why the chosen plan splits the experts `expert` ways: the other degrees' best plans are slower
    (by how much, and where), or do not fit."""
    from moai_jax.planner.explain import slower  # explain imports this module

    e = s.candidate.mesh.expert
    split = (f"expert={e}: each device holds 1/{e} of every MoE layer's experts, and the layer's all-to-alls take "
             f"{s.seconds.get('expert', 0):.3f} s a step" if e > 1 else
             "expert=1: every device holds all experts (no all-to-all)")
    others = {}
    for f in fits:  # fastest first: the best plan of each other expert degree
        others.setdefault(f.candidate.mesh.expert, f)
    others.pop(e, None)
    if not others:
        return f"{split}; no other expert degree fits"
    best = min(others.values(), key=lambda f: f.seconds["total"])
    terms = ("compute", "expert", "data", "fsdp", "tensor", "bubble", "stage", "context")
    worst = max(terms, key=lambda k: best.seconds.get(k, 0) - s.seconds.get(k, 0))
    return (f"{split}; the best with expert={best.candidate.mesh.expert} is "
            f"{slower(best, s)} ({worst} {best.seconds.get(worst, 0):.3f} s "
            f"against {s.seconds.get(worst, 0):.3f} s)")


def replicated_flops(config: ModelConfig, seq_len: int, mesh: MeshShape, hardware_name: str = "tpu") -> float:
    """Training FLOPs per token of the sorted path's experts beyond the routed pairs' own: computed again for the
    context devices around each device (`gathered_rows`); on a GPU, the blocks' padding (half a block per local
    expert on average, at most 1 / PADDING_SHARE of the pairs), or in a pipeline's stages, where its compiler
    runs `ragged_dot` as one dense dot over every local expert and every row of the static buffers
    (RAGGED_EXPANSION), all of those."""
    c = config
    if not c.num_experts:
        return 0.0
    k, local = c.num_experts_per_tok, local_experts(c, mesh)
    rows = k * gathered_rows(mesh)  # rows run per token of the device
    if not hardware_name.startswith("tpu"):
        if path("gpu", mesh) == "ragged":
            rows = routed_rows(c, seq_len, mesh, "gpu") / seq_len * local
        else:
            rows *= 1 + 1 / (2 * PADDING_SHARE)
    return 6 * sum(c.sparse_layers) * 3 * c.hidden_size * c.expert_size * (rows - k)
