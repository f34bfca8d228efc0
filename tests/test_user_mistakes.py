"""A new user's mistakes against the scripts: each answers one line `error: ...` and exit 2, no traceback."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def script_main(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def refused(capsys, main, argv: list[str], message: str) -> str:
    """Run a script's main in-process; it must exit 2 with `message` on its one `error:` line, before any work."""
    assert main(argv) == 2, argv
    out, err = capsys.readouterr()
    last = err.strip().splitlines()[-1]  # progress bars may come before it, never a traceback
    assert last.startswith("error: ") and message in last and "Traceback" not in err, (argv, err)
    assert "[Step" not in out, argv
    return last


def test_a_flavor_beyond_what_can_be_simulated_is_refused_at_once():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the script simulates its flavor's devices itself
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "finetune.py"), "--flavor", "1000000000"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == ("error: flavor 1000000000 is beyond the 1024 devices moai_jax can simulate on a "
                                   "CPU; choose a flavor of at most 1024")


def test_finetune_refuses_settings_that_cannot_be_meant(tmp_path, capsys):
    finetune = script_main("finetune")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    typed = tmp_path / "typed.jsonl"
    typed.write_text(json.dumps({"instruction": 5, "output": None}) + "\n")
    for argv, message in [
        (["--lr", "-1"], "--lr must be above 0, not -1.0"),
        (["--lr", "nan"], "--lr must be above 0, not nan"),
        (["--lr", "inf"], "--lr must be above 0, not inf"),
        (["--lr", "0"], "--lr must be above 0, not 0.0"),
        (["--weight-decay", "-0.1"], "--weight-decay must be at least 0, not -0.1"),
        (["--weight-decay", "nan"], "--weight-decay must be at least 0, not nan"),
        (["--warmup-steps", "-1"], "--warmup-steps must be at least 0, not -1"),
        (["--memory-fraction", "1.5"], "--memory-fraction must be in (0, 1], not 1.5"),
        (["--memory-fraction", "0"], "--memory-fraction must be in (0, 1], not 0.0"),
        (["--seed", "-1"], "--seed must be at least 0, not -1"),
        (["--metrics-file", str(blocker / "m.jsonl")], f"cannot write the metrics file {blocker / 'm.jsonl'}"),
        (["--warmup-steps", "5", "--max-steps", "2"], "--warmup-steps 5 is beyond the run's 2 steps; use at most 2"),
        (["--dataset-name-or-path", str(typed)], "instruction is int, not text in row 1"),
    ]:
        refused(capsys, finetune, ["--flavor", "1"] + argv, message)
    assert blocker.read_text() == "not a folder"
    line = refused(capsys, finetune, ["--flavor", "1", "--device-memory", "1KB", "--max-steps", "1"], "no plan fits")
    assert "MiB per device" in line and "budget of 800 B" in line and "0.00" not in line, line


def test_plan_on_simulated_devices_fits_the_hosts_memory_or_says_what_would(capsys):
    plan = script_main("plan")
    line = refused(capsys, plan, ["--model", "llama3.2-1b", "--flavor", "8", "--batch-size", "64", "--block-size", "1024",
                                  "--memory-fraction", "0.01"], "no plan fits 8 × cpu at batch 64 × 1024")
    assert "the 8 simulated device(s) share this host's" in line and "needs a host with about" in line, line
    refused(capsys, plan, ["--devices-per-host", "0"], "--devices-per-host must be at least 1, not 0")


def test_export_of_an_empty_folder_says_what_to_pass(tmp_path, capsys):
    empty = tmp_path / "ckpt"
    empty.mkdir()
    line = refused(capsys, script_main("export"), ["--checkpoint-dir", str(empty), "--save-model-dir",
                                                   str(tmp_path / "model")], f"no checkpoint in {empty}")
    assert "--resume" not in line and "--checkpoint-dir of a finetune.py run" in line, line
