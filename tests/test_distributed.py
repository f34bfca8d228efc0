"""Several processes as one virtual accelerator (jax.distributed over gloo on this CPU): the same
training as one process, checkpoints across process counts, a killed process, and bad jobs."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import finetune_runs
import pytest
from flax import nnx

from moai_jax import distributed
from moai_jax.checkpoint import load_model
from moai_jax.sharding.mesh import MeshShape

# one xdist worker runs these tests (--dist loadgroup): they share each mesh's one- and two-process runs
pytestmark = pytest.mark.xdist_group("distributed")

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "scripts" / "finetune.py"
RUN = ["--batch-size", "8", "--block-size", "32", "--max-steps", "10", "--save-steps", "5"]
# the processes inherit the suite's persistent compilation cache (tests/conftest.py): a resumed job skips
# recompiling its step
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "MOAI_INIT_TIMEOUT": "60"}
# Processes split the outermost axes: on 2×2×2 the data axis spans them (fsdp and tensor stay inside each), on
# fsdp=8 the fsdp axis does; data=8 would add no other code path than 2×2×2's data axis.
MESHES = ("data=2,fsdp=2,tensor=2", "fsdp=8")


def launch(processes: int, *args, all_output: bool = False, script: Path = FINETUNE, **kwargs):
    """`python -m moai_jax.launch --processes N -- scripts/finetune.py ...` as a user types it."""
    command = [sys.executable, "-m", "moai_jax.launch", "--processes", str(processes),
               *(["--all-output"] if all_output else []), "--", str(script), *RUN, *map(str, args)]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900, **kwargs)


def finetune_here(*args) -> None:
    """One process with 8 devices: this test process itself (no start-up to pay)."""
    done = finetune_runs.finetune_here(*RUN, *args)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(metrics_file: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, metrics_file.read_text().splitlines())}


def params_of(checkpoint_dir: Path, step: int) -> dict:
    model, _ = load_model(checkpoint_dir, step)
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def same_training(got: dict[int, float], want: dict[int, float], steps) -> None:
    assert sorted(got) == list(steps)
    np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=1e-5, atol=0)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """mesh → (folder, its part of the launcher's output) of 10 steps in 2 processes × 4 devices (`two`) and
    in this process × 8 devices (`one`), each saving checkpoints at steps 5 and 10. One launch trains every
    mesh in turn (tests/finetune_runs.py: the processes start once), showing both processes' output."""
    outs = {mesh: tmp_path_factory.mktemp(mesh.replace(",", "_").replace("=", "")) for mesh in MESHES}

    def args(mesh: str, name: str) -> list:  # the Hugging Face export: on fsdp=8
        out = outs[mesh]
        return ["--flavor", 8, "--mesh", mesh, "--checkpoint-dir", out / name, "--metrics-file", out / f"{name}.jsonl",
                *(["--save-model-dir", out / f"{name}-hf"] if mesh == MESHES[1] else [])]

    two = launch(2, *args(MESHES[0], "two"), "--then", *RUN, *args(MESHES[1], "two"), all_output=True,
                 script=ROOT / "tests" / "finetune_runs.py")
    assert two.returncode == 0, two.stderr[-3000:]
    header = "[0] moai_jax: llama tiny on 8 simulated CPU devices"
    outputs = [header + part for part in two.stdout.split(header)[1:]]  # process 0 prints a header per run
    assert len(outputs) == len(MESHES), two.stdout[-3000:]
    for mesh in MESHES:
        finetune_here(*args(mesh, "one"))
    return lambda mesh: (outs[mesh], outputs[MESHES.index(mesh)])


@pytest.mark.parametrize("mesh", MESHES)
def test_two_processes_train_as_one(mesh, trained):
    """2 processes × 4 devices = 1 process × 8: the same losses and final parameters, and one step
    line and one metrics line per step (process 1 prints none)."""
    out, printed = trained(mesh)
    steps = [line for line in printed.splitlines() if "[Step " in line]
    assert [line.split("/")[0] for line in steps] == [f"[0] [Step {s}" for s in range(1, 11)]
    assert f"| mesh {MeshShape.parse(mesh)} |" in printed.splitlines()[0]
    assert [json.loads(line)["step"] for line in (out / "two.jsonl").read_text().splitlines()] == list(range(1, 11))
    same_training(losses(out / "two.jsonl"), losses(out / "one.jsonl"), range(1, 11))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 params_of(out / "two", 10), params_of(out / "one", 10))
    if mesh == MESHES[1]:  # the Hugging Face export: gathered over both processes, written by process 0
        from safetensors.numpy import load_file

        two_hf, one_hf = (load_file(out / name / "model.safetensors") for name in ("two-hf", "one-hf"))
        assert two_hf.keys() == one_hf.keys()
        for name in one_hf:
            np.testing.assert_allclose(two_hf[name], one_hf[name], rtol=1e-5, atol=1e-6)
        assert sorted(p.name for p in (out / "two-hf").iterdir()) == sorted(p.name for p in (out / "one-hf").iterdir())


def resume_folder(saved: Path, where: Path) -> Path:
    """A copy of a run's checkpoints as they stood after step 5."""
    shutil.copytree(saved, where, ignore=shutil.ignore_patterns("10"))
    return where


def test_checkpoint_of_two_processes_resumes_in_one_at_flavor_4(trained, tmp_path):
    run, _ = trained(MESHES[0])
    ckpt = resume_folder(run / "two", tmp_path / "ckpt")
    finetune_here("--flavor", 4, "--mesh", "fsdp=2,tensor=2", "--checkpoint-dir", ckpt, "--resume",
                  "--metrics-file", tmp_path / "metrics.jsonl")
    same_training(losses(tmp_path / "metrics.jsonl"), losses(run / "one.jsonl"), range(6, 11))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_checkpoint_of_one_process_resumes_in_two_and_survives_a_kill(trained, tmp_path):
    """Resume a one-process checkpoint in 2 processes, kill -9 process 1 mid-run: the launcher stops
    the other and says which died; --resume then continues from the last checkpoint to the same losses."""
    run, _ = trained(MESHES[0])
    ckpt = resume_folder(run / "one", tmp_path / "ckpt")
    args = ["--flavor", 8, "--mesh", MESHES[0], "--checkpoint-dir", ckpt, "--save-steps", 1, "--resume",
            "--metrics-file", tmp_path / "metrics.jsonl"]
    command = [sys.executable, "-m", "moai_jax.launch", "--processes", "2", "--", str(FINETUNE), *RUN, *map(str, args)]
    log = tmp_path / "launch.log"
    with open(log, "w") as stderr:
        job = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
    while not log.read_text().endswith("\n"):
        time.sleep(0.01)
    started = log.read_text().splitlines()[0]
    assert started.startswith("launch: 2 processes joined at 127.0.0.1:"), started
    pids = [int(part.split(":")[1]) for part in started.split("pids ")[1].split(", ")]
    while not (ckpt / "6").is_dir():  # the job's first checkpoint is complete: kill it mid-run
        assert job.poll() is None and not (ckpt / "10").exists(), "the run ended before the kill"
        time.sleep(0.005)
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    job.wait(timeout=60)
    assert time.monotonic() - killed < 60 and job.returncode != 0
    said = log.read_text()
    assert "launch: process 1 was killed by SIGKILL; stopping the other 1" in said, said[-3000:]
    assert not any(alive(pid) for pid in pids)

    first = losses(tmp_path / "metrics.jsonl")
    (tmp_path / "metrics.jsonl").unlink()
    again = launch(2, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    last = int(again.stdout.split("Resumed from the checkpoint of step ")[1].split()[0])
    assert 6 <= last < 10  # a checkpoint of the killed job
    steps = [line.split("/")[0] for line in again.stdout.splitlines() if "[Step " in line]
    assert steps == [f"[Step {s}" for s in range(last + 1, 11)]  # process 0's output only, unprefixed
    resumed = losses(tmp_path / "metrics.jsonl")
    assert sorted(resumed) == list(range(last + 1, 11))
    same_training({**first, **resumed}, losses(run / "one.jsonl"), range(6, 11))  # re-run steps: the same


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error:" in line]


def test_flavor_not_divisible_by_the_processes():
    done = launch(2, "--flavor", 3, all_output=True)
    assert done.returncode == 2, done.stderr[-3000:]
    message = "error: flavor 3 does not split over 2 processes; use a multiple of 2"
    assert sorted(line.split("error:")[0] for line in error_lines(done.stderr) if message in line) == ["[0] ", "[1] "]
    assert "launch: process" in done.stderr.splitlines()[-1] and "Traceback" not in done.stderr


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_processes_with_different_flavors_and_batch_sizes():
    address, procs = free_address(), []
    for index, (flavor, batch) in enumerate([(8, 8), (4, 16)]):
        job = ["--coordinator-address", address, "--num-processes", 2, "--process-id", index]
        command = [sys.executable, str(FINETUNE), *RUN, *map(str, job), "--flavor", str(flavor), "--batch-size", str(batch)]
        procs.append(subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err[-3000:]
        assert error_lines(err) == [
            "error: the processes disagree on the arguments (process 0: batch_size 8, flavor 8; process 1: "
            "batch_size 16, flavor 4); start every process with the same arguments"], err[-3000:]


@pytest.mark.parametrize("job, message", [
    (["--num-processes", "2", "--process-id", "2"], "--process-id 2 is outside the job's processes 0 to 1"),
    (["--num-processes", "2", "--process-id", "-1"], "--process-id -1 is outside the job's processes 0 to 1"),
    (["--num-processes", "2", "--process-id", "1"], "nobody listens at the coordinator address 127.0.0.1:"),
])
def test_bad_job(job, message, monkeypatch):
    """Refused before anything is started, as one line; an address nobody listens on within the timeout."""
    monkeypatch.setattr(distributed, "_joined", None)  # this test process joined no job yet
    monkeypatch.setenv("MOAI_INIT_TIMEOUT", "2")
    start = time.monotonic()
    done = finetune_runs.finetune_here(*RUN, "--coordinator-address", free_address(), *job)
    assert done.returncode == 2
    assert time.monotonic() - start < 10
    assert done.stderr.startswith(f"error: {message}") and len(done.stderr.strip().splitlines()) == 1, done.stderr
