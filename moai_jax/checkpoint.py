"""Training checkpoints: save, keep the last few, restore onto any flavor (export: moai_jax/export.py).

    checkpoints = Checkpoints("runs/ckpt", keep=3)             # CheckpointError if it cannot be written
    checkpoints.save(trainer, step, data_position=batches.position, seed=0)   # async: training goes on
    saved = checkpoints.restore(trainer)                       # latest complete one, onto trainer's plan
    batches = Batches(data, 32, position=saved["data_position"])
    checkpoints.close()                                        # waits for the last save

A checkpoint is one Orbax step folder with three items: `params` (the model's parameters),
`train` (optimizer state, step counter, the model's non-parameter state such as random streams) and
`metadata` (JSON: step, data position, seed, the Plan, the model config and the run's settings).
Under LoRA the parameters are the adapters, and the frozen base is not saved: the metadata names it
(model config, the run's model_name_or_path and seed) and a resumed run loads it again.
Orbax writes each save into a temporary folder and renames it when complete, so a crash mid-save
leaves the previous checkpoints whole; the stale temporary folder is removed on the next start. A save
that fails (a full disk) is reported in the main thread as one CheckpointError naming the last intact
checkpoint, and its half-written folder is removed. A damaged checkpoint (files truncated) is skipped:
the latest step is the newest one that reads, and a resuming run moves the damaged one aside.

Restoring reads every array straight onto the shards of the *restoring* trainer's plan (abstract
arrays carrying the target shardings): a run saved on 8 devices resumes on 1 or 16 without the
model ever being gathered on one device. The learning-rate schedule lives in the optimizer state's
step count, so it continues exactly too.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from moai_jax.checkpoint_faults import (Damaged, disk_full, join_new_threads, quiet_failed_writes, same_shapes,
                                       short)
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
        self.skipped: list[str] = []  # one line per damaged checkpoint passed over, for the user
        self._metadata: dict[int, dict] = {}  # step -> metadata, of the checkpoints known to read
        self._damaged: set[int] = set()
        self._in_flight: int | None = None  # the step being written in the background
        self._failed = False
        self._threads_before_save: set[threading.Thread] = set()
        quiet_failed_writes()
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
        return sorted(s for s in self._manager.all_steps() if s not in self._damaged)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def _step_or_latest(self, step: int | None) -> int:
        """`step`, or the newest checkpoint that reads (passing over damaged ones, each noted in `skipped`)."""
        steps = self.steps()
        if not steps and not self._damaged and self.writable:  # a run resuming
            raise CheckpointError(f"no checkpoint in {self.directory} to resume from; run without --resume to "
                                  "start fresh, or pass the --checkpoint-dir of an earlier run")
        if not steps and not self._damaged:  # reading a run's checkpoints: export, generation
            raise CheckpointError(f"no checkpoint in {self.directory}; pass the --checkpoint-dir of a finetune.py "
                                  "run that saved one (it saves every --save-steps steps and at the end)")
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"no intact checkpoint of step {step} in {self.directory}; it holds steps "
                                      f"{', '.join(map(str, steps)) or 'none that read'}")
            return step
        for step in reversed(steps):
            try:
                self._read(step)
                return step
            except Damaged as e:
                self._set_aside(step, str(e))
        raise CheckpointError(f"every checkpoint in {self.directory} is damaged ({'; '.join(self.skipped)}); "
                              "run without --resume to start fresh, or pass another --checkpoint-dir")

    def _read(self, step: int) -> dict:
        """A checkpoint's metadata, after checking that its arrays' index reads too; Damaged if either does not."""
        if step not in self._metadata:
            try:
                meta = self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
            except Exception as e:  # noqa: BLE001 - Orbax raises many kinds for a damaged folder
                raise Damaged(f"its metadata cannot be read: {short(e)}") from None
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise CheckpointError(f"checkpoint of step {step} in {self.directory} was not written by this "
                                      "version of moai_jax")
            try:
                self._manager.item_metadata(step)  # the arrays' shapes, dtypes and files
            except Exception as e:  # noqa: BLE001
                raise Damaged(f"its arrays cannot be read: {short(e)}") from None
            self._metadata[step] = meta
        return self._metadata[step]

    def _set_aside(self, step: int, reason: str) -> None:
        """Pass over damaged checkpoint `step`; a resuming run renames its folder, so it can save that step again."""
        self._damaged.add(step)
        self._metadata.pop(step, None)
        note = f"skipped the checkpoint of step {step} in {self.directory}: it is damaged ({reason})"
        folder = self.directory / str(step)
        if self.writable and jax.process_index() == 0 and folder.is_dir():
            aside = self.directory / f"damaged-{step}-{uuid.uuid4().hex[:6]}"
            folder.rename(aside)
            note += f"; moved it to {aside}"
        if self.writable:
            self._manager.reload()
        self.skipped.append(note)

    def metadata(self, step: int | None = None) -> dict:
        """The JSON metadata of a checkpoint (the newest that reads by default): step, data position, plan, model..."""
        step = self._step_or_latest(step)
        try:
            return self._read(step)
        except Damaged as e:
            raise CheckpointError(f"checkpoint of step {step} in {self.directory} is damaged ({e}); pass another "
                                  "--step, or none for the newest intact one") from None

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
        """Load a checkpoint (the newest intact one by default) into `trainer.state`, each array straight
        onto the shards of the trainer's own plan; the trainer's current arrays are freed first, so the
        devices never hold two copies. Returns the checkpoint's metadata."""
        latest = step is None
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
        while True:
            try:
                restored = self._manager.restore(step, args=args)
                break
            except Exception as e:  # noqa: BLE001
                if not same_shapes(self._manager, step, args):
                    raise CheckpointError(f"checkpoint of step {step} in {self.directory} does not fit this model and "
                                          f"optimizer ({short(e)})") from None
                if not latest:
                    raise CheckpointError(f"checkpoint of step {step} in {self.directory} is damaged ({short(e)}); "
                                          "pass another --step, or none for the newest intact one") from None
                self._set_aside(step, f"its arrays cannot be read: {short(e)}")
                step = self._step_or_latest(None)
                meta = self.check_model(trainer.config, step)
                self._check_lora(meta, trainer.lora, step)
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
        return self._start_save(int(step), args, force)

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
        return self._start_save(int(step), args, force)

    def _start_save(self, step: int, args: ocp.args.Composite, force: bool) -> bool:
        self.wait()  # a failure of the previous save is reported as that step's
        self._threads_before_save = set(threading.enumerate())
        try:
            saved = self._manager.save(step, args=args, force=force)
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(step, e) from None
        self._in_flight = step if saved else None
        return saved

    def wait(self) -> None:
        """Block until the save in flight, if any, is complete on disk."""
        step, self._in_flight = self._in_flight, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - Orbax re-raises its background thread's error, often a ValueError
            raise self._save_failed(step, e) from None

    def _save_failed(self, step: int | None, error: Exception) -> Exception:
        """The error to raise for a failed save (a bug's error as it is); its half-written folder is removed."""
        self._failed = True
        join_new_threads(self._threads_before_save)  # some still write after Orbax reports the failure
        if step is not None and jax.process_index() == 0:
            for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
        if not (isinstance(error, OSError) or disk_full(error)):
            return error
        steps = [s for s in self._manager.all_steps(read=True) if s != step]
        last = (f"the last intact checkpoint is step {steps[-1]} ({self.directory / str(steps[-1])}), which "
                "--resume continues from" if steps else "no checkpoint was saved before it")
        what = "a checkpoint" if step is None else f"the checkpoint of step {step}"
        if disk_full(error):
            return CheckpointError(f"the disk is full: {what} could not be written to {self.directory}; {last}; "
                                   "free space there or pass another --checkpoint-dir")
        return CheckpointError(f"{what} could not be written to {self.directory} ({error.strerror or error}); {last}")

    def close(self) -> None:
        """Wait for the last save, then release the manager."""
        if not self._failed:
            self.wait()
        # Orbax removes half-written saves in a thread started at open, and its close() does not wait
        # for it: a process that exits first would print that thread's traceback at shutdown.
        getattr(self._manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        try:
            self._manager.close()
        except Exception:  # noqa: BLE001 - after a failed save, closing re-raises its error, already reported
            if not self._failed:
                raise

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
