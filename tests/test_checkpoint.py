"""Checkpoints through the real command: exact resume, resume on other flavors, kill -9 during saves,
Hugging Face export against transformers, and clear errors for bad checkpoint folders."""

import dataclasses
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import finetune_runs
import pytest
from flax import nnx

from moai_jax.checkpoint import Checkpoints, load_model
from moai_jax.models import ModelConfig

# one xdist worker runs these tests (--dist loadgroup): they share the straight run's checkpoints
pytestmark = pytest.mark.xdist_group("checkpoint")

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "scripts" / "finetune.py"
# the run of test_distributed.py's one-process reference on the same mesh: its compiled step is cached for the other
RUN = ["--batch-size", "8", "--block-size", "32", "--max-steps", "10"]
# the runs inherit the suite's persistent compilation cache (tests/conftest.py): a restarted run skips
# recompiling its step, and a step another test compiled is not compiled again
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def finetune(*args, user: list[str] = (), script: Path = FINETUNE, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*user, sys.executable, str(script), *RUN, *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=300, **kwargs)


def finetune_here(*args) -> subprocess.CompletedProcess:
    """`finetune` in this process, with its 8 devices (no start-up to pay): the exit status and what it printed.
    A new process's whole stderr (native log lines included) is checked by the read-only folder test."""
    return finetune_runs.finetune_here(*RUN, *args)


def losses(metrics_file: Path) -> dict[int, float]:
    """step → loss; a step logged twice (re-run after a resume) keeps its last value."""
    return {r["step"]: r["loss"] for r in map(json.loads, metrics_file.read_text().splitlines())}


def folder_listing(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def params_of(checkpoint_dir: Path, step: int) -> dict:
    model, _ = load_model(checkpoint_dir, step)
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="session")
def straight(tmp_path_factory):
    """10 steps at flavor 8 on a data=2,fsdp=2,tensor=2 mesh, saving (asynchronously) at steps 5 and 10,
    and the model in Hugging Face format at the end."""
    out = tmp_path_factory.mktemp("straight")
    done = finetune_here("--flavor", 8, "--mesh", "data=2,fsdp=2,tensor=2", "--checkpoint-dir", out / "ckpt",
                    "--save-steps", 5, "--metrics-file", out / "metrics.jsonl", "--save-model-dir", out / "final")
    assert done.returncode == 0, done.stderr[-3000:]
    assert Checkpoints(out / "ckpt", writable=False).steps() == [5, 10]
    return out


def resume_from_step_5(straight: Path, where: Path, *flavor_args, run=finetune) -> dict[int, float]:
    """Copy the straight run's checkpoints as they stood after step 5, resume there (`run`: in a new process,
    or `finetune_here`), train to 10."""
    shutil.copytree(straight / "ckpt", where / "ckpt", ignore=shutil.ignore_patterns("10"))
    done = run(*flavor_args, "--checkpoint-dir", where / "ckpt", "--save-steps", 5, "--resume",
                    "--metrics-file", where / "metrics.jsonl")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resumed from the checkpoint of step 5" in done.stdout
    resumed = losses(where / "metrics.jsonl")
    assert sorted(resumed) == list(range(6, 11))  # the exact next step, to the same end
    return resumed


def test_resume_is_exact(straight, tmp_path):
    resumed = resume_from_step_5(straight, tmp_path, "--flavor", 8, "--mesh", "data=2,fsdp=2,tensor=2")
    reference = losses(straight / "metrics.jsonl")
    np.testing.assert_allclose([resumed[s] for s in range(6, 11)], [reference[s] for s in range(6, 11)],
                               rtol=0, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
                 params_of(tmp_path / "ckpt", 10), params_of(straight / "ckpt", 10))


# resharded onto fewer devices and other axes (flavor 1, all on one device, restores by the same path); the
# program of test_distributed.py's resume at flavor 4, in this process as there (test_resume_is_exact resumes in
# a new one)
@pytest.mark.parametrize("flavor, mesh", [(4, "data=1,fsdp=2,tensor=2")])
def test_resume_on_another_flavor(straight, tmp_path, flavor, mesh):
    resumed = resume_from_step_5(straight, tmp_path, "--flavor", flavor, "--mesh", mesh, run=finetune_here)
    reference = losses(straight / "metrics.jsonl")
    np.testing.assert_allclose([resumed[s] for s in range(6, 11)], [reference[s] for s in range(6, 11)],
                               rtol=0, atol=1e-5)
    meta = Checkpoints(tmp_path / "ckpt", writable=False).metadata(10)
    assert meta["plan"]["flavor"] == flavor and meta["data_position"]["step"] == 10


def complete_steps(ckpt: Path) -> list[int]:
    return [int(name) for name in os.listdir(ckpt) if name.isdigit()] if ckpt.is_dir() else []


def in_save(ckpt: Path) -> bool:
    """A save is being written: Orbax's temporary folder exists (renamed to the step when complete)."""
    return ckpt.is_dir() and any("orbax-checkpoint-tmp" in name for name in os.listdir(ckpt))


KILLS_IN_A_SAVE = 3  # each kill is a fresh process (start, restore, compile from the cache): ~10 s of the suite


def test_kill_9_during_saves_leaves_the_last_checkpoint(tmp_path):
    """Saving every step, kill -9 the run at random moments while a save is being written; each time
    --resume restores the newest complete checkpoint, and re-run steps repeat their losses exactly."""
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    args = ["--flavor", 1, "--max-steps", 30, "--checkpoint-dir", ckpt, "--save-steps", 1, "--keep", 2,
            "--metrics-file", metrics]
    rng, kills, last, seen = random.Random(0), 0, None, {}
    for attempt in range(12):
        command = [sys.executable, str(FINETUNE), *RUN, *map(str, args)] + (["--resume"] if last else [])
        proc = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in proc.stdout:  # up to the first step line: resumed, compiled, training
            if line.startswith("Resumed from"):
                assert f"step {last} in" in line  # the newest complete checkpoint
            if line.startswith("[Step "):
                break
        while max(complete_steps(ckpt), default=0) <= (last or 0):  # a new checkpoint is done...
            time.sleep(0.005)
        deadline = time.monotonic() + rng.uniform(0.0, 0.5)  # ...then a random moment, in a save
        while time.monotonic() < deadline or not in_save(ckpt) and time.monotonic() < deadline + 5:
            time.sleep(0.002)
        during_save = in_save(ckpt)
        proc.kill()  # SIGKILL
        proc.wait()
        proc.stdout.close()
        kills += during_save
        steps = Checkpoints(ckpt, writable=False).steps()
        assert steps and (last is None or steps[-1] >= last)
        last = steps[-1]
        print(f"kill -9 #{attempt + 1}: during a save: {during_save}; newest complete checkpoint: step {last}")
        for record in map(json.loads, metrics.read_text().splitlines()):
            seen.setdefault(record["step"], []).append(record["loss"])
        metrics.unlink()
        if kills >= KILLS_IN_A_SAVE:
            break
    assert kills >= KILLS_IN_A_SAVE, f"only {kills} of {attempt + 1} kills landed during a save"
    done = finetune_here(*args, "--resume")  # to the end, in this process: it restores only what is on disk
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Resumed from the checkpoint of step {last}" in done.stdout
    for record in map(json.loads, metrics.read_text().splitlines()):
        seen.setdefault(record["step"], []).append(record["loss"])
    assert sorted(seen) == list(range(1, 31))
    repeated = [v for v in seen.values() if len(v) > 1]  # steps logged before a kill and again after it
    for values in repeated:
        np.testing.assert_allclose(values, values[0], rtol=0, atol=1e-6)
    assert not in_save(ckpt)  # stale partial saves are cleaned up


def test_export_loads_in_transformers(straight, tmp_path):
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.spec_from_file_location("export_script", ROOT / "scripts" / "export.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--checkpoint-dir", str(straight / "ckpt"), "--save-model-dir", str(tmp_path / "hf")]) == 0
    exported, final = (load_file(d / "model.safetensors") for d in (tmp_path / "hf", straight / "final"))
    assert exported.keys() == final.keys()  # the same as finetune.py's --save-model-dir at the end
    for name in exported:
        np.testing.assert_array_equal(exported[name], final[name])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer("hello")["input_ids"]

    model, _ = load_model(straight / "ckpt")
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 32)).astype(np.int32)
    ours = np.asarray(jax.device_get(model(ids)))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def check_error(done: subprocess.CompletedProcess, starts: str, runs: int = 1) -> None:
    """Exit status 2 and, of each of the `runs`, one line `error: {starts}...` on stderr (nothing else)."""
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == runs and all(line.startswith(f"error: {starts}") for line in lines), done.stderr[-3000:]


def test_resume_without_a_checkpoint(tmp_path):
    check_error(finetune_here("--checkpoint-dir", tmp_path / "empty", "--resume"), "no checkpoint in")


def test_resume_a_checkpoint_of_another_model(straight, tmp_path):
    other = tmp_path / "other-model"
    other.mkdir()
    config = dataclasses.replace(ModelConfig.preset("tiny"), hidden_size=32)
    (other / "config.json").write_text(json.dumps(config.to_hf_dict()))
    before = folder_listing(straight / "ckpt")
    done = finetune_here("--model-name-or-path", other, "--checkpoint-dir", straight / "ckpt", "--resume")
    check_error(done, "checkpoint of step 10")
    assert "another model (hidden_size 64 (now 32))" in done.stderr
    assert folder_listing(straight / "ckpt") == before


def test_checkpoint_folder_not_writable(straight):
    """A read-only folder holding checkpoints: refused before training, as a user who cannot write it."""
    base = Path(tempfile.mkdtemp())
    try:
        shutil.copytree(straight / "ckpt", base / "ckpt", ignore=shutil.ignore_patterns("10"))
        for path in [base, *base.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        before = folder_listing(base / "ckpt")
        # Root writes anywhere: run as nobody then, who may still read (and search) every file as root does
        # (CAP_DAC_READ_SEARCH), so a checkout, venv or temporary folder only root can read works too; the
        # folder's mode bits are what refuses the write, as for any other user.
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=+dac_read_search",
                  "--ambient-caps=+dac_read_search"] if os.geteuid() == 0 else []
        # a fresh run, then a resume, in one new process (tests/finetune_runs.py)
        run = ["--checkpoint-dir", base / "ckpt"]
        done = finetune(*run, "--then", *RUN, *run, "--resume", user=nobody, cwd=base,
                        script=ROOT / "tests" / "finetune_runs.py")
        check_error(done, f"cannot write to {base / 'ckpt'}", runs=2)
        assert folder_listing(base / "ckpt") == before
    finally:
        for path in [base, *base.rglob("*")]:
            path.chmod(0o755)
        shutil.rmtree(base)
