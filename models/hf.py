"""Hugging Face checkpoints ↔ Decoder parameters.

`load_pretrained` builds the Decoder abstractly, then reads each safetensors tensor on its own,
turns it into the Decoder's layout (stacked over layers, heads split out, [in, out] matmuls) and
places it straight onto its target sharding, so a checkpoint never sits whole on one device.
`save_pretrained` writes the reverse, gathering one layer of one parameter at a time.
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
}
_MODEL_TENSORS = {
    "model.embed_tokens.weight": (("embedding",), "same"),
    "model.norm.weight": (("final_norm", "weight"), "same"),
    "lm_head.weight": (("lm_head",), "transposed"),
}


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One Decoder parameter and the Hugging Face tensor(s) it comes from: one per layer when stacked."""

    path: tuple[str, ...]
    hf_names: tuple[str, ...]
    layout: _Layout
    stacked: bool


def _tensors(config: ModelConfig, params: dict) -> list[_Tensor]:
    """The parameters present in `params` (a pure dict of the Decoder's state), in Hugging Face order."""
    layouts = _layouts(config.head_dim)
    tensors = [_Tensor(path, (name,), layouts[kind], False) for name, (path, kind) in _MODEL_TENSORS.items()]
    tensors += [
        _Tensor(("layers", *path), tuple(f"model.layers.{i}.{name}" for i in range(config.num_layers)),
                layouts[kind], True)
        for name, (path, kind) in _LAYER_TENSORS.items()
    ]
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

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handles[self.files[name]].get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        return self.handles[self.files[name]].get_tensor(name)

    def check(self, config: ModelConfig, tensors: list[_Tensor], params: dict) -> None:
        """Every expected tensor is there with the shape config.json implies, and nothing else."""
        expected = set()
        for tensor in tensors:
            our_shape = _get(params, tensor.path).shape[1:] if tensor.stacked else _get(params, tensor.path).shape
            want = tensor.layout.hf_shape(tuple(our_shape))
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
                        f"intermediate_size={config.intermediate_size}, vocab_size={config.vocab_size}); "
                        "make config.json match the weights"
                    )
        ignored = {"lm_head.weight"} if config.tie_word_embeddings else set()
        extra = sorted(n for n in self.files if n not in expected | ignored and not n.endswith(_IGNORED_SUFFIXES))
        if extra:
            raise WeightsError(
                f"{self.source} has tensors a {config.model_type} model with this config.json does not use: "
                f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}; check model_type and config.json"
            )

    def host_slice(self, tensor: _Tensor, index: tuple[slice, ...], dtype) -> np.ndarray:
        """The part `index` of a Decoder parameter, read from the checkpoint layer by layer."""
        if not tensor.stacked:
            return tensor.layout.to_ours(self.read(tensor.hf_names[0]))[index].astype(dtype)
        names = tensor.hf_names[index[0]]
        layers = [tensor.layout.to_ours(self.read(name))[index[1:]].astype(dtype) for name in names]
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
    tensors = _tensors(config, params)
    with contextlib.ExitStack() as stack:
        checkpoint = _Checkpoint(path, stack)
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
    for tensor in _tensors(model.config, params):
        value = _get(params, tensor.path)
        shape = tensor.layout.hf_shape(tuple(value.shape[1:] if tensor.stacked else value.shape))
        for i, name in enumerate(tensor.hf_names):
            part = (lambda v=value, i=i: v[i]) if tensor.stacked else (lambda v=value: v)
            gather = lambda part=part, layout=tensor.layout: np.ascontiguousarray(  # noqa: E731
                layout.to_hf(np.asarray(jax.device_get(part()))).astype(dtype)
            )
            yield name, shape, gather


def save_pretrained(model: Decoder, path: str | Path, dtype=None, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write config.json and safetensors (split above `max_shard_bytes`, with an index) in Hugging Face layout.

    Each tensor is gathered to the host on its own, so sharded parameters work. `dtype` (e.g.
    "bfloat16") converts on the way out; by default tensors keep the parameters' dtype.
    """
    path = Path(path)
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
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map |= {name: file for name in tensors}
        del tensors
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

