"""Hugging Face checkpoints ↔ Decoder parameters.

`load_pretrained` builds the Decoder abstractly, then reads each safetensors tensor on its own,
turns it into the Decoder's layout (stacked over layers, heads split out, [in, out] matmuls) and
places it straight onto its target sharding, so a checkpoint never sits whole on one device.
`save_pretrained` writes the reverse, gathering one layer of one parameter at a time. Each family
names its tensors its own way (`_family_tensors`); fused projections (GPT-2's c_attn, Baichuan's
W_pack) are split into q/k/v on the way in and joined on the way out. Mixture-of-Experts layers'
names and layouts are in `hf_moe.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from moai_jax.errors import DataError, WeightsError
from moai_jax.models import hf_moe
from moai_jax.models.config import ModelConfig, dtype_from_name
from moai_jax.models.llama import Decoder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a Hugging Face tensor becomes a Decoder parameter (per layer) and back."""

    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    fused_axis: int = 0  # where a fused Hugging Face tensor (q, k, v side by side) joins its parts


def _layouts(head_dim: int) -> dict[str, _Layout]:
    return {
        "same": _Layout(lambda a: a, lambda a: a, lambda s: s),
        "transposed": _Layout(lambda a: a.T, lambda a: a.T, lambda s: s[::-1]),
        # q/k/v: HF [heads * head_dim, embed] ↔ ours [embed, heads, head_dim]
        "into_heads": _Layout(
            lambda a: a.T.reshape(a.shape[1], -1, head_dim),
            lambda a: a.reshape(a.shape[0], -1).T,
            lambda s: (s[1] * s[2], s[0]),
        ),
        # o: HF [embed, heads * head_dim] ↔ ours [heads, head_dim, embed]
        "from_heads": _Layout(
            lambda a: a.T.reshape(-1, head_dim, a.shape[0]),
            lambda a: a.reshape(-1, a.shape[-1]).T,
            lambda s: (s[2], s[0] * s[1]),
        ),
        # q/k/v bias: HF [heads * head_dim] ↔ ours [heads, head_dim]
        "bias": _Layout(lambda a: a.reshape(-1, head_dim), lambda a: a.reshape(-1), lambda s: (s[0] * s[1],)),
        # GPT-2's Conv1D stores [in, out]: q/k/v [embed, heads * head_dim], o [heads * head_dim, embed]
        "conv_into_heads": _Layout(
            lambda a: a.reshape(a.shape[0], -1, head_dim),
            lambda a: a.reshape(a.shape[0], -1),
            lambda s: (s[0], s[1] * s[2]),
            fused_axis=1,
        ),
        "conv_from_heads": _Layout(
            lambda a: a.reshape(-1, head_dim, a.shape[1]),
            lambda a: a.reshape(-1, a.shape[-1]),
            lambda s: (s[0] * s[1], s[2]),
        ),
        "experts_fused": _Layout(**hf_moe.FUSED_LAYOUT),
    }


_LAYER_TENSORS = {  # Hugging Face name inside model.layers.{i} → (Decoder path inside layers, layout)
    "self_attn.q_proj.weight": (("attention", "q_proj"), "into_heads"),
    "self_attn.k_proj.weight": (("attention", "k_proj"), "into_heads"),
    "self_attn.v_proj.weight": (("attention", "v_proj"), "into_heads"),
    "self_attn.o_proj.weight": (("attention", "o_proj"), "from_heads"),
    "self_attn.q_proj.bias": (("attention", "q_bias"), "bias"),
    "self_attn.k_proj.bias": (("attention", "k_bias"), "bias"),
    "self_attn.v_proj.bias": (("attention", "v_bias"), "bias"),
    "mlp.gate_proj.weight": (("mlp", "gate_proj"), "transposed"),
    "mlp.up_proj.weight": (("mlp", "up_proj"), "transposed"),
    "mlp.down_proj.weight": (("mlp", "down_proj"), "transposed"),
    "input_layernorm.weight": (("input_norm", "weight"), "same"),
    "post_attention_layernorm.weight": (("post_attention_norm", "weight"), "same"),
    "self_attn.q_norm.weight": (("attention", "q_norm", "weight"), "same"),  # Qwen3
    "self_attn.k_norm.weight": (("attention", "k_norm", "weight"), "same"),
}
_MODEL_TENSORS = {
    "model.embed_tokens.weight": (("embedding",), "same"),
    "model.norm.weight": (("final_norm", "weight"), "same"),
    "lm_head.weight": (("lm_head",), "transposed"),
}
_QKV = ("q_proj", "k_proj", "v_proj")
_GPT2_LAYER = {  # a list of parts: one fused tensor, split equally along the layout's fused_axis
    "ln_1.weight": (("input_norm", "weight"), "same"),
    "ln_1.bias": (("input_norm", "bias"), "same"),
    "attn.c_attn.weight": [(("attention", name), "conv_into_heads") for name in _QKV],
    "attn.c_attn.bias": [(("attention", name), "bias") for name in ("q_bias", "k_bias", "v_bias")],
    "attn.c_proj.weight": (("attention", "o_proj"), "conv_from_heads"),
    "attn.c_proj.bias": (("attention", "o_bias"), "same"),
    "ln_2.weight": (("post_attention_norm", "weight"), "same"),
    "ln_2.bias": (("post_attention_norm", "bias"), "same"),
    "mlp.c_fc.weight": (("mlp", "up_proj"), "same"),
    "mlp.c_fc.bias": (("mlp", "up_bias"), "same"),
    "mlp.c_proj.weight": (("mlp", "down_proj"), "same"),
    "mlp.c_proj.bias": (("mlp", "down_bias"), "same"),
}
_GPT2_MODEL = {
    "transformer.wte.weight": (("embedding",), "same"),
    "transformer.wpe.weight": (("position_embedding",), "same"),
    "transformer.ln_f.weight": (("final_norm", "weight"), "same"),
    "transformer.ln_f.bias": (("final_norm", "bias"), "same"),
    "lm_head.weight": (("lm_head",), "transposed"),
}
_GEMMA2_NORMS = {  # Gemma 2's post_attention_layernorm norms the attention's output; ours is the MLP's input norm
    "post_attention_layernorm.weight": (("attention_output_norm", "weight"), "same"),
    "pre_feedforward_layernorm.weight": (("post_attention_norm", "weight"), "same"),
    "post_feedforward_layernorm.weight": (("mlp_output_norm", "weight"), "same"),
}
_BAICHUAN_LAYER = {
    **{k: v for k, v in _LAYER_TENSORS.items() if not k.startswith(("self_attn.q_", "self_attn.k_", "self_attn.v_"))},
    "self_attn.W_pack.weight": [(("attention", name), "into_heads") for name in _QKV],
}
# GPT-2 as OpenAI published it: no "transformer." prefix, and causal-mask buffers saved with the weights.
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")


def _family_tensors(config: ModelConfig, fused_experts: bool = False) -> tuple[dict, str, dict]:
    """(model-level tensors, the per-layer prefix, per-layer tensors) of a family's checkpoints."""
    model_type = config.model_type
    if config.num_experts:
        return _MODEL_TENSORS, "model.layers.{i}.", hf_moe.moe_layer_tensors(
            model_type, config.family.experts_prefix, _LAYER_TENSORS, fused_experts)
    if model_type == "gpt2":
        return _GPT2_MODEL, "transformer.h.{i}.", _GPT2_LAYER
    if model_type == "gemma2":
        return _MODEL_TENSORS, "model.layers.{i}.", _LAYER_TENSORS | _GEMMA2_NORMS
    if model_type == "baichuan":
        return _MODEL_TENSORS, "model.layers.{i}.", _BAICHUAN_LAYER
    return _MODEL_TENSORS, "model.layers.{i}.", _LAYER_TENSORS


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One Decoder parameter and the Hugging Face tensor(s) it comes from: one per layer when stacked."""

    path: tuple[str, ...]
    hf_names: tuple[str, ...]
    layout: _Layout
    stacked: bool
    part: tuple[int, int] = (0, 1)  # (which, of how many) parts of a fused Hugging Face tensor
    experts: int = 0  # > 0: each layer's parameter stacks this many tensors, one per expert (hf_names layer-major)

    def hf_part(self, array: np.ndarray) -> np.ndarray:
        """This parameter's part of a (possibly fused) Hugging Face tensor."""
        which, count = self.part
        return array if count == 1 else np.split(array, count, axis=self.layout.fused_axis)[which]


def _tensors(config: ModelConfig, params: dict, fused_experts: bool = False) -> list[_Tensor]:
    """The parameters present in `params` (a pure dict of the Decoder's state), in Hugging Face order."""
    layouts = _layouts(config.head_dim)
    model_tensors, prefix, layer_tensors = _family_tensors(config, fused_experts)
    tensors = [_Tensor(path, (name,), layouts[kind], False) for name, (path, kind) in model_tensors.items()]
    for name, parts in layer_tensors.items():
        parts = parts if isinstance(parts, list) else [parts]
        experts = config.num_experts if hf_moe.EXPERT in name else 0
        names = tuple(prefix.format(i=i) + name.format(e=e) for i in range(config.num_layers)
                      for e in range(max(experts, 1)))
        tensors += [_Tensor(("layers", *path), names, layouts[kind], True, (which, len(parts)), experts)
                    for which, (path, kind) in enumerate(parts)]
    return [t for t in tensors if _has(params, t.path)]


def _has(tree: dict, path: tuple[str, ...]) -> bool:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


class _Checkpoint:
    """The safetensors files of a model directory, opened once; tensors are read one at a time."""

    def __init__(self, path: Path, stack: contextlib.ExitStack):
        index = path / INDEX_FILE
        if index.is_file():
            self.source = str(index)
            try:
                files = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise WeightsError(f"{index} is not a safetensors index with a 'weight_map': {e}") from e
        elif (path / SINGLE_FILE).is_file():
            self.source = str(path / SINGLE_FILE)
            files = None
        else:
            raise WeightsError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in {path}; moai_jax reads safetensors weights "
                "(save the model with transformers' save_pretrained(..., safe_serialization=True))"
            )
        handles = {}
        for file in sorted(set(files.values())) if files else [SINGLE_FILE]:
            if not (path / file).is_file():
                raise WeightsError(f"{self.source} names {file}, which is missing from {path}")
            handles[file] = stack.enter_context(safe_open(str(path / file), framework="numpy"))
        if files is None:
            files = {name: SINGLE_FILE for name in handles[SINGLE_FILE].keys()}
        self.path, self.files, self.handles = path, files, handles
        self.stored: dict[str, str] = {}  # our name → the name in the file, where they differ

    def add_missing_prefix(self, prefix: str, marker: str) -> None:
        """Checkpoints saved from a base model (OpenAI's GPT-2: "wte.weight") lack the prefix the LM head adds."""
        if marker in self.files and prefix + marker not in self.files:
            self.stored = {prefix + name: name for name in self.files}
            self.files = {prefix + name: file for name, file in self.files.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        name_in_file = self.stored.get(name, name)
        return tuple(self.handles[self.files[name]].get_slice(name_in_file).get_shape())

    def read(self, name: str) -> np.ndarray:
        return self.handles[self.files[name]].get_tensor(self.stored.get(name, name))

    def check(self, config: ModelConfig, tensors: list[_Tensor], params: dict) -> None:
        """Every expected tensor is there with the shape config.json implies, and nothing else."""
        expected = set()
        for tensor in tensors:
            our_shape = _get(params, tensor.path).shape[(1 if tensor.stacked else 0) + (1 if tensor.experts else 0):]
            want = list(tensor.layout.hf_shape(tuple(our_shape)))
            want[tensor.layout.fused_axis] *= tensor.part[1]
            want = tuple(want)
            for name in tensor.hf_names:
                expected.add(name)
                if name not in self.files:
                    raise WeightsError(
                        f"{self.source} has no tensor {name!r}, which a {config.model_type} model with this "
                        f"config.json needs; re-export the checkpoint or fix config.json in {self.path}"
                    )
                got = self.shape(name)
                if got != want:
                    raise WeightsError(
                        f"{self.path / self.files[name]}: tensor {name!r} has shape {list(got)}, but config.json "
                        f"implies {list(want)} (hidden_size={config.hidden_size}, num_attention_heads="
                        f"{config.num_heads}, num_key_value_heads={config.num_kv_heads}, head_dim={config.head_dim}, "
                        f"intermediate_size={config.intermediate_size}, vocab_size={config.vocab_size}"
                        + (f", num_experts={config.num_experts}, moe_intermediate_size={config.expert_size}"
                           if config.num_experts else "") + "); "
                        "make config.json match the weights"
                    )
        ignored = {"lm_head.weight"} if config.tie_word_embeddings else set()
        extra = sorted(n for n in self.files if n not in expected | ignored
                       and not n.endswith(_IGNORED_SUFFIXES + (_GPT2_BUFFERS if config.model_type == "gpt2" else ())))
        if extra:
            raise WeightsError(
                f"{self.source} has tensors a {config.model_type} model with this config.json does not use: "
                f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}; check model_type and config.json"
            )

    def host_slice(self, tensor: _Tensor, index: tuple[slice, ...], dtype) -> np.ndarray:
        """The part `index` of a Decoder parameter, read from the checkpoint layer by layer."""
        if not tensor.stacked:
            return tensor.layout.to_ours(tensor.hf_part(self.read(tensor.hf_names[0])))[index].astype(dtype)
        if tensor.experts:
            return hf_moe.stacked_experts(self.read, tensor.hf_names, tensor.experts, tensor.layout.to_ours, index,
                                          dtype)
        names = tensor.hf_names[index[0]]
        layers = [tensor.layout.to_ours(tensor.hf_part(self.read(name)))[index[1:]].astype(dtype) for name in names]
        return np.stack(layers)


def _place(checkpoint: _Checkpoint, tensor: _Tensor, shape, dtype, sharding) -> jax.Array:
    whole = (slice(None),) * len(shape)
    if sharding is None:
        return jnp.asarray(checkpoint.host_slice(tensor, whole, dtype))
    read: dict[str, np.ndarray] = {}  # devices that hold the same part share one read

    def part(index):
        key = repr([(s.start, s.stop, s.step) for s in index])
        if key not in read:
            read[key] = checkpoint.host_slice(tensor, index, dtype)
        return read[key]

    return jax.make_array_from_callback(tuple(shape), sharding, part)


def load_pretrained(path: str | Path, dtype=jnp.float32, param_dtype=jnp.float32, shardings=None,
                    **decoder_kwargs) -> Decoder:
    """A Decoder with the weights of a Hugging Face directory (config.json + safetensors).

    `dtype` is the compute dtype, `param_dtype` the storage dtype (names like "bfloat16" work too).
    `shardings`, a pytree shaped like `nnx.state(model, nnx.Param)` (e.g. of NamedSharding), places
    each tensor straight onto its devices; without it parameters go to the default device.
    """
    path = Path(path)
    config = ModelConfig.from_pretrained(path)
    dtype, param_dtype = dtype_from_name(dtype), dtype_from_name(param_dtype)
    abstract = nnx.eval_shape(
        lambda: Decoder(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, **decoder_kwargs)
    )
    graphdef, state = nnx.split(abstract)
    params = nnx.to_pure_dict(state)
    targets = nnx.to_pure_dict(shardings) if isinstance(shardings, nnx.State) else shardings
    with contextlib.ExitStack() as stack:
        checkpoint = _Checkpoint(path, stack)
        tensors = _tensors(config, params, fused_experts=hf_moe.is_fused(checkpoint.files))
        if config.model_type == "gpt2":
            checkpoint.add_missing_prefix("transformer.", "wte.weight")
        checkpoint.check(config, tensors, params)
        for tensor in tensors:
            target = _get(params, tensor.path)
            sharding = None if targets is None else _get(targets, tensor.path)
            _set(params, tensor.path, _place(checkpoint, tensor, target.shape, target.dtype, sharding))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _hf_tensors(model: Decoder, dtype):
    """(Hugging Face name, shape, a function that gathers it to host) for every tensor, in order."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    parts: dict[str, list] = {}  # Hugging Face name → (layout, shape, a function that reads it) of each part
    for tensor in _tensors(model.config, params):
        value = _get(params, tensor.path)
        shape = tensor.layout.hf_shape(tuple(value.shape[(1 if tensor.stacked else 0) + (1 if tensor.experts else 0):]))
        for i, name in enumerate(tensor.hf_names):
            read = (lambda v=value, i=i: v[i]) if tensor.stacked else (lambda v=value: v)
            if tensor.experts:
                read = lambda v=value, i=i, e=tensor.experts: v[i // e, i % e]  # noqa: E731
            parts.setdefault(name, []).append((tensor.layout, shape, read))
    for name, pieces in parts.items():
        layout, shape, _ = pieces[0]

        def gather(pieces=pieces, axis=layout.fused_axis):
            hf = [layout.to_hf(_to_host(read())) for layout, _, read in pieces]
            return np.ascontiguousarray((hf[0] if len(hf) == 1 else np.concatenate(hf, axis)).astype(dtype))

        fused = list(shape)
        fused[layout.fused_axis] *= len(pieces)
        yield name, tuple(fused), gather


def _to_host(array: jax.Array) -> np.ndarray:
    """The whole array on this host; with several processes every one of them must call it."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def save_pretrained(model: Decoder, path: str | Path, dtype=None, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write config.json and safetensors (split above `max_shard_bytes`, with an index) in Hugging Face layout.

    Each tensor is gathered to the host on its own, so sharded parameters work. `dtype` (e.g.
    "bfloat16") converts on the way out; by default tensors keep the parameters' dtype. With several
    processes, every one of them calls it (each tensor is gathered over all) and process 0 writes.
    """
    path = Path(path)
    writer = jax.process_index() == 0
    if writer:
        path.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype_from_name(dtype) if dtype is not None else model.param_dtype)
    shards: list[list] = [[]]
    size = 0
    for name, shape, gather in _hf_tensors(model, dtype):
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, gather))
        size += nbytes
    files = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map, total = {}, 0
    for file, shard in zip(files, shards):
        tensors = {name: gather() for name, gather in shard}
        total += sum(t.nbytes for t in tensors.values())
        if writer:
            save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map |= {name: file for name in tensors}
        del tensors
    if not writer:
        return
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2))
    hf = model.config.to_hf_dict() | {"torch_dtype": jnp.dtype(dtype).name, "dtype": jnp.dtype(dtype).name}
    (path / "config.json").write_text(json.dumps(hf, indent=2))


def load_tokenizer(path: str | Path):
    """The Hugging Face tokenizer saved in a local model directory (never downloaded)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"tokenizer directory {path} does not exist; pass the model folder that holds tokenizer.json")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise DataError(
            f"no usable tokenizer in {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "it needs tokenizer.json or tokenizer_config.json with its vocabulary files"
        ) from e

