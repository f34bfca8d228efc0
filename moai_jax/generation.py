"""Generation: a model answers prompts, sharded over the accelerator's devices, with a key/value cache.

    answers = moai_jax.generate(model, tokenizer, ["Once upon a time"], max_new_tokens=64)
    generator = Generator(model, tokenizer, Accelerator(8))     # reuse: compiled once per shape bucket
    print(generator(prompts, max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0))

Prompts are tokenized, left-padded into one batch and run through a prefill, then one-token decode
steps in a `lax.while_loop` until every row has produced an end-of-sequence token or
`max_new_tokens` (all inside one jitted function). Temperature 0 is greedy; otherwise the
temperature-scaled distribution is cut to its top-p nucleus and sampled with the seed.

To compile once for many calls, the batch, the prompt length and `max_new_tokens` are rounded up
to buckets (powers of two); padding rows are finished from the start and padding slots are masked.
The weights are sharded over the mesh with the training rules (`fsdp`/`tensor`), the prompts over
`data` (and `fsdp`); `inference_mesh` chooses the mesh unless one is given.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moai_jax.accelerator import Accelerator
from moai_jax.errors import GenerationError
from moai_jax.models.kv_cache import KVCache
from moai_jax.sharding.annotate import logical_sharding
from moai_jax.sharding.mesh import MeshShape, check_mesh, divisors, make_mesh
from moai_jax.sharding.rules import partition_spec, tree_shardings

MIN_BUCKET = 16
_COMPILED: dict[tuple, Any] = {}  # one executable per model layout, mesh and shape bucket, for every Generator


@dataclasses.dataclass(frozen=True)
class Generation:
    """The new tokens of each prompt (through its end-of-sequence token, if one came) and how long it took."""

    token_ids: list[list[int]]
    seconds: float  # generation alone, compilation excluded
    compile_seconds: float  # 0 when this shape bucket was compiled before

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def bucket(n: int, multiple: int = 1, smallest: int = MIN_BUCKET) -> int:
    """`n` rounded up to a power of two (at least `smallest`), then to a multiple of `multiple`."""
    size = max(smallest, 1 << (max(n, 1) - 1).bit_length())
    return -(-size // multiple) * multiple


def inference_mesh(config: Any, accelerator: Accelerator, param_bytes: int) -> MeshShape:
    """The mesh generation runs on: the heads split over `tensor` as far as one host allows; the other
    devices hold whole tensor-split copies of the weights (`data`, prompts split over them) when a
    copy takes at most a quarter of a device's memory, else one shard each of one copy (`fsdp`)."""
    flavor, hardware = accelerator.flavor, accelerator.hardware
    heads = [getattr(config, "num_heads", 1), getattr(config, "num_kv_heads", 1)]
    tensor = max(d for d in divisors(flavor) if d <= hardware.devices_per_host and all(h % d == 0 for h in heads))
    replicas = flavor // tensor
    if param_bytes / tensor <= hardware.memory_bytes / 4:
        return MeshShape(data=replicas, tensor=tensor)
    return MeshShape(fsdp=replicas, tensor=tensor)


def check_settings(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """A GenerationError saying what to change, for settings no model can generate with."""
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens (--max-new-tokens) must be at least 1, not {max_new_tokens}")
    if not temperature >= 0:
        raise GenerationError(f"temperature (--temperature) must be 0 (greedy) or more, not {temperature}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p (--top-p) must be more than 0 and at most 1, not {top_p}")


def check_prompts(prompt_ids: Sequence[Sequence[int]], config: Any, max_new_tokens: int) -> None:
    """A GenerationError saying what to change, for prompts (token ids) this model cannot answer."""
    if not prompt_ids:
        raise GenerationError("no prompts to answer; pass at least one prompt (--prompt or --prompts-file)")
    limits = [(config.max_position_embeddings, "positions")]
    if config.sliding_window is not None and not config.family.alternating_window:  # Gemma 2 slides its windows
        limits.append((config.sliding_window, "sliding window"))
    for i, ids in enumerate(prompt_ids, start=1):
        if not ids:
            raise GenerationError(f"prompt {i} is empty (no tokens); give it some text")
        for limit, what in limits:
            if len(ids) + max_new_tokens > limit:
                raise GenerationError(
                    f"prompt {i} has {len(ids)} tokens, which with max_new_tokens={max_new_tokens} exceeds the "
                    f"model's {limit} {what}; shorten the prompt or lower --max-new-tokens")
        if max(ids) >= config.vocab_size or min(ids) < 0:
            raise GenerationError(f"prompt {i} has token ids outside the model's vocabulary of {config.vocab_size}")


def generation_mesh(model: nnx.Module, accelerator: Accelerator, mesh: MeshShape | str | None = None) -> Mesh:
    """The mesh to generate on: `mesh` if given (checked against the flavor and the heads), else
    `inference_mesh`'s. `model` may be abstract (`nnx.eval_shape`)."""
    config = model.config
    shape = MeshShape.parse(mesh) if isinstance(mesh, str) else mesh
    if shape is None:
        params = jax.tree.leaves(nnx.state(model, nnx.Param))
        shape = inference_mesh(config, accelerator, sum(x.size * jnp.dtype(x.dtype).itemsize for x in params))
    check_mesh(shape, accelerator.flavor, num_heads=getattr(config, "num_heads", None),
               num_kv_heads=getattr(config, "num_kv_heads", None), num_experts=getattr(config, "num_experts", None))
    return make_mesh(shape, accelerator.devices)


def param_shardings(model: nnx.Module, mesh: Mesh) -> dict:
    """Where each parameter lives on `mesh` (a pure dict, as `load_pretrained(shardings=...)` takes), by
    the training rules. `model` may be abstract."""
    params = nnx.state(model, nnx.Param)
    return tree_shardings(nnx.to_pure_dict(nnx.get_partition_spec(params)), nnx.to_pure_dict(params), mesh)


def eos_ids(config: Any, tokenizer: Any) -> tuple[int, ...]:
    """The end-of-sequence tokens: the model config's (as transformers' generate uses), else the tokenizer's."""
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    return tuple(eos) if isinstance(eos, (list, tuple)) else () if eos is None else (int(eos),)


def next_token(logits_BV, uniform_B, temperature, top_p):
    """Greedy (temperature 0), or a sample of the temperature-scaled distribution cut to its top-p nucleus
    (the most likely tokens whose probabilities, before each one, sum to less than `top_p`), drawn by
    inverting its cumulative distribution at `uniform_B` in [0, 1)."""
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
    order_BV = jnp.broadcast_to(jnp.arange(logits_BV.shape[-1], dtype=jnp.int32), logits_BV.shape)
    descending_BV, order_BV = jax.lax.sort((-scaled_BV, order_BV), num_keys=1)
    probs_BV = jax.nn.softmax(-descending_BV, axis=-1)
    nucleus_BV = jnp.where(jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p, probs_BV, 0.0)  # the first always
    cumulative_BV = jnp.cumsum(nucleus_BV, axis=-1)
    target_B1 = uniform_B[:, None] * cumulative_BV[:, -1:]
    index_B1 = jnp.minimum(jnp.sum(cumulative_BV <= target_B1, axis=-1, keepdims=True),
                           jnp.sum(nucleus_BV > 0, axis=-1, keepdims=True) - 1)
    sampled_B = jnp.take_along_axis(order_BV, index_B1, axis=-1)[:, 0]
    return jnp.where(temperature > 0, sampled_B, greedy_B)


def _decode_loop(params, rest, prompt_ids_BT, prompt_lengths_B, finished_B, max_new_tokens, temperature, top_p, seed,
                 *, graphdef, new_slots: int, eos: tuple[int, ...]):
    """Prefill then decode; → new tokens [B, new_slots] (past a row's end or max_new_tokens: padding).

    Each step picks a token from the carried logits, then runs the model on it for the next logits
    (so the model runs once more than needed at the end, but the sampler is compiled once)."""
    model = nnx.merge(graphdef, params, rest)
    batch, length = prompt_ids_BT.shape
    pad_B = length - prompt_lengths_B
    slots_S = jnp.arange(length + new_slots)
    cache = KVCache.empty(model.config, batch, length + new_slots, model.dtype,
                          valid=slots_S[None, :] >= pad_B[:, None])
    positions_BT = jnp.maximum(jnp.arange(length)[None, :] - pad_B[:, None], 0)
    hidden_BTE, cache = model.cached_hidden_states(prompt_ids_BT, positions_BT, cache)
    uniform_NB = jax.random.uniform(jax.random.key(seed), (new_slots, batch))
    eos_E = jnp.asarray(eos or (-1,), jnp.int32)

    def more(carry):
        step, _, done_B, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done_B)

    def decode(carry):
        step, tokens_BN, done_B, logits_BV, cache = carry
        token_B = jnp.where(done_B, 0, next_token(logits_BV, uniform_NB[step], temperature, top_p))
        tokens_BN = jax.lax.dynamic_update_slice_in_dim(tokens_BN, token_B[:, None], step, axis=1)
        hidden_B1E, cache = model.cached_hidden_states(token_B[:, None], (prompt_lengths_B + step)[:, None], cache)
        return step + 1, tokens_BN, done_B | jnp.isin(token_B, eos_E), model.logits(hidden_B1E)[:, 0], cache

    start = (jnp.int32(0), jnp.zeros((batch, new_slots), jnp.int32), finished_B, model.logits(hidden_BTE[:, -1:])[:, 0],
             cache)
    return jax.lax.while_loop(more, decode, start)[1]


def encode(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, with the tokenizer's special tokens (a bos where it has one)."""
    return [list(tokenizer(p)["input_ids"]) for p in prompts]


class Generator:
    """A model placed on an accelerator's devices for generation; compiled once per shape bucket.

    `mesh`: a MeshShape, a string such as "data=4,tensor=2", or the jax Mesh the model already lives
    on (e.g. a Trainer's); by default `inference_mesh` chooses. Without an accelerator, one device.
    """

    def __init__(self, model: nnx.Module, tokenizer: Any = None, accelerator: Accelerator | None = None,
                 mesh: MeshShape | str | Mesh | None = None):
        self.tokenizer, self.config = tokenizer, model.config
        self.eos = eos_ids(self.config, tokenizer)
        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self.mesh = mesh if isinstance(mesh, Mesh) else generation_mesh(model, accelerator or Accelerator(1), mesh)
        self._param_shardings = param_shardings(model, self.mesh)
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._params = jax.device_put(nnx.to_pure_dict(params), self._param_shardings)
        self._rest = jax.device_put(nnx.to_pure_dict(rest), self._replicated)

    @property
    def batch_shards(self) -> int:
        """How many ways the prompts are split: over data and fsdp (and expert, outside a MoE model's experts)."""
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"] * self.mesh.shape["expert"]

    def _sharding(self, names, shape) -> NamedSharding:
        return NamedSharding(self.mesh, partition_spec(names, shape, dict(self.mesh.shape)))

    def _executable(self, batch: int, length: int, new_slots: int):
        """The compiled prefill + decode loop of one shape bucket, and the seconds compiling took (0: cached)."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                (self._params, self._rest))
        key = (self.graphdef, self.mesh, jax.tree.structure(abstract), tuple(jax.tree.leaves(abstract)), self.eos,
               batch, length, new_slots)
        if key in _COMPILED:
            return _COMPILED[key], 0.0
        start = time.perf_counter()
        rows = self._sharding(("batch",), (batch,))
        ids = self._sharding(("batch", "length"), (batch, length))
        loop = functools.partial(_decode_loop, graphdef=self.graphdef, new_slots=new_slots, eos=self.eos)

        def run(*args):
            with logical_sharding(self.mesh):
                return loop(*args)

        r = self._replicated
        jitted = jax.jit(run, in_shardings=(self._param_shardings, r, ids, rows, rows, r, r, r, r),
                         out_shardings=r)  # the tokens, small, whole on every device: each process reads them
        scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=r)  # noqa: E731
        _COMPILED[key] = jitted.lower(
            *abstract, jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=ids),
            jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows), jax.ShapeDtypeStruct((batch,), bool, sharding=rows),
            scalar(jnp.int32), scalar(jnp.float32), scalar(jnp.float32), scalar(jnp.int32)
        ).compile()
        return _COMPILED[key], time.perf_counter() - start

    def run(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 64, temperature: float = 0.0,
            top_p: float = 1.0, seed: int = 0) -> Generation:
        """New tokens for prompts given as token ids."""
        check_settings(max_new_tokens, temperature, top_p)
        check_prompts(prompt_ids, self.config, max_new_tokens)
        count = len(prompt_ids)
        batch, length = bucket(count, self.batch_shards, 1), bucket(max(len(p) for p in prompt_ids))
        executable, compile_seconds = self._executable(batch, length, bucket(max_new_tokens))
        ids_BT = np.zeros((batch, length), np.int32)
        lengths_B = np.ones(batch, np.int32)
        for row, ids in enumerate(prompt_ids):
            ids_BT[row, length - len(ids):], lengths_B[row] = ids, len(ids)
        start = time.perf_counter()
        inputs = [ids_BT, lengths_B, np.arange(batch) >= count, np.int32(max_new_tokens), np.float32(temperature),
                  np.float32(top_p), np.int32(seed)]
        tokens_BN = executable(self._params, self._rest, *map(self._global, inputs, executable.input_shardings[0][2:]))
        tokens_BN = np.asarray(tokens_BN.addressable_shards[0].data)
        seconds = time.perf_counter() - start
        return Generation([self._until_eos(row[:max_new_tokens]) for row in tokens_BN[:count]], seconds,
                          compile_seconds)

    @staticmethod
    def _global(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
        """A host array, the same in every process, as one global array (the mesh may span processes)."""
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    def _until_eos(self, tokens) -> list[int]:
        ends = [i for i, t in enumerate(tokens) if t in self.eos]
        return [int(t) for t in tokens[: ends[0] + 1 if ends else len(tokens)]]

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        if self.tokenizer is None:
            raise GenerationError("text prompts need a tokenizer; pass the model's tokenizer")
        return encode(self.tokenizer, prompts)

    def __call__(self, prompts: Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0) -> list[str]:
        """The answer to each prompt, as text (special tokens left out)."""
        if isinstance(prompts, str):
            raise GenerationError("prompts is one string; pass a list of prompts")
        generation = self.run(self.encode(prompts), max_new_tokens, temperature, top_p, seed)
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in generation.token_ids]


def generate(model: nnx.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, *, accelerator: Accelerator | None = None,
             mesh: MeshShape | str | Mesh | None = None) -> list[str]:
    """The model's answer to each prompt: greedy at temperature 0, else nucleus sampling with `seed`."""
    return Generator(model, tokenizer, accelerator, mesh)(prompts, max_new_tokens, temperature, top_p, seed)


class SamplePrompts:
    """`finetune.py --sample-prompts F`: the model's greedy answers to a few prompts, printed during training.

    The prompts are read and checked against the model when the run starts, so a bad file fails before
    any training; each `show` generates on the trainer's own mesh, with the weights where they are."""

    def __init__(self, path: str, tokenizer: Any, config: Any, max_new_tokens: int = 32):
        from moai_jax.data.prompts import read_prompts

        self.prompts, self.tokenizer, self.max_new_tokens = read_prompts(path), tokenizer, max_new_tokens
        self.prompt_ids = encode(tokenizer, self.prompts)
        check_prompts(self.prompt_ids, config, max_new_tokens)

    def show(self, model: nnx.Module, mesh: Mesh, label: str) -> None:
        generator = Generator(model, self.tokenizer, mesh=mesh)
        for prompt, ids in zip(self.prompts, generator.run(self.prompt_ids, self.max_new_tokens).token_ids):
            answer = self.tokenizer.decode(ids, skip_special_tokens=True)
            if jax.process_index() == 0:
                print(f"[Sample {label}] {' '.join(prompt.split())} → {answer!r}", flush=True)
