"""The main job as a user runs it: `python scripts/finetune.py --flavor 8`, and its bad inputs."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "finetune.py"
STEP_LINE = re.compile(r"^\[Step (\d+)/(\d+)\] \| Loss: (\S+) \| Duration: \d+\.\d\d \| Throughput: \d+\.\d\d tokens/sec$")


def run_script(*args, cwd=ROOT, **env_changes):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **env_changes}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


def finetune_main():
    spec = importlib.util.spec_from_file_location("finetune", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_default_main_job_learns(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    # the main job as a user runs it, LLVM optimising: its many steps cost more than its few compiles
    result = run_script("--flavor", "8", "--metrics-file", str(metrics), XLA_FLAGS="")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert "flavor 8" in lines[0] and "mesh data=" in lines[0]
    assert any(line.startswith("Compiled the train step in ") for line in lines)
    steps = [STEP_LINE.match(line) for line in lines if line.startswith("[Step ")]
    assert steps and all(steps), [line for line in lines if line.startswith("[Step ")][:3]
    total = int(steps[0].group(2))
    assert [int(m.group(1)) for m in steps] == list(range(1, total + 1))
    first, last = float(steps[0].group(3)), float(steps[-1].group(3))
    assert last <= 0.7 * first, (first, last)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, total + 1))
    assert {"step", "loss", "duration", "tokens_per_sec", "learning_rate"} <= set(records[0])
    assert records[-1]["loss"] == pytest.approx(last, rel=1e-6)
    assert lines[-2].startswith(f"Done: {total} steps")


@pytest.mark.parametrize("args, message", [
    (["--flavor", "0"], "flavor must be at least 1"),
    (["--flavor", "-2"], "flavor must be at least 1"),
    (["--flavor", "eight"], "flavor must be a whole number"),
    (["--flavor", "8", "--mesh", "data=2,fsdp=2"], "choose axes whose product is 8"),
    (["--flavor", "8", "--batch-size", "12", "--mesh", "data=8"], "the nearest batch sizes that can are 8 or 16"),
    (["--flavor", "8", "--mesh", "tensor=8"], "choose tensor from"),
    (["--flavor", "1", "--model-name-or-path", "llama9-1t"], "llama3-8b"),
    (["--flavor", "1", "--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert finetune_main()(args + ["--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # progress bars may come before it, never a traceback
    assert last.startswith("error: ") and message in last and "Traceback" not in err, err


def test_unwritable_model_dir_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert finetune_main()(["--flavor", "1", "--save-model-dir", str(blocker / "model")]) == 2
    err = capsys.readouterr()
    assert err.err.startswith(f"error: cannot write to {blocker / 'model'}") and "--save-model-dir" in err.err
    assert "[Step" not in err.out and blocker.read_text() == "not a folder"


def test_bad_input_from_the_shell_has_no_traceback():
    result = run_script("--flavor", "0")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: flavor must be at least 1 device, not 0"


def test_pretrained_directory_with_its_own_tokenizer(tmp_path, bpe_tokenizer_dir):
    """A Hugging Face folder (random tiny Llama + a trained BPE tokenizer) in, fine-tuned folder out."""
    import shutil

    import torch
    import transformers

    model_dir = tmp_path / "tiny-llama"
    shutil.copytree(bpe_tokenizer_dir, model_dir)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    out = tmp_path / "out"
    result = run_script("--flavor", "4", "--model-name-or-path", str(model_dir), "--dataset-name-or-path",
                        str(ROOT / "tests" / "fixtures" / "bpe_corpus.txt"), "--batch-size", "4", "--block-size", "64",
                        "--max-steps", "3", "--lr", "1e-3", "--save-model-dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert sum(line.startswith("[Step ") for line in result.stdout.splitlines()) == 3
    tuned = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == len(transformers.AutoTokenizer.from_pretrained(model_dir))
    before = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    weight = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(tuned.state_dict()[weight], before.state_dict()[weight])  # it trained and saved
