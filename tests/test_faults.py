"""Faults a user meets: a disk that fills during a checkpoint save or the model export, a damaged newest
checkpoint, a model folder that does not exist. Each is one `error:` line that says what happened and
what is left, or (a damaged checkpoint) a resume from the newest intact one.

A full disk is a real one where the test may mount a small tmpfs (as root), else an injected ENOSPC."""

import contextlib
import errno
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from moai_jax import plan
from moai_jax.accelerator import Accelerator
from moai_jax.checkpoint import Checkpoints
from moai_jax.errors import CheckpointError, ModelConfigError
from moai_jax.export import write_model
from moai_jax.models import Decoder, ModelConfig
from moai_jax.optimizer import adamw
from moai_jax.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ModelConfig.preset("tiny")
DISK_FULL = OSError(errno.ENOSPC, "No space left on device")


@contextlib.contextmanager
def small_disk(kib: int):
    """A folder on a tmpfs of `kib` KiB, or None where this user may not mount one."""
    where = Path(tempfile.mkdtemp(prefix="moai-small-disk-"))
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)],
                                 capture_output=True).returncode == 0
    except FileNotFoundError:  # no mount command
        mounted = False
    try:
        yield where if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(where)], check=True)
        shutil.rmtree(where, ignore_errors=True)


def size_kib(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) // 1024 + 1


@pytest.fixture(scope="session")
def trainer():
    """The tiny model on one device, planned without compiling (these tests never run a step)."""
    accelerator = Accelerator(1)
    chosen = plan(CONFIG, 2, 32, accelerator, verify=False)
    return Trainer(lambda: Decoder(CONFIG, rngs=nnx.Rngs(0)), adamw(1e-3), 2, 32, accelerator, plan=chosen)


def params(trainer) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(trainer.state.params))]


@pytest.fixture(scope="session")
def checkpoint_kib(trainer, tmp_path_factory):
    """How much disk one checkpoint of the tiny model takes."""
    where = tmp_path_factory.mktemp("one")
    with Checkpoints(where, keep=1) as checkpoints:
        checkpoints.save(trainer, 1)
    return size_kib(where / "1")


def test_disk_full_during_a_save_names_the_last_intact_checkpoint(trainer, checkpoint_kib, monkeypatch):
    with small_disk(checkpoint_kib * 3 // 2) as disk:  # room for one checkpoint, not two
        where = (disk or Path(tempfile.mkdtemp())) / "ckpt"
        checkpoints = Checkpoints(where, keep=3)
        checkpoints.save(trainer, 1)
        checkpoints.wait()
        before = params(trainer)
        if disk is None:  # no tmpfs here: the save fails as on a full disk
            monkeypatch.setattr(checkpoints._manager, "save", lambda *a, **k: (_ for _ in ()).throw(DISK_FULL))
        with pytest.raises(CheckpointError) as error:
            checkpoints.save(trainer, 2)
            checkpoints.wait()  # the failure of the background save, reported in the main thread
        checkpoints.close()
        assert str(error.value) == (
            f"the disk is full: the checkpoint of step 2 could not be written to {where}; the last intact checkpoint "
            f"is step 1 ({where / '1'}), which --resume continues from; free space there or pass another "
            "--checkpoint-dir")
        assert sorted(os.listdir(where)) == ["1"]  # no half-written step 2 left
        with Checkpoints(where, keep=3) as again:  # nothing older lost: step 1 restores whole
            assert again.restore(trainer)["step"] == 1
        assert all(np.array_equal(a, b) for a, b in zip(params(trainer), before))


def test_disk_full_at_save_model_dir_leaves_no_half_model(trainer, checkpoint_kib, tmp_path, monkeypatch):
    """--save-model-dir on a full disk: nothing that looks like a model is left, and with checkpoints
    on, the error names the checkpoint and the export command that writes the same weights."""
    finetune = finetune_module()
    with small_disk(checkpoint_kib // 4) as disk:  # smaller than the model's safetensors
        out = (disk or tmp_path) / "model"
        if disk is None:
            import moai_jax.models.hf as hf

            def half_then_full(tensors, filename, metadata=None):
                Path(filename).write_bytes(b"\0" * 1000)
                raise DISK_FULL
            monkeypatch.setattr(hf, "save_file", half_then_full)
        with pytest.raises(CheckpointError, match=f"^the disk is full: the model could not be written to {out}, and "
                           "nothing of it was left there; free space there or pass another --save-model-dir$"):
            write_model(trainer.model, out)
        assert not out.exists() and os.listdir(out.parent) == []
        args = finetune.parse_args(["--save-model-dir", str(out)])
        args.lora = None
        with Checkpoints(tmp_path / "ckpt") as checkpoints:
            checkpoints.save(trainer, 7)
            with pytest.raises(CheckpointError) as error:
                finetune.save_model(trainer.model, None, args, checkpoints)
        assert str(error.value).endswith(
            f"; the trained weights are in the checkpoint of step 7: python scripts/export.py --checkpoint-dir "
            f"{tmp_path / 'ckpt'} --save-model-dir {out}")


def truncate(folder: Path, which: str = "all files") -> None:
    """Cut a checkpoint's files (all, its arrays', or its largest) to half their length, as a crashed copy would."""
    files = [f for f in folder.rglob("*") if f.is_file() and (which == "all files" or f.parent.name == "d")]
    for f in [max(files, key=lambda f: f.stat().st_size)] if which == "largest file" else files:
        os.truncate(f, f.stat().st_size // 2)


@pytest.fixture
def three_checkpoints(trainer, tmp_path):
    with Checkpoints(tmp_path / "ckpt", keep=3) as checkpoints:
        for step in (2, 4, 6):
            checkpoints.save(trainer, step)
    return tmp_path / "ckpt"


@pytest.mark.parametrize("which", ["all files", "array files", "largest file"])
def test_resume_skips_a_damaged_checkpoint(trainer, three_checkpoints, which):
    truncate(three_checkpoints / "6", which)
    with Checkpoints(three_checkpoints, keep=3) as checkpoints:
        assert checkpoints.restore(trainer)["step"] == 4
        [note] = checkpoints.skipped
        assert note.startswith(f"skipped the checkpoint of step 6 in {three_checkpoints}: it is damaged (its "
                               f"{'metadata' if which == 'all files' else 'arrays'} cannot be read: ")
        aside = note.split("; moved it to ")[1]
        assert Path(aside).parent == three_checkpoints and Path(aside).is_dir()
        assert checkpoints.steps() == [2, 4]
        checkpoints.save(trainer, 6)  # the resumed run saves step 6 again
    with Checkpoints(three_checkpoints, keep=3) as checkpoints:
        assert checkpoints.steps() == [2, 4, 6] and checkpoints.metadata()["step"] == 6


def test_every_checkpoint_damaged_is_an_error(trainer, three_checkpoints):
    for step in (2, 4, 6):
        truncate(three_checkpoints / str(step))
    with Checkpoints(three_checkpoints, keep=3) as checkpoints:
        with pytest.raises(CheckpointError, match=f"^every checkpoint in {three_checkpoints} is damaged \\(skipped the "
                           "checkpoint of step 6 .* step 4 .* step 2 .*\\); run without --resume to start fresh"):
            checkpoints.restore(trainer)


def test_a_model_folder_that_does_not_exist():
    with pytest.raises(ModelConfigError, match="^model folder /no/such/dir does not exist; pass a Hugging Face model "
                       "folder"):
        ModelConfig.preset("/no/such/dir")
    with pytest.raises(ModelConfigError, match="^unknown model preset 'lama3-8b'; presets: llama2-7b, "):
        ModelConfig.preset("lama3-8b")


def finetune_module():
    spec = importlib.util.spec_from_file_location("finetune", ROOT / "scripts" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lora_has_its_own_default_learning_rate():
    """Adapters start at zero: at full fine-tuning's 1e-5 they barely move; LoRA's customary rate is 1e-4 to 2e-4."""
    from moai_jax.models import lora

    finetune = finetune_module()
    for argv, pretrained, expected in ((["--use-lora"], True, 2e-4), (["--use-lora"], False, 2e-4), ([], True, 1e-5)):
        args = finetune.parse_args(argv)
        assert finetune.default_learning_rate(pretrained, lora.from_arguments(args))[0] == expected


def test_the_command_reports_a_full_disk_in_one_line(trainer, tmp_path):
    """The real command, its checkpoint folder filling at the second save: one line, exit status 2, step 1 kept."""
    command = [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--flavor", "1", "--max-steps", "2",
               "--batch-size", "2", "--block-size", "32", "--save-steps", "1"]
    state_kib = sum(x.nbytes for x in jax.tree.leaves(trainer.state)) // 1024  # a trained checkpoint: 0.9x to 1x
    with small_disk(state_kib * 3 // 2) as disk:  # room for one checkpoint of the trained state, not two
        where = (disk or tmp_path) / "ckpt"
        if disk is None:  # the same run, every save after the first failing as on a full disk
            command[1:2] = ["-c", INJECT, command[1]]
        done = subprocess.run([*command, "--checkpoint-dir", str(where)], capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
        assert done.returncode == 2, done.stderr[-3000:]
        assert done.stderr.strip().splitlines()[-1] == (
            f"error: the disk is full: the checkpoint of step 2 could not be written to {where}; the last intact "
            f"checkpoint is step 1 ({where / '1'}), which --resume continues from; free space there or pass another "
            "--checkpoint-dir")
        assert "Traceback" not in done.stderr and "ERROR" not in done.stderr, done.stderr[-3000:]
        assert sorted(os.listdir(where)) == ["1"]
        # the plan's first lines say the learning rate
        assert ("Optimizer: AdamW, peak learning rate 0.003 (the default for a preset's random weights; --lr to "
                "change), 1 warmup step, then cosine decay to 0.0003") in done.stdout.splitlines()[:3]


INJECT = """
import errno, runpy, sys
import orbax.checkpoint as ocp
real_save = ocp.CheckpointManager.save
def save(self, step, *args, **kwargs):
    if step > 1:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_cpu_mfu_is_over_this_machines_measured_peak(tmp_path, monkeypatch):
    """The `cpu` profile's FLOP/s are nominal (MFU read 246%): benchmark.py divides by this machine's
    measured peak instead, one core's matmul rate times the cores, measured once and cached; simulated
    devices share it."""
    import json

    from moai_jax import cpu_peak
    from moai_jax.accelerator import hardware_profile

    monkeypatch.setenv("MOAI_JAX_CPU_PEAK_CACHE", str(tmp_path / "peak.json"))
    flops, how = cpu_peak.machine_peak_flops()
    again, how_again = cpu_peak.machine_peak_flops()
    [per_core] = json.loads((tmp_path / "peak.json").read_text()).values()
    assert flops == again == cpu_peak.cores() * per_core
    assert "measured now" in how and "measured earlier, cached in" in how_again
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    assert benchmark.peak_flops(hardware_profile("cpu"), "float32", 8) == flops
