"""Training checkpoints: save, keep the last few, restore onto any flavor; export to Hugging Face format.

    checkpoints = Checkpoints("runs/ckpt", keep=3)             # CheckpointError if it cannot be written
    checkpoints.save(trainer, step, data_position=batches.position, seed=0)   # async: training goes on
    saved = checkpoints.restore(trainer)                       # latest complete one, onto trainer's plan
    batches = Batches(data, 32, position=saved["data_position"])
    checkpoints.close()                                        # waits for the last save
    export("runs/ckpt", "runs/model")                          # config.json + safetensors + tokenizer

A checkpoint is one Orbax step folder with three items: `params` (the model's parameters),
`train` (optimizer state, step counter, the model's non-parameter state such as random streams) and
`metadata` (JSON: step, data position, seed, the Plan, the model config and the run's settings).
Under LoRA the parameters are the adapters, and the frozen base is not saved: the metadata names it
(model config, the run's model_name_or_path and seed) and a resumed run loads it again.
Orbax writes each save into a temporary folder and renames it when complete, so a crash mid-save
leaves the previous checkpoints whole; the stale temporary folder is removed on the next start.

Restoring reads every array straight onto the shards of the *restoring* trainer's plan (abstract
arrays carrying the target shardings): a run saved on 8 devices resumes on 1 or 16 without the
model ever being gathered on one device. The learning-rate schedule lives in the optimizer state's
step count, so it continues exactly too.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from moai_jax.errors import CheckpointError
from moai_jax.models import lora as lora_lib
from moai_jax.train import TrainState

FORMAT = 1  # bumped when the layout of a checkpoint changes


def _json(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), for comparing with saved metadata."""
    return json.loads(json.dumps(value))


def config_dict(config: Any) -> dict | None:
    return None if config is None else _json(dataclasses.asdict(config))


def check_writable(directory: Path, flag: str = "--checkpoint-dir") -> None:
    """Create `directory` if needed and prove a file can be written there, before any training runs."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".moai-write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise CheckpointError(f"cannot write to {directory} ({reason}); pass a {flag} this user can write to"
                              ) from None


def _array_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's pytree handler, each device writing its own shards. Orbax's default "replica-parallel"
    mode first slices every replicated shard on device, one compiled slice per shape: seconds of
    compilation at a process's first save (14 s on simulated CPU devices) for no gain on one host."""
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        (jax.Array, th.ArrayHandler(use_replica_parallel=False)), (np.ndarray, th.NumpyHandler()),
        (np.number, th.ScalarHandler()), (int, th.ScalarHandler()), (float, th.ScalarHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _restore_args(tree: Any, shardings: Any) -> ocp.args.PyTreeRestore:
    """Restore onto `tree`'s shapes and dtypes, each array straight onto its *target* sharding."""
    abstract = _abstract(tree, shardings)
    return ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


def _abstract(tree: Any, shardings: Any) -> Any:
    """Shape, dtype and *target* sharding of every array: what Orbax restores onto, shard by shard."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpoints:
    """The checkpoints of one run in `directory`; the last `keep` complete ones are kept."""

    def __init__(self, directory: str | Path, *, keep: int | None = 3, writable: bool = True):
        self.directory = Path(directory).absolute()
        self.writable = writable
        if keep is not None and keep < 1:
            raise CheckpointError(f"--keep must be at least 1, not {keep}")
        if writable:
            check_writable(self.directory)
        elif not self.directory.is_dir():
            raise CheckpointError(f"no checkpoint folder at {self.directory}; pass the --checkpoint-dir of a run")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=writable, create=writable,
                                               cleanup_tmp_directories=writable, read_only=not writable)
        handlers = {"params": _array_handler(), "train": _array_handler(), "metadata": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # -- reading ---------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first (a save cut short by a crash is not one)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def _step_or_latest(self, step: int | None) -> int:
        steps = self.steps()
        if not steps and self.writable:  # a run resuming
            raise CheckpointError(f"no checkpoint in {self.directory} to resume from; run without --resume to "
                                  "start fresh, or pass the --checkpoint-dir of an earlier run")
        if not steps:  # reading a run's checkpoints: export, generation
            raise CheckpointError(f"no checkpoint in {self.directory}; pass the --checkpoint-dir of a finetune.py "
                                  "run that saved one (it saves every --save-steps steps and at the end)")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; it holds steps "
                                  f"{', '.join(map(str, steps))}")
        return step

    def metadata(self, step: int | None = None) -> dict:
        """The JSON metadata of a checkpoint (the latest by default): step, data position, plan, model..."""
        step = self._step_or_latest(step)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - Orbax raises many kinds for a damaged folder
            raise CheckpointError(f"checkpoint of step {step} in {self.directory} has no readable metadata "
                                  f"({type(e).__name__}); it was not written by moai_jax") from None
        meta = restored["metadata"]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint of step {step} in {self.directory} was not written by this "
                                  "version of moai_jax")
        return meta

    def check_model(self, config: Any, step: int | None = None) -> dict:
        """The checkpoint's metadata, or a CheckpointError when it holds a model other than `config`."""
        step = self._step_or_latest(step)
        meta = self.metadata(step)
        saved, mine = meta.get("model_config") or {}, config_dict(config) or {}
        if saved != mine:
            diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            shown = ", ".join(f"{k} {saved.get(k)} (now {mine.get(k)})" for k in diff[:3])
            raise CheckpointError(f"checkpoint of step {step} in {self.directory} holds another model ({shown}); "
                                  "resume with the model it was saved from, or use another --checkpoint-dir")
        return meta

    def restore(self, trainer, step: int | None = None) -> dict:
        """Load a checkpoint (the latest by default) into `trainer.state`, each array straight onto the
        shards of the trainer's own plan; the trainer's current arrays are freed first, so the devices
        never hold two copies. Returns the checkpoint's metadata."""
        step = self._step_or_latest(step)
        meta = self.check_model(trainer.config, step)
        self._check_lora(meta, trainer.lora, step)
        state, shardings = trainer.state, trainer.state_shardings
        base, rest = _split_rest(trainer._rest, trainer.lora)  # a LoRA run's frozen base stays where it is
        train_tree = {"opt_state": state.opt_state, "step": state.step, "rest": rest}
        train_shardings = {"opt_state": shardings.opt_state, "step": shardings.step,
                           "rest": _split_rest(trainer.rest_shardings, trainer.lora)[1]}
        args = ocp.args.Composite(params=_restore_args(state.params, shardings.params),
                                  train=_restore_args(train_tree, train_shardings))
        for array in jax.tree.leaves((state, rest)):  # free the devices for the restored copy
            if isinstance(array, jax.Array):
                array.delete()
        trainer.state = None
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(f"checkpoint of step {step} in {self.directory} does not fit this model and "
                                  f"optimizer ({type(e).__name__}: {first[:200]})") from None
        train = restored["train"]
        trainer.state = TrainState(params=restored["params"], opt_state=train["opt_state"], step=train["step"])
        trainer._rest = lora_lib.join(base, train["rest"])
        return meta

    def _check_lora(self, meta: dict, lora, step: int) -> None:
        """A CheckpointError when the checkpoint's LoRA adapters (or their absence) differ from `lora`'s."""
        def shape(d):
            return None if d is None else {k: d[k] for k in ("r", "alpha", "dropout", "targets")}
        saved, mine = shape((meta.get("plan") or {}).get("lora")), shape(None if lora is None else _json(lora.to_dict()))
        if saved != mine:
            describe = lambda d: "full fine-tuning" if d is None else f"LoRA {d}"  # noqa: E731
            raise CheckpointError(f"checkpoint of step {step} in {self.directory} holds {describe(saved)}, not "
                                  f"{describe(mine)}; resume with the LoRA options it was saved with")

    # -- the state of a step of your own (`@acc.jit`) ---------------------------------------------
    def save_state(self, step: int, state: dict, *, plan=None, data_position: dict | None = None,
                   seed: int | None = None, force: bool = False) -> bool:
        """Start saving the state of a step of your own, e.g. `{"model": model, "optimizer": optimizer}`
        (nnx objects) or `{"state": train_state}` (pytrees), with the plan its `@acc.jit` step chose."""
        meta = {"format": FORMAT, "step": int(step), "data_position": data_position, "seed": seed,
                "plan": None if plan is None else plan.to_dict(), "model_config": None, "run": {}}
        args = ocp.args.Composite(train=ocp.args.PyTreeSave({k: _nested(v) for k, v in state.items()}),
                                  metadata=ocp.args.JsonSave(_json(meta)))
        try:
            return self._manager.save(int(step), args=args, force=force)
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoint {step} to {self.directory}: {e.strerror or e}") from None

    def restore_state(self, state: dict, step: int | None = None) -> tuple[dict, dict]:
        """Read a `save_state` checkpoint (the latest by default) into `state`, each array straight onto
        the shards of the array it replaces: after `train_step.place(...)`, onto that step's plan, on any
        flavor. nnx objects are updated in place; returns (`state` with its pytrees restored, the metadata)."""
        step = self._step_or_latest(step)
        meta = self.metadata(step)
        current = {k: _nested(v) for k, v in state.items()}
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(
            jax.devices()[0]), current)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(train=_restore_args(current, shardings)))
        except Exception as e:  # noqa: BLE001
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(f"checkpoint of step {step} in {self.directory} does not fit this state "
                                  f"({type(e).__name__}: {first[:200]})") from None
        out = {}
        for name, value in state.items():
            treedef, leaves = _flat(value)
            read = dict(_flat(restored["train"][name])[1])
            tree = jax.tree.unflatten(treedef, [read[path or ("value",)] for path, _ in leaves])
            if nnx.graph.is_graph_node(value):
                nnx.update(value, tree)
            out[name] = value if nnx.graph.is_graph_node(value) else tree
        return out, meta

    # -- writing ---------------------------------------------------------------------------------
    def save(self, trainer, step: int, *, data_position: dict | None = None, seed: int | None = None,
             run: dict | None = None, force: bool = False) -> bool:
        """Start saving `trainer`'s state as checkpoint `step` and return: the arrays are copied off
        the devices now, written in the background. Waits for the previous save first."""
        meta = {"format": FORMAT, "step": int(step), "data_position": data_position, "seed": seed,
                "plan": trainer.plan.to_dict(), "model_config": config_dict(trainer.config), "run": run or {}}
        state = trainer.state
        rest = _split_rest(trainer._rest, trainer.lora)[1]
        args = ocp.args.Composite(
            params=ocp.args.PyTreeSave(state.params),
            train=ocp.args.PyTreeSave({"opt_state": state.opt_state, "step": state.step, "rest": rest}),
            metadata=ocp.args.JsonSave(_json(meta)))
        try:
            return self._manager.save(int(step), args=args, force=force)
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoint {step} to {self.directory}: {e.strerror or e}") from None

    def wait(self) -> None:
        """Block until the save in flight, if any, is complete on disk."""
        try:
            self._manager.wait_until_finished()
        except OSError as e:
            raise CheckpointError(f"a checkpoint save to {self.directory} failed: {e.strerror or e}") from None

    def close(self) -> None:
        """Wait for the last save, then release the manager."""
        self.wait()
        # Orbax removes half-written saves in a thread started at open, and its close() does not wait
        # for it: a process that exits first would print that thread's traceback at shutdown.
        getattr(self._manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _flat(value: Any) -> tuple[Any, list[tuple[tuple[str, ...], Any]]]:
    """An nnx object's state or a pytree: its treedef and (path of strings, leaf) pairs."""
    if nnx.graph.is_graph_node(value):
        value = nnx.state(value)
    flat, treedef = jax.tree_util.tree_flatten_with_path(value)
    return treedef, [(tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path), leaf)
                     for path, leaf in flat]


def _nested(value: Any) -> dict:
    """`value`'s arrays as nested dicts keyed by the strings of their paths, as Orbax writes them."""
    out: dict = {}
    for path, leaf in _flat(value)[1]:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1] if path else "value"] = leaf
    return out


def _split_rest(rest: Any, lora) -> tuple[dict, Any]:
    """(the frozen base, what a checkpoint holds) of a trainer's non-trained state."""
    return lora_lib.split_base(rest) if lora is not None else ({}, rest)


def load_model(checkpoint_dir: str | Path, step: int | None = None, devices: list | None = None):
    """The model of a checkpoint (the latest by default) and its metadata. The parameters are
    restored over `devices` (default: all of this process's), sharded as FSDP, never whole on one.
    A LoRA checkpoint gives a LoRA model whose adapters are restored and whose frozen base is
    abstract (shapes only): `load_base` loads it."""
    from flax import nnx

    from moai_jax.models import Decoder, ModelConfig
    from moai_jax.sharding.mesh import MeshShape, make_mesh
    from moai_jax.sharding.rules import tree_shardings

    checkpoints = Checkpoints(checkpoint_dir, keep=None, writable=False)
    step = checkpoints._step_or_latest(step)
    meta = checkpoints.metadata(step)
    config = ModelConfig(**meta["model_config"])
    devices = devices or jax.devices()
    mesh = make_mesh(MeshShape(data=1, fsdp=len(devices), tensor=1), devices)
    lora = (meta.get("plan") or {}).get("lora")
    lora = None if lora is None else lora_lib.LoraConfig(**lora)
    abstract = nnx.eval_shape(lambda: lora_lib.adapted(Decoder(config, rngs=nnx.Rngs(0)), lora))
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    shapes = nnx.to_pure_dict(abstract_params)
    shardings = tree_shardings(nnx.to_pure_dict(nnx.get_partition_spec(abstract_params)), shapes, mesh)
    try:
        restored = checkpoints._manager.restore(
            step, args=ocp.args.Composite(params=_restore_args(shapes, shardings)))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read the parameters of checkpoint {step} in {checkpoints.directory} "
                              f"({type(e).__name__})") from None
    finally:
        checkpoints.close()
    nnx.replace_by_pure_dict(abstract_params, restored["params"])
    return nnx.merge(graphdef, abstract_params, rest), meta


def load_base(meta: dict, lora: lora_lib.LoraConfig):
    """The LoRA model of a checkpoint's run with its base loaded again, as the run built it: the
    Hugging Face folder it named, or the preset's random weights from the run's seed."""
    from flax import nnx

    from moai_jax.models import Decoder, ModelConfig, load_pretrained

    source = (meta.get("run") or {}).get("model_name_or_path")
    if source is not None and Path(source).is_dir():
        base = load_pretrained(source)
    else:
        base = Decoder(ModelConfig(**meta["model_config"]), rngs=nnx.Rngs(meta.get("seed") or 0))
    return lora_lib.apply_lora(base, lora)


def write_model(model: Any, out: str | Path, *, lora: lora_lib.LoraConfig | None = None, merge: bool = False,
                base_model_name_or_path: str | None = None, dtype: str | None = None) -> Path:
    """Write a model as a Hugging Face folder; a LoRA model as a PEFT adapter folder, or merged into
    its base (a full model) with `merge`."""
    from moai_jax.models import save_pretrained
    from moai_jax.models.peft import save_adapters

    out = Path(out)
    try:
        if lora is not None and not merge:
            save_adapters(model, out, lora, base_model_name_or_path)
        else:
            save_pretrained(lora_lib.merge(model) if lora is not None else model, out, dtype=dtype)
    except OSError as e:
        raise CheckpointError(f"cannot write the model to {out} ({e.strerror or e}); pass a writable "
                              "--save-model-dir") from None
    return out


def export(checkpoint_dir: str | Path, save_model_dir: str | Path, *, step: int | None = None,
           dtype: str | None = None, tokenizer: Any = None, merge_lora: bool = False) -> Path:
    """Write a checkpoint's model (the latest by default) in Hugging Face format: config.json,
    safetensors (gathered to the host one tensor at a time) and, when the run's tokenizer can be
    found (or `tokenizer` is given) and can save itself, its files. A LoRA checkpoint gives a PEFT
    adapter folder, or with `merge_lora` the base with the adapters merged in."""
    from flax import nnx

    model, meta = load_model(checkpoint_dir, step)
    lora = (meta.get("plan") or {}).get("lora")
    lora = None if lora is None else lora_lib.LoraConfig(**lora)
    if merge_lora and lora is None:
        raise CheckpointError(f"--merge-lora needs a LoRA checkpoint; {checkpoint_dir} holds a full model, which "
                              "exports as it is")
    source = (meta.get("run") or {}).get("model_name_or_path")
    if merge_lora:
        adapters = nnx.state(model, nnx.Param)
        model = load_base(meta, lora)
        nnx.update(model, adapters)
    out = write_model(model, save_model_dir, lora=lora, merge=merge_lora, base_model_name_or_path=source,
                      dtype=dtype)
    if tokenizer is None and source is not None:
        from moai_jax.data import load_tokenizer_for
        tokenizer = load_tokenizer_for(source)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
    return out
