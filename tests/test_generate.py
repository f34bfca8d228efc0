"""Generation against transformers' generate: greedy tokens equal on flavor 1 and 8; seeded sampling;
the real command on a Hugging Face folder and on a training checkpoint; its bad inputs."""

import importlib.util
from pathlib import Path

import numpy as np
import optax
import pytest
import torch
from flax import nnx
from test_families import reference
from test_hf import make_hf_model

from moai_jax import Accelerator, Plan, Trainer
from moai_jax.checkpoint import Checkpoints
from moai_jax.generation import Generator
from moai_jax.models import Decoder, ModelConfig, load_pretrained
from moai_jax.sharding.mesh import MeshShape

NEW_TOKENS = 32
# the flavor-8 mesh of each model (None: the inference plan's); Llama and Qwen2 from test_hf, the others test_families
MESHES = {"llama-grouped-untied": None, "qwen2-bias": "data=2,fsdp=2,tensor=2", "gpt2": None, "gemma2": None}
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "generate.py"


def prompts(count=3, seed=0):
    """Token ids of prompts of different lengths (ids from 3 on: no bos/eos inside)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, n).tolist() for n in (5, 11, 8)[:count]]


def until_eos(tokens, eos):
    ends = [i for i, t in enumerate(tokens) if t in eos]
    return list(tokens[: ends[0] + 1 if ends else len(tokens)])


def transformers_greedy(hf_model, prompt_ids, eos):
    """transformers' greedy generate on the left-padded batch, each row cut after its end of sequence."""
    length = max(map(len, prompt_ids))
    ids, mask = np.zeros((len(prompt_ids), length), np.int64), np.zeros((len(prompt_ids), length), np.int64)
    for row, p in enumerate(prompt_ids):
        ids[row, length - len(p):], mask[row, length - len(p):] = p, 1
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                max_new_tokens=NEW_TOKENS, pad_token_id=0)
    return [until_eos(row, eos) for row in out[:, length:].tolist()]


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """case → (folder, transformers model), made on first use."""
    made = {}

    def get(case):
        if case not in made:
            path = tmp_path_factory.mktemp(case)
            made[case] = (path, make_hf_model(case, path)) if "-" in case else reference(case, str(path))[::-1]
        return made[case]

    return get


@pytest.mark.parametrize("case", list(MESHES))
def test_greedy_equals_transformers(case, saved):
    path, hf_model = saved(case)
    model = load_pretrained(path)
    flavor_1 = Generator(model, accelerator=Accelerator(1))
    expected = transformers_greedy(hf_model, prompts(), flavor_1.eos)
    assert max(map(len, expected)) == NEW_TOKENS  # not all rows stopped early
    assert flavor_1.run(prompts(), NEW_TOKENS).token_ids == expected
    flavor_8 = Generator(model, accelerator=Accelerator(8), mesh=MESHES[case])
    assert flavor_8.mesh.size == 8 and flavor_8.batch_shards > 1  # weights split, prompts split
    assert flavor_8.run(prompts(), NEW_TOKENS).token_ids == expected


def test_sampling_is_reproducible(saved):
    generator = Generator(load_pretrained(saved("llama-grouped-untied")[0]))
    sample = lambda seed, top_p=0.9: generator.run(prompts(), NEW_TOKENS, 1.0, top_p, seed).token_ids  # noqa: E731
    first = sample(0)
    assert sample(0) == first
    assert sample(1) != first
    assert sample(0, top_p=1e-6) == generator.run(prompts(), NEW_TOKENS).token_ids  # a nucleus of one: greedy


def script_main():
    spec = importlib.util.spec_from_file_location("generate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def answers(stdout: str, count: int) -> list[list[str]]:
    """The printed answers, as lines (an answer of random bytes may hold line breaks of any kind)."""
    blocks = [stdout.split(f"--- answer {i} ---\n")[1] for i in range(1, count + 1)]
    ends = [f"--- prompt {i} ---\n" for i in range(2, count + 1)] + ["Generated "]
    return [block.split(end)[0].splitlines() for block, end in zip(blocks, ends)]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A training checkpoint of the tiny preset (random weights, no step taken) and the model it holds."""
    plan = Plan(flavor=1, hardware="cpu", mesh=MeshShape(), batch_size=8, seq_len=32)
    trainer = Trainer(Decoder(ModelConfig.preset("tiny"), rngs=nnx.Rngs(0)), optax.sgd(0.1), 8, 32, Accelerator(1),
                      plan=plan)
    path = tmp_path_factory.mktemp("ckpt")
    with Checkpoints(path) as checkpoints:
        checkpoints.save(trainer, 1, run={"model_name_or_path": "tiny"})
    return path, trainer.model


def test_script_on_a_checkpoint(checkpoint, capsys):
    path, model = checkpoint
    texts = ["### Instruction:\nReverse the word.\n\n### Input:\ndog\n\n### Response:\n", "hello"]
    assert script_main()(["--checkpoint-dir", str(path), "--flavor", "8", "--max-new-tokens", "8",
                          *[a for t in texts for a in ("--prompt", t)]]) == 0
    out = capsys.readouterr().out
    assert "mesh data=4,fsdp=1,tensor=2" in out.splitlines()[0] and "tokens/s" in out.splitlines()[-1]
    from moai_jax.data import ByteTokenizer
    expected = Generator(model, ByteTokenizer(), Accelerator(8))(texts, 8)  # the same executable
    assert answers(out, len(texts)) == [a.splitlines() for a in expected]


@pytest.mark.parametrize("args, message", [
    (["--model-name-or-path", "tiny"], "no prompts to answer"),
    (["--model-name-or-path", "tiny", "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens (--max-new-tokens)"),
    (["--model-name-or-path", "tiny", "--prompt", "x" * 500, "--max-new-tokens", "20"], "prompt 1 has 501 tokens"),
    (["--model-name-or-path", "tiny", "--prompt", "hi", "--top-p", "0"], "top_p (--top-p)"),
    (["--prompt", "hi"], "pass --model-name-or-path"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert script_main()(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_checkpoint_of_another_model(checkpoint, saved, tmp_path, capsys):
    other = saved("qwen2-bias")[0]
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("\n")
    assert script_main()(["--checkpoint-dir", str(checkpoint[0]), "--prompts-file", str(empty)]) == 2
    assert "no prompts to answer" in capsys.readouterr().err
    assert script_main()(["--checkpoint-dir", str(checkpoint[0]), "--model-name-or-path", str(other),
                          "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds another model" in err[0], err
