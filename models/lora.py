"""LoRA: small trained adapters on a frozen base model.

    model = apply_lora(Decoder(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16), LoraConfig(r=8, alpha=16))

Every parameter of the base becomes `Frozen`, stored in the model's compute dtype: it is not an
`nnx.Param`, so `nnx.split(model, nnx.Param, ...)` leaves it out of what is trained (no gradient, no
optimizer state). Each target projection gets an `Adapter`: float32 parameters A [*in, r] and B
[r, *out], stacked over layers like the weight they adapt, B zero so the adapted model starts as the
base. A projection computes

    y = x W + (alpha / r) · (dropout(x) A) B

as two low-rank matmuls, never the full-size update. A carries the weight's input axis names and B
its output names (with `rank`, never split between them), so adapters are sharded like their base.

In a Mixture-of-Experts model "gate", "up" and "down" adapt every expert's projections, one adapter per expert
(A [layers, experts, in, r], B [layers, experts, r, out], split over the `expert` mesh axis with the experts;
models/moe.py runs them beside each expert's weights). They have no dropout: an expert sees only the tokens routed
to it, and PEFT's adapters on fused experts (`target_parameters`) refuse dropout too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moai_jax.errors import LoraError
from moai_jax.models.config import ModelConfig

# --lora-targets name → (block part, weight, the projection's name in the model, Hugging Face module)
TARGETS = {
    "q": ("attention", "q_proj", "query", "self_attn.q_proj"),
    "k": ("attention", "k_proj", "key", "self_attn.k_proj"),
    "v": ("attention", "v_proj", "value", "self_attn.v_proj"),
    "o": ("attention", "o_proj", "out", "self_attn.o_proj"),
    "gate": ("mlp", "gate_proj", "gate", "mlp.gate_proj"),
    "up": ("mlp", "up_proj", "up", "mlp.up_proj"),
    "down": ("mlp", "down_proj", "down", "mlp.down_proj"),
}
_GOLDEN = 0x9E3779B1  # odd multipliers that spread a batch's tokens and a layer's index over 32 bits
_MIX = 0x85EBCA77


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank `r`, scale `alpha / r`, dropout on the adapters' input, the target projections, the adapters' seed."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = tuple(TARGETS)
    seed: int = 0

    def __post_init__(self) -> None:
        targets = self.targets.split(",") if isinstance(self.targets, str) else self.targets
        object.__setattr__(self, "targets", tuple(t.strip() for t in targets))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise LoraError(f"LoRA rank {self.r!r} must be a whole number >= 1, e.g. --lora-r 8")
        if not self.alpha > 0:
            raise LoraError(f"LoRA alpha {self.alpha!r} must be positive, e.g. --lora-alpha 16")
        if not 0 <= self.dropout < 1:
            raise LoraError(f"LoRA dropout {self.dropout!r} must be in [0, 1), e.g. --lora-dropout 0.05")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            what = f"unknown LoRA target(s) {', '.join(map(repr, unknown))}" if unknown else "LoRA targets " + repr(
                ",".join(self.targets))
            raise LoraError(f"{what}; name each of {','.join(TARGETS)} at most once, e.g. --lora-targets q,v")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def check(self, config: ModelConfig) -> None:
        """A LoraError when the rank exceeds a target weight's smaller side."""
        for target, (in_shape, _, out_shape, _) in weight_axes(config, self.targets).items():
            smallest = min(math.prod(in_shape), math.prod(out_shape))
            if self.r > smallest:
                raise LoraError(f"LoRA rank {self.r} exceeds the smaller side ({smallest}) of the {target} projection "
                                f"({math.prod(in_shape)} × {math.prod(out_shape)}); use --lora-r {smallest} or less")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}


def add_arguments(parser) -> None:
    """The scripts' LoRA flags, one block."""
    parser.add_argument("--use-lora", action="store_true",
                        help="train LoRA adapters on the frozen model instead of the model itself")
    parser.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default 8)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator: updates are scaled by "
                                                                       "alpha / r (default 16)")
    parser.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapters' input (default 0.05)")
    parser.add_argument("--lora-targets", default=None,
                        help=f"comma-separated projections to adapt (default {','.join(TARGETS)})")


def from_arguments(args) -> LoraConfig | None:
    """The LoraConfig the flags ask for, or None without --use-lora (a LoraError if LoRA flags come without it)."""
    given = {name: getattr(args, f"lora_{name}") for name in ("r", "alpha", "dropout", "targets")}
    given = {k: v for k, v in given.items() if v is not None}
    if not args.use_lora:
        if given:
            raise LoraError(f"--lora-{next(iter(given))} needs --use-lora; add --use-lora or drop the LoRA options")
        return None
    return LoraConfig(**given, seed=getattr(args, "seed", 0))


def on_experts(config: ModelConfig, target: str) -> bool:
    """Whether `target` adapts the experts of a Mixture-of-Experts model (one adapter per expert)."""
    return bool(config.num_experts) and TARGETS[target][0] == "mlp"


def weight_axes(config: ModelConfig, targets=tuple(TARGETS)) -> dict[str, tuple]:
    """target → (input shape, input names, output shape, output names) of its weight in one layer (of one expert)."""
    c = config
    e, n, k, h, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.expert_size
    axes = {
        "q": ((e,), ("embed",), (n, h), ("heads", "head_dim")),
        "k": ((e,), ("embed",), (k, h), ("kv_heads", "head_dim")),
        "v": ((e,), ("embed",), (k, h), ("kv_heads", "head_dim")),
        "o": ((n, h), ("heads", "head_dim"), (e,), ("embed",)),
        "gate": ((e,), ("embed",), (f,), ("mlp",)),
        "up": ((e,), ("embed",), (f,), ("mlp",)),
        "down": ((f,), ("mlp",), (e,), ("embed",)),
    }
    return {t: axes[t] for t in targets}


def adapter_shapes(config: ModelConfig, lora: LoraConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Every adapter parameter's shape and logical names (stacked over layers), as `apply_lora` creates them."""
    shapes = {}
    for target, (in_shape, in_names, out_shape, out_names) in weight_axes(config, lora.targets).items():
        lead, names = ((config.num_layers, config.num_experts), ("layers", "experts")) if on_experts(
            config, target) else ((config.num_layers,), ("layers",))
        shapes[f"{target}.a"] = ((*lead, *in_shape, lora.r), (*names, *in_names, "rank"))
        shapes[f"{target}.b"] = ((*lead, lora.r, *out_shape), (*names, "rank", *out_names))
    return shapes


def adapter_param_count(config: ModelConfig, lora: LoraConfig, active: bool = False,
                        experts_only: bool = False) -> int:
    """The adapters' parameters; `active`: those one token uses (of the experts' adapters, its k experts');
    `experts_only`: only the experts' adapters."""
    used = config.num_experts_per_tok / config.num_experts if active and config.num_experts else 1
    counted = ((shape, on_experts(config, name.split(".")[0]))
               for name, (shape, _) in adapter_shapes(config, lora).items())
    return round(sum(math.prod(shape) * (used if experts else 1) for shape, experts in counted
                     if experts or not experts_only))


def flops_per_token(config: ModelConfig, seq_len: int, lora: LoraConfig) -> float:
    """Training FLOPs per token under LoRA: the base's matmuls forward and their input gradients
    backward (4 · N_matmul, no weight gradients: about 2/3 of full fine-tuning's 6 · N_matmul),
    attention as in full fine-tuning, and the adapters' two matmuls with every gradient (6 · N_adapter, of a
    Mixture-of-Experts model's expert adapters those of the k experts a token is routed to)."""
    from moai_jax.models.config import flops_per_token as full_flops

    c = config
    matmul_params = (full_flops(c, seq_len) - 6 * c.num_layers * seq_len * c.num_heads * c.head_dim) / 6
    attention = 6 * c.num_layers * seq_len * c.num_heads * c.head_dim
    return float(4 * matmul_params + attention + 6 * adapter_param_count(config, lora, active=True))


class Frozen(nnx.Variable):
    """A base weight under LoRA: kept fixed, so it has no gradient and no optimizer state."""


class DropoutSeed(nnx.Variable):
    """Per layer, the seed of an adapter's dropout mask (set from the batch on every forward pass)."""


class Adapter(nnx.Module):
    """`scale · (dropout(x) A) B` for one projection, its parameters stacked over the layers."""

    def __init__(self, a, a_names, b_shape, b_names, *, scale: float, rate: float, seeds):
        self.a = nnx.Param(a, out_sharding=a_names, eager_sharding=False)
        self.b = nnx.Param(jnp.zeros(b_shape, jnp.float32), out_sharding=b_names, eager_sharding=False)
        self.seed = DropoutSeed(seeds)
        self.scale, self.rate, self.deterministic = scale, rate, False

    def __call__(self, x):
        a, b = self.a[...].astype(x.dtype), self.b[...].astype(x.dtype)
        if self.rate and not self.deterministic:
            keep = jax.random.bernoulli(jax.random.key(self.seed[...]), 1 - self.rate, x.shape)
            x = jnp.where(keep, x / (1 - self.rate), 0).astype(x.dtype)
        xa = jnp.tensordot(x, a, axes=a.ndim - 1)  # [..., r]: contract the weight's input axes
        return jnp.tensordot(xa * jnp.asarray(self.scale, x.dtype), b, axes=1)


def adapt(module: nnx.Module, projection: str, x, y):
    """`y = x W` plus the LoRA update of `projection` ("query", "gate", ...) when `module` carries one."""
    adapter = getattr(module, f"lora_{projection}", None)
    return y if adapter is None else y + adapter(x)


def adapters(model) -> dict[str, Adapter]:
    """target → the Adapter that `apply_lora` put on it."""
    out = {}
    for target, (part, _, projection, _) in TARGETS.items():
        adapter = getattr(getattr(model.layers, part), f"lora_{projection}", None)
        if adapter is not None:
            out[target] = adapter
    return out


def seed_dropout(layer_state: nnx.State, input_ids_BT) -> nnx.State:
    """The stacked layers' state with every adapter's dropout seeded from the batch's tokens, so masks
    differ from batch to batch and micro-batch to micro-batch yet are the same on every mesh (an
    integer sum is exact however the batch is split). Nothing is mutated."""
    found = [(part, key) for part in ("attention", "mlp") if part in layer_state
             for key in layer_state[part] if str(key).startswith("lora_")]
    if not found:
        return layer_state
    b, t = input_ids_BT.shape
    place = jnp.arange(b * t, dtype=jnp.uint32).reshape(b, t) * jnp.uint32(_GOLDEN) + jnp.uint32(1)
    batch = jnp.sum(input_ids_BT.astype(jnp.uint32) * place, dtype=jnp.uint32) * jnp.uint32(_MIX)
    state = nnx.State({k: (nnx.State(dict(v)) if k in ("attention", "mlp") else v) for k, v in layer_state.items()})
    for part, key in found:
        adapter = nnx.State(dict(state[part][key]))
        adapter["seed"] = DropoutSeed(adapter["seed"][...] + batch)
        state[part][key] = adapter
    return state


def _map_frozen(state, fn):
    leaves, tree = jax.tree.flatten(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    leaves = [leaf.replace(fn(leaf.get_value())) if isinstance(leaf, Frozen) else leaf for leaf in leaves]
    return jax.tree.unflatten(tree, leaves)


def frozen_as_bits(layer_state):
    """The stacked layers' frozen 16-bit weights as raw bits (uint16), for the layer loop to slice.

    A backend that computes bfloat16 in float32 (XLA:CPU, where plans are verified) would otherwise
    convert the whole stacked base once, ahead of the loop: a float32 copy of every layer that a GPU
    never makes. Sliced as bits, one layer at a time is converted; on a GPU the bitcasts are free."""
    return _map_frozen(layer_state, lambda w: jax.lax.bitcast_convert_type(w, jnp.uint16) if w.dtype.itemsize == 2
                       else w)


def frozen_from_bits(state, dtype):
    """One layer's state with its frozen weights back in `dtype` (the model's compute dtype)."""
    return _map_frozen(state, lambda w: jax.lax.bitcast_convert_type(w, dtype) if w.dtype == jnp.uint16 else w)


def apply_lora(model, lora: LoraConfig):
    """`model` (a moai_jax Decoder) with every base parameter frozen in its compute dtype and adapters on
    `lora.targets`; changed in place and returned. Works on abstract models and under jit."""
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig) or not hasattr(model, "layers"):
        raise LoraError(f"LoRA adapts moai_jax's own decoder models, not {type(model).__name__}")
    lora.check(config)
    for _, module in nnx.iter_modules(model):
        for name, value in list(vars(module).items()):
            if isinstance(value, nnx.Param) and not isinstance(value, Frozen):
                meta = {k: v for k, v in value.get_metadata().items() if k in ("out_sharding", "eager_sharding")}
                setattr(module, name, Frozen(value[...].astype(model.dtype), **meta))
    key = jax.random.key(lora.seed)
    shapes = adapter_shapes(config, lora)
    layers = jnp.arange(config.num_layers, dtype=jnp.uint32)
    for i, target in enumerate(lora.targets):
        part, _, projection, _ = TARGETS[target]
        a_shape, a_names = shapes[f"{target}.a"]
        b_shape, b_names = shapes[f"{target}.b"]
        experts = on_experts(config, target)
        bound = 1 / math.sqrt(math.prod(a_shape[1 + experts:-1]))  # PyTorch's Linear init, as PEFT draws A
        a = jax.random.uniform(jax.random.fold_in(key, i), a_shape, jnp.float32, -bound, bound)
        seeds = (jnp.uint32(i) * config.num_layers + layers) * jnp.uint32(_GOLDEN)
        setattr(getattr(model.layers, part), f"lora_{projection}", Adapter(
            a, a_names, b_shape, b_names, scale=lora.scale, rate=0.0 if experts else lora.dropout, seeds=seeds))
    return model


def adapted(model, lora: LoraConfig | None):
    """A model, or a function that builds one, with LoRA applied (unchanged when `lora` is None)."""
    if lora is None:
        return model
    if isinstance(model, nnx.Module):
        return apply_lora(model, lora)
    builder: Callable[[], Any] = model
    return lambda: apply_lora(builder(), lora)


def is_adapter_path(path: tuple) -> bool:
    """Whether a state path lies inside an adapter (anything else in a LoRA model is the frozen base)."""
    return any(str(key).startswith("lora_") for key in path)


def split_base(tree: dict) -> tuple[dict, dict]:
    """A pure dict of a LoRA model's non-trained state → (the frozen base, the adapters' part)."""
    base, own = {}, {}
    for key, value in tree.items():
        if str(key).startswith("lora_"):
            own[key] = value
        elif isinstance(value, dict):
            b, o = split_base(value)
            if b:
                base[key] = b
            if o:
                own[key] = o
        else:
            base[key] = value
    return base, own


def join(a: dict, b: dict) -> dict:
    """Two disjoint nested dicts as one."""
    out = dict(a)
    for key, value in b.items():
        out[key] = join(out[key], value) if key in out and isinstance(value, dict) else value
    return out


def merge(model):
    """A plain Decoder whose weights are W + (alpha / r) A B, in float32: the LoRA model without adapters."""
    from moai_jax.models.llama import Decoder

    found = adapters(model)
    if not found:
        raise LoraError("the model has no LoRA adapters to merge")
    merged = nnx.eval_shape(lambda: Decoder(model.config, rngs=nnx.Rngs(0), dtype=model.dtype))
    graphdef, params, rest = nnx.split(merged, nnx.Param, ...)
    values = jax.tree.map(lambda w: w.astype(jnp.float32), nnx.to_pure_dict(nnx.state(model, Frozen)))
    for target, adapter in found.items():
        part, weight, _, _ = TARGETS[target]
        product = lambda a, b: jnp.tensordot(a, b, axes=1, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
        for _ in range(1 + on_experts(model.config, target)):  # over the layers (and the experts)
            product = jax.vmap(product)
        delta = product(adapter.a[...], adapter.b[...]) * adapter.scale
        values["layers"][part][weight] = values["layers"][part][weight] + delta
    nnx.replace_by_pure_dict(params, values)
    return nnx.merge(graphdef, params, rest)
