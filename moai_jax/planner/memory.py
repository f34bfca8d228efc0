"""The memory model: bytes per device of one train step, term by term, without compiling anything.

    parameters      the device's shards of every weight (exact, from the logical axis rules)
    gradients       one more copy of the shards (two under micro-batching: the sum and the current one;
                    one under a pipeline, whose micro-batches are summed inside the backward scan)
    optimizer       AdamW's two moments, shaped like the parameters; with the optimizer state in host memory
                    (`moai_jax/offload.py`) the largest parameter's moments only, on the devices for its update
                    once backward is done (XLA streams them one parameter at a time; on XLA:CPU, whose devices'
                    memory is the host's, all stay counted)
    activations     what each layer keeps for backward, by remat policy, times the layers
    attention       the blockwise attention's float32 score blocks
    recompute       one layer's working set while backward runs (re)computes it
    logits          float32 [tokens, vocab / tensor] logits, their gradient and softmax: whole or one chunk
    gathered        FSDP: one layer's weights all-gathered in flight, forward and backward
    gathered head   FSDP: the embedding and head all-gathered in flight, and their gradients
    tied table      FSDP with tied embeddings: the table's float32 gradient whole, where the lookup's and
                    the head's contributions meet
    temporaries     the optimizer update's transient copies, the batch, compiled code
    lora dropout    LoRA only: each target's dropped-out input kept for backward, or one layer's dropout masks
    head            LoRA only: the frozen embedding and head in float32 (upcast, or gathered under FSDP)
    base copy       LoRA only: the layers' 16-bit frozen base bit-copied for the layer loop (`lora_terms`)
    pipeline        under stages: the micro-batches' inputs and outputs of the stages, and their gradients
    gathered kv     under context parallelism: one layer's keys and values gathered over the whole sequence
    experts         Mixture-of-Experts layers: what they keep for backward and one layer's dispatch buffers
                    and expert MLP working set, on the rows routed to the device's experts (planner/experts.py)

Under context parallelism (context > 1) each device holds 1 / context of every sequence's tokens, so
every per-token term is divided by it, and its weights are sharded over context as over fsdp.

Under a pipeline (stage > 1) each device holds its stage's layers (and a slice of the vocab-sized
tables), keeps what its layers save for backward for every micro-batch in flight (micro-batches +
stages − 1 ticks of layers / stages layers each), and runs the head once on the whole batch.

Activation sizes are per token and counted in elements of E (hidden), F (MLP / tensor), Q (query
heads × head_dim / tensor) and KV (key/value heads × head_dim / tensor); the coefficients were fitted
against XLA:CPU's compiled memory, and each compiler family (the GPU's, the TPU's) scales the terms by
its own fitted shares, `FAMILY_SCALES` (scripts/memory_model_check.py --target gpu|tpu|cpu prints the
comparison with each compiler).
"""

from __future__ import annotations

import functools
import math

from moai_jax.models import ModelConfig
from moai_jax.models.lora import LoraConfig, adapter_shapes, weight_axes
from moai_jax.planner.experts import experts_bytes, layer_expert_elements, moe_param_shapes
from moai_jax.sharding.mesh import MeshShape
from moai_jax.sharding.rules import partition_spec
from moai_jax.train import LOSS_CHUNK

# Elements per token and layer kept for backward, by remat policy: (E, F, Q, KV) coefficients.
SAVED = {"none": (12.2, 5.47, 1.26, 3.0), "matmuls": (3.3, 1.84, 1.0, 0.441), "full": (1.31, 0.0, 0.0, 0.0)}
# One layer recomputed in backward (matmuls / full): its forward intermediates and their gradients.
RECOMPUTE = (3.71, 0.533, 2.8, 2.05)
LOGIT_COPIES = 1.81  # float32 logits, softmax, gradient of the logits
GATHER_COPIES = 0.229  # a layer's gathered weights: forward, backward, gradient before reduce-scatter
# Vocab-sized tables gathered in flight: the embedding and the head, and their gradients (which the
# micro-batch loop keeps alive longer).
HEAD_COPIES = {"one batch": 3.33, "micro-batches": 4.91}
TIED_COPIES = 1.0  # a tied embedding's whole float32 gradient under FSDP (llama3.2-3b on 4 × mi250, issue 24)
UPDATE_COPIES = 0.00887  # transient parameter-sized buffers of the optimizer update
ATTENTION_BLOCK = 128  # the blockwise attention's key block
ATTENTION_COPIES = 3.36  # float32 [rows, heads, length, block] scores, probabilities and their gradient
CODE_BYTES = 0
# A pipeline's head runs once on the whole batch: whole float32 logits (fused with their gradient), or a chunk's
PIPELINE_LOGIT_COPIES = {"whole": 0.194, "chunked": 0.951}
CONTEXT_KV_COPIES = 3.0  # float32 [rows, length, kv heads, head_dim] buffers of one layer's gathered K and V
PIPELINE_COPIES = 6.29  # [batch, length, embed] buffers of a pipeline: stage inputs and outputs (or their gradients)


# On a GPU or TPU compiler the estimates stay within 10% over the compiled bytes and 3% under them
# (memory_model_check.py's pass mark): the planner compiles a faster candidate estimated less than
# OVER_TOLERANCE over the budget before trusting a fitting one (planner/search.py, within_tolerance).
OVER_TOLERANCE, UNDER_TOLERANCE = 0.10, 0.03

# Per compiler family, the share of each term's XLA:CPU size that its compiler allocates, fitted against
# compiles for the target (memory_model_check.py --target): "term" for every step, "term mode" for steps
# with that remat policy, loss mode or batching ("micro-batches", "pipeline", "one batch"), looked up in that
# order (`step_modes`). A term a family does not name keeps its CPU size. XLA:CPU's own copies (the LoRA base's
# 16-bit bit copy, float32 upcasts of 16-bit slices) belong to the CPU family only.
FAMILY_SCALES: dict[str, dict[str, float]] = {
    "cpu": {},
    # 25 compiles for compile-only H100s (memory_model_check.py --target gpu, docs/targets.md; --fit re-fits
    # them): bfloat16 activations, cuDNN attention (no score blocks), at one batch part of a gradient-sized
    # buffer at the peak, under micro-batches the sum and a third gradient-sized buffer, no XLA:CPU copies
    # of the frozen LoRA base
    "gpu": {"activations none": 0.622, "activations matmuls": 0.495, "activations full": 0.437,
            "recompute matmuls": 1.247, "recompute full": 0.191, "logits whole": 1.205, "logits chunked": 1.786,
            "gathered": 0.0, "gathered head whole": 0.886, "gathered head chunked": 0.858, "attention": 0.0,
            "pipeline": 0.981, "gradients micro-batches": 1.361, "gradients one batch": 0.577, "lora dropout": 1.387,
            "head": 0.0, "base copy": 0.0, "tied table": 0.0,
            # under a pipeline the backward scan's stacked gradients of the stage's layers are live beside their
            # sum over micro-batches (2 compiles of mixtral-8x7b, stage=2 on 16 H100s: 3 + 3 expert-weight
            # gradient buffers at the peak, docs/moe.md)
            "gradients pipeline": 2.0},
    # 10 compiles for compile-only TPU v5p / v5e slices (--target tpu): 9 shares for 10 cases, so a first fit
    "tpu": {"activations none": 0.59, "activations matmuls": 0.778, "activations full": 1.74, "attention": 0.0,
            "recompute": 0.0, "logits": 1.38, "gathered": 0.0, "gathered head": 0.0, "pipeline": 0.401,
            "lora dropout": 0.495, "head": 0.0, "base copy": 0.0, "tied table": 0.0},
}


def family_scaled(terms: dict[str, float], family: str, modes: tuple[str, ...]) -> dict[str, float]:
    """`terms` as the `family`'s compiler allocates them (see FAMILY_SCALES); `modes`: `step_modes`."""
    scales = FAMILY_SCALES[family]
    return {k: v * (1.0 if (key := share_key(scales, k, modes)) is None else scales[key]) for k, v in terms.items()}


def step_modes(mesh: MeshShape, micro_batches: int, remat: str, loss: str) -> tuple[str, ...]:
    """What FAMILY_SCALES' "term mode" shares are looked up by, in this order: the remat policy, the loss
    mode and the batching ("pipeline" under stages, else "micro-batches" or "one batch")."""
    return remat, loss, "pipeline" if mesh.stage > 1 else "micro-batches" if micro_batches > 1 else "one batch"


def share_key(scales: dict[str, float], term: str, modes: tuple[str, ...]) -> str | None:
    """The key of `scales` that scales `term` under `modes` ("term mode", in the modes' order, then "term"), or None
    where the family keeps the term's CPU size."""
    return next((f"{term} {m}" for m in modes if f"{term} {m}" in scales), term if term in scales else None)


def param_shapes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Every parameter's shape and logical axis names, as `models.Decoder` creates them."""
    c = config
    e, n, k, h, f, v, nl = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size,
                            c.vocab_size, c.num_layers)
    shapes = {
        "embedding": ((v, e), ("vocab", "embed")),
        "q_proj": ((nl, e, n, h), ("layers", "embed", "heads", "head_dim")),
        "k_proj": ((nl, e, k, h), ("layers", "embed", "kv_heads", "head_dim")),
        "v_proj": ((nl, e, k, h), ("layers", "embed", "kv_heads", "head_dim")),
        "o_proj": ((nl, n, h, e), ("layers", "heads", "head_dim", "embed")),
        "gate_proj": ((nl, e, f), ("layers", "embed", "mlp")),
        "up_proj": ((nl, e, f), ("layers", "embed", "mlp")),
        "down_proj": ((nl, f, e), ("layers", "mlp", "embed")),
        "norms": ((nl, 2, e), ("layers", None, "embed")),
        "final_norm": ((e,), ("embed",)),
    }
    if c.attention_bias:
        shapes |= {"q_bias": ((nl, n, h), ("layers", "heads", "head_dim")),
                   "kv_bias": ((nl, 2 * k, h), ("layers", "kv_heads", "head_dim"))}
    if not c.tie_word_embeddings:
        shapes["lm_head"] = ((e, v), ("embed", "vocab"))
    return _family_param_shapes(c, shapes)


def _family_param_shapes(config: ModelConfig, shapes: dict) -> dict:
    """Llama's parameter shapes changed by what sets the model's family apart (models/families.py)."""
    c, family = config, config.family
    e, nl = c.hidden_size, c.num_layers
    if not family.gated_mlp:  # GPT-2: no gate, biases on the MLP and o_proj
        del shapes["gate_proj"]
        shapes["mlp_bias"] = ((nl, c.intermediate_size), ("layers", "mlp"))
        shapes["out_biases"] = ((nl, 2, e), ("layers", None, "embed"))
    if family.norm == "layer":  # LayerNorm's biases
        shapes["norm_biases"] = ((nl, 2, e), ("layers", None, "embed"))
        shapes["final_norm_bias"] = ((e,), ("embed",))
    if family.qk_norm_whole:  # OLMoE: over the whole projection
        shapes["q_norm"] = ((nl, c.num_heads, c.head_dim), ("layers", "heads", "head_dim"))
        shapes["k_norm"] = ((nl, c.num_kv_heads, c.head_dim), ("layers", "kv_heads", "head_dim"))
    elif family.qk_norm:
        shapes["qk_norms"] = ((nl, 2, c.head_dim), ("layers", None, "head_dim"))
    if family.sandwich_norms:
        shapes["output_norms"] = ((nl, 2, e), ("layers", None, "embed"))
    if family.learned_positions:
        shapes["position_embedding"] = ((c.max_position_embeddings, e), (None, "embed"))
    if c.num_experts:  # every layer's MLP is a Mixture of Experts (models/llama.py refuses mixed layouts)
        shapes = {k: v for k, v in shapes.items() if k not in ("gate_proj", "up_proj", "down_proj")}
        shapes |= moe_param_shapes(c)
    return shapes


def _shard_elements(shape, names, mesh_sizes) -> int:
    spec = partition_spec(names, shape, mesh_sizes)
    count = math.prod(shape)
    for axes in spec:
        for axis in (axes,) if isinstance(axes, str) else axes or ():
            count //= mesh_sizes[axis]
    return count


def sharded_param_elements(config: ModelConfig, mesh: MeshShape) -> int:
    """Parameter elements each device holds under the logical axis rules."""
    return _sharded_elements(tuple(param_shapes(config).values()), mesh)


@functools.lru_cache(maxsize=4096)  # the planner asks once per candidate; meshes repeat across candidates
def _sharded_elements(shapes: tuple, mesh: MeshShape) -> int:
    sizes = mesh.sizes()
    return sum(_shard_elements(s, n, sizes) for s, n in shapes)


def largest_shard_elements(config: ModelConfig, mesh: MeshShape) -> int:
    """The elements of the largest parameter's shard on one device."""
    sizes = mesh.sizes()
    return max(_shard_elements(shape, names, sizes) for shape, names in param_shapes(config).values())


def layer_param_elements(config: ModelConfig, mesh: MeshShape | None = None) -> float:
    """One layer's weights (a MoE layer's experts as one device of the `expert` axis holds them)."""
    c = config
    attention = c.hidden_size * (2 * c.num_heads * c.head_dim + 2 * c.num_kv_heads * c.head_dim)
    if c.num_experts:
        return attention + layer_expert_elements(c, mesh or MeshShape())
    return attention + (3 if c.family.gated_mlp else 2) * c.hidden_size * c.intermediate_size


def _per_token(coefficients, config: ModelConfig, tensor: int) -> float:
    c = config
    a_e, a_f, a_q, a_kv = coefficients
    mlp = 0 if c.num_experts else c.intermediate_size  # a MoE layer's MLP is the "experts" term
    return (a_e * c.hidden_size + a_f * mlp / tensor + a_q * c.num_heads * c.head_dim / tensor
            + a_kv * c.num_kv_heads * c.head_dim / tensor)


def estimate_bytes(config: ModelConfig, batch_size: int, seq_len: int, mesh: MeshShape, *, micro_batches: int = 1,
                   remat: str = "none", loss: str = "whole", param_bytes: int = 4, activation_bytes: int = 4,
                   lora: LoraConfig | None = None, base_bytes: int = 2, family: str = "cpu",
                   offload_optimizer: bool = False) -> dict[str, int]:
    """Estimated bytes per device of the train step, by term, with "total", as the `family`'s compiler
    ("gpu", "tpu", "cpu") allocates them. With `lora`, only the adapters train and the base is stored
    in `base_bytes` per element (see `lora_terms`). `offload_optimizer`: the optimizer state in host memory."""
    p = sharded_param_elements(config, mesh) * param_bytes
    tokens = batch_size // micro_batches // mesh.batch_shards * seq_len // mesh.context  # per device, one micro-batch
    layers = held_layers(config, mesh, micro_batches, remat)
    activations = layers * tokens * _per_token(SAVED[remat], config, mesh.tensor) * activation_bytes
    recompute = 0 if remat == "none" else tokens * _per_token(RECOMPUTE, config, mesh.tensor) * activation_bytes
    rows = batch_size // micro_batches // mesh.batch_shards
    head_rows = batch_size // mesh.batch_shards if mesh.stage > 1 else rows  # a pipeline's head sees the batch
    logit_positions = head_rows * (min(LOSS_CHUNK, seq_len) if loss == "chunked" else seq_len) // mesh.context
    vocab_split = mesh.tensor * mesh.stage
    vocab = config.vocab_size // vocab_split if config.vocab_size % vocab_split == 0 else config.vocab_size
    copies = PIPELINE_LOGIT_COPIES[loss] if mesh.stage > 1 else LOGIT_COPIES
    logits = logit_positions * vocab * 4 * copies
    heads = config.num_heads // mesh.tensor if config.num_heads % mesh.tensor == 0 else config.num_heads
    attention = ATTENTION_COPIES * rows * heads * seq_len // mesh.context * min(ATTENTION_BLOCK, seq_len) * 4
    gathered = gathered_head = 0
    shards = mesh.fsdp * mesh.context  # weights are sharded (and gathered) over context as over fsdp
    if shards > 1:
        unsharded = max(param_bytes, activation_bytes) * (1 - 1 / shards)
        gathered = GATHER_COPIES * layer_param_elements(config, mesh) / mesh.tensor * unsharded
        head = config.vocab_size * config.hidden_size / mesh.tensor / mesh.stage
        gathered_head = HEAD_COPIES["micro-batches" if micro_batches > 1 else "one batch"] * head * unsharded
    batch = 4 * 4 * batch_size * seq_len // mesh.batch_shards // mesh.context
    terms = {
        "parameters": p,
        "gradients": p * (2 if micro_batches > 1 and mesh.stage == 1 else 1),  # a pipeline sums inside its scan
        "optimizer": 2 * p,
        "activations": activations,
        "recompute": recompute,
        "attention": attention,
        "logits": logits,
        "gathered": gathered,
        "gathered head": gathered_head,
        "tied table": tied_table(config, mesh),
        "temporaries": UPDATE_COPIES * p + batch + CODE_BYTES,
        "pipeline": pipeline_buffers(config, batch_size, seq_len, mesh, activation_bytes),
        "gathered kv": context_kv(config, rows, seq_len, mesh),
        "experts": experts_bytes(config, tokens, mesh, layers, remat, activation_bytes, family, base_bytes),
    }
    if lora is not None:
        terms = lora_peak(terms | lora_terms(config, lora, mesh, tokens, micro_batches=micro_batches, remat=remat,
                                             base_bytes=base_bytes, activation_bytes=activation_bytes, batch=batch),
                          remat)
    if offload_optimizer and family != "cpu":
        terms["optimizer"] = min(terms["optimizer"], 2 * largest_shard_elements(config, mesh) * param_bytes)
    terms = {k: int(v) for k, v in family_scaled(terms, family, step_modes(mesh, micro_batches, remat, loss)).items()}
    terms["total"] = sum(terms.values())
    return terms


def tied_table(config: ModelConfig, mesh: MeshShape) -> float:
    """Under FSDP, a tied embedding's float32 gradient held whole (0 for untied tables or without FSDP)."""
    if not config.tie_word_embeddings or mesh.fsdp == 1:
        return 0.0
    return TIED_COPIES * config.vocab_size * config.hidden_size / mesh.tensor / mesh.stage * 4


def held_layers(config: ModelConfig, mesh: MeshShape, micro_batches: int, remat: str) -> float:
    """Layers' worth of one micro-batch's saved activations a device holds at the peak: every layer
    without a pipeline; under one, a stage's layers for every tick (micro-batches + stages − 1), or
    with remat full (which recomputes whole stages) one input per tick and one stage's layers."""
    ticks, stage_layers = micro_batches + mesh.stage - 1, config.num_layers / mesh.stage
    if mesh.stage == 1:
        return config.num_layers
    if remat == "full":
        return ticks + stage_layers
    return ticks * stage_layers


def pipeline_buffers(config: ModelConfig, batch_size: int, seq_len: int, mesh: MeshShape,
                     activation_bytes: int) -> float:
    """A pipeline's [batch, length, embed] buffers per device: the stages' inputs and outputs of every
    micro-batch (or their gradients in backward; none without a pipeline)."""
    if mesh.stage == 1:
        return 0.0
    return (PIPELINE_COPIES * batch_size // mesh.batch_shards * seq_len // mesh.context * config.hidden_size
            * activation_bytes)


def context_kv(config: ModelConfig, rows: int, seq_len: int, mesh: MeshShape) -> float:
    """Context parallelism: one layer's keys and values gathered over the whole sequence (forward, and
    again in backward, with the float32 copies and gradients the blockwise backward accumulates; 0 without)."""
    if mesh.context == 1:
        return 0.0
    kv_heads = config.num_kv_heads // mesh.tensor if config.num_kv_heads % mesh.tensor == 0 else config.num_kv_heads
    return CONTEXT_KV_COPIES * rows * seq_len * 2 * kv_heads * config.head_dim * 4


# LoRA: the frozen base has no gradient and no optimizer state, and is gathered (FSDP) without a
# gradient to reduce-scatter; under remat "none" each target's dropped-out input is kept for its
# adapter's backward, under the other policies one layer's dropout masks are drawn at a time. On a
# backend that computes bfloat16 in float32 (XLA:CPU, where plans are verified) the layers' 16-bit
# base is bit-copied once per step (models/lora.py, `frozen_as_bits`: the alternative, XLA:CPU
# converting the stacked base to float32 to slice it, is twice that) and the frozen embedding and
# head are upcast whole. With no weight gradients the step's peak is either at the loss (logits, the
# head) or in backward's layers (their working set, dropout masks, gathered weights), never both.
# Fitted like the rest against XLA's compiled memory (the LoRA cases of memory_model_check.py).
LORA_SAVED = {"none": 0.942, "matmuls": 1.36, "full": 1.2}  # LoRA's share of full fine-tuning's saved activations
LORA_SCALES = {"recompute": 1.77, "logits": 0.614, "attention": 1.5}  # likewise, of these terms
LORA_GATHER_COPIES = 0.524  # a layer's gathered base weights
LORA_HEAD_COPIES = 1.46  # the embedding and head in float32 while the head runs
LORA_DROPOUT_COPIES = 0.911  # per target's input element kept for backward (remat "none", dropout > 0)
LORA_MASK_COPIES = 3.84  # per target's input element of one layer: its dropout mask's random bits (remat on)


def lora_peak(terms: dict[str, float], remat: str) -> dict[str, float]:
    """LoRA's terms as they stand at the peak: scaled from full fine-tuning's, and of the loss's side
    and the layers' side only the larger (the other side's terms are 0)."""
    terms = terms | {k: v * terms[k] for k, v in LORA_SCALES.items()}
    terms["activations"] *= LORA_SAVED[remat]
    loss_side = ("logits", "head")
    layer_side = ("recompute", "attention", "gathered") + (() if remat == "none" else ("lora dropout",))
    smaller = min((loss_side, layer_side), key=lambda side: sum(terms[k] for k in side))
    return terms | {k: 0 for k in smaller}


def lora_terms(config: ModelConfig, lora: LoraConfig, mesh: MeshShape, tokens: int, *, micro_batches: int,
               remat: str, base_bytes: int, activation_bytes: int, batch: int) -> dict[str, float]:
    """The terms that LoRA changes: parameters (base in `base_bytes`, float32 adapters), the adapters'
    gradients and Adam moments, the dropout inputs or masks, the base's gathered weights and bit copy."""
    base = sharded_param_elements(config, mesh) * base_bytes
    layers = tuple(v for v in param_shapes(config).values() if v[1][:1] == ("layers",))
    adapters = _sharded_elements(tuple(adapter_shapes(config, lora).values()), mesh) * 4
    inputs = sum(math.prod(in_shape) / (1 if names == ("embed",) else mesh.tensor)
                 for in_shape, names, _, _ in weight_axes(config, lora.targets).values())
    dropout = 0.0
    if lora.dropout:
        dropout = (LORA_DROPOUT_COPIES * config.num_layers * tokens * inputs * activation_bytes if remat == "none"
                   else LORA_MASK_COPIES * tokens * inputs * 4)
    head = config.vocab_size * config.hidden_size / mesh.tensor / mesh.stage
    shards = mesh.fsdp * mesh.context  # the base is sharded (and gathered) over context as over fsdp
    head = LORA_HEAD_COPIES * head * 4 if base_bytes < 4 or shards > 1 else 0.0  # upcast, or gathered whole
    gathered = 0.0
    if shards > 1:
        layer = layer_param_elements(config, mesh) / mesh.tensor
        gathered = LORA_GATHER_COPIES * layer * max(base_bytes, activation_bytes) * (1 - 1 / shards)
    return {"parameters": base + adapters, "gradients": adapters * (2 if micro_batches > 1 else 1),
            "optimizer": 2 * adapters, "lora dropout": dropout, "gathered": gathered, "gathered head": 0.0,
            "head": head,
            "base copy": _sharded_elements(layers, mesh) * base_bytes if base_bytes < 4 else 0.0,
            "temporaries": UPDATE_COPIES * adapters + batch + CODE_BYTES}
