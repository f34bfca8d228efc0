"""Mixture-of-Experts as a user trains it: finetune.py on a tiny Qwen3-MoE folder saved by transformers (the loss
falls, the router loss in the metrics file), and the bad inputs, each one line."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"^\[Step (\d+)/(\d+)\] \| Loss: (\S+) \| Duration: \d+\.\d\d \| Throughput: \d+\.\d\d tokens/sec$")
# design.md's tiny config, as a Qwen3-MoE: 8 experts, top-2, per-head q/k norms
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, router_aux_loss_coef=0.01, max_position_embeddings=256, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
RUN = ["--batch-size", "8", "--block-size", "32", "--lr", "1e-2", "--warmup-steps", "0",
       "--dataset-name-or-path", str(ROOT / "tests" / "fixtures" / "bpe_corpus.txt")]


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def save_tiny_moe(path: Path, tokenizer_dir: Path, **overrides) -> Path:
    """A Hugging Face folder: a random tiny Qwen3-MoE saved by transformers, with the BPE tokenizer."""
    shutil.copytree(tokenizer_dir, path)
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**TINY | overrides)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory, bpe_tokenizer_dir):
    return save_tiny_moe(tmp_path_factory.mktemp("moe") / "tiny-qwen3-moe", bpe_tokenizer_dir)


def test_finetune_trains_a_moe_folder_and_logs_the_router_loss(moe_dir, tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    assert script("finetune")(["--flavor", "8", "--model-name-or-path", str(moe_dir), *RUN, "--epochs", "3", "--max-steps", "8",
                               "--metrics-file", str(metrics)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "qwen3_moe" in lines[0] and "flavor 8" in lines[0]
    steps = [STEP_LINE.match(line) for line in lines if line.startswith("[Step ")]
    assert len(steps) == 8 and all(steps)  # the step line unchanged
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["loss"] < 0.8 * records[0]["loss"], [r["loss"] for r in records]
    # transformers' load-balancing loss: E · Σ f_e P_e, 1 when the router is perfectly balanced
    assert all(0.9 < r["router_loss"] < 8 and r["dropped_fraction"] == 0 for r in records), records[0]
    assert all("router_z_loss" in r for r in records)


def test_expert_degree_that_does_not_divide_the_experts_is_one_line(moe_dir, capsys):
    assert script("finetune")(["--flavor", "6", "--model-name-or-path", str(moe_dir), *RUN, "--max-steps", "1",
                               "--mesh", "data=2,expert=3"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: expert=3 does not divide the model's 8 experts") and "Traceback" not in err, err


def test_top_k_above_the_experts_is_one_line(moe_dir, tmp_path, capsys):
    folder = tmp_path / "top-9-of-8"
    shutil.copytree(moe_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"num_experts_per_tok": 9}))
    assert script("finetune")(["--model-name-or-path", str(folder), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "num_experts_per_tok (9) must be between 1 and " \
        "num_experts (8)" in err and "Traceback" not in err, err


def test_checkpoint_missing_an_expert_names_it(moe_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    from moai_jax.errors import WeightsError
    from moai_jax.models import load_pretrained

    folder = tmp_path / "missing-expert"
    shutil.copytree(moe_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.5.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"has no tensor 'model\.layers\.1\.mlp\.experts\.5\.down_proj\.weight'"):
        load_pretrained(folder)


@pytest.mark.parametrize("flavor, mesh", [(1, None), (8, "expert=4,tensor=2")])
def test_greedy_generation_with_the_kv_cache_equals_transformers(moe_dir, flavor, mesh):
    """One family stands for all three: the cache, the decode loop and the MoE layer are the same code for each
    (families differ in attention's norms and checkpoint names, which test_moe checks against transformers)."""
    from test_generate import NEW_TOKENS, prompts, transformers_greedy

    from moai_jax import Accelerator
    from moai_jax.generation import Generator
    from moai_jax.models import load_pretrained

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    generator = Generator(load_pretrained(moe_dir), accelerator=Accelerator(flavor), mesh=mesh)
    expected = transformers_greedy(hf_model, prompts(), generator.eos)
    assert max(map(len, expected)) == NEW_TOKENS  # not all rows stopped early
    assert generator.run(prompts(), NEW_TOKENS).token_ids == expected


def random_lora(folder: Path, lora):
    """The model of `folder` with LoRA on it and every adapter's B random (B = 0 would hide a wrong export)."""
    import jax

    from moai_jax.models import load_pretrained
    from moai_jax.models import lora as lora_lib

    model = lora_lib.apply_lora(load_pretrained(folder), lora)
    for i, adapter in enumerate(lora_lib.adapters(model).values()):
        adapter.b[...] = 0.1 * jax.random.normal(jax.random.key(i), adapter.b.shape)
    model.eval()
    return model


def test_lora_on_experts_merges_and_loads_in_peft_with_equal_logits(moe_dir, tmp_path):
    import jax.numpy as jnp
    import numpy as np
    from peft import PeftModel

    from moai_jax.models import lora as lora_lib
    from moai_jax.models.peft import save_adapters

    lora = lora_lib.LoraConfig(r=4)  # every target: gate and up become one rank-8 adapter on gate_up_proj
    model = random_lora(moe_dir, lora)
    adapter = lora_lib.adapters(model)["up"]  # one adapter per expert, stacked after the layers
    assert adapter.a.shape == (2, 8, 64, 4) and adapter.b.shape == (2, 8, 4, 32)
    ids = np.random.default_rng(0).integers(0, 300, (2, 24))
    logits = np.asarray(model(jnp.asarray(ids)))
    assert np.abs(logits - np.asarray(lora_lib.merge(model)(jnp.asarray(ids)))).max() < 1e-5
    save_adapters(model, tmp_path / "adapter", lora, str(moe_dir))
    base = transformers.AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(torch.as_tensor(ids)).logits.numpy()
        theirs = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(logits - theirs).max() < 1e-4 < 1e-2 < np.abs(logits - base_logits).max()  # the adapters count


def test_expert_adapters_are_split_with_the_experts():
    import jax
    from flax import nnx

    from moai_jax.models import Decoder, ModelConfig
    from moai_jax.models import lora as lora_lib
    from moai_jax.sharding.mesh import MeshShape, make_mesh
    from moai_jax.sharding.rules import tree_shardings

    config = ModelConfig.from_hf_dict(transformers.Qwen3MoeConfig(**TINY).to_dict())
    model = nnx.eval_shape(lambda: lora_lib.apply_lora(Decoder(config, rngs=nnx.Rngs(0)), lora_lib.LoraConfig(r=4)))
    params = nnx.state(model, nnx.Param)
    mesh = make_mesh(MeshShape.parse("expert=4,tensor=2"), jax.devices())
    shardings = tree_shardings(nnx.to_pure_dict(nnx.get_partition_spec(params)), nnx.to_pure_dict(params), mesh)
    for name in ("lora_gate", "lora_up", "lora_down"):
        a, b = (tuple(shardings["layers"]["mlp"][name][x].spec) for x in "ab")
        assert a[:2] == b[:2] == (None, "expert"), (name, a, b)  # [layers, experts, ...]: the experts split
    assert lora_lib.adapter_param_count(config, lora_lib.LoraConfig(r=4), active=True) < lora_lib.adapter_param_count(
        config, lora_lib.LoraConfig(r=4))  # a token uses 2 of the 8 experts' adapters


def test_lora_finetune_with_the_experts_split_exports_a_peft_folder(moe_dir, tmp_path):
    """LoRA on attention and every expert through finetune.py, experts split over 8 devices (the adapters go through
    the all-to-all path); the PEFT folder it writes loads over the transformers model."""
    import numpy as np
    from peft import PeftModel

    metrics, out = tmp_path / "lora.jsonl", tmp_path / "adapter"
    assert script("finetune")(["--flavor", "8", "--mesh", "expert=8", "--model-name-or-path", str(moe_dir), *RUN,
                               "--epochs", "2", "--use-lora", "--metrics-file", str(metrics),
                               "--save-model-dir", str(out)]) == 0
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    base = transformers.AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, 300, (2, 16)))
    with torch.no_grad():
        before = base(ids).logits.numpy()
        after = PeftModel.from_pretrained(base, out).eval()(ids).logits.numpy()
    assert np.abs(after - before).max() > 1e-4  # the trained adapters, applied


def test_benchmark_runs_a_tiny_moe_beside_transformers():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--model", "tiny-moe",
                           "--batch-size", "4", "--block-size", "32", "--steps", "2", "--warmup", "1", "--json"],
                          capture_output=True, text=True, timeout=600)  # the suite's XLA flags: its cache
    assert done.returncode == 0, done.stderr[-2000:]
    [result] = json.loads(done.stdout.strip().splitlines()[-1])["results"]
    mine, reference = result["moai_jax"], result["pytorch"]
    assert "error" not in reference, reference
    assert mine["tokens_per_sec"] > 0 and reference["tokens_per_sec"] > 0 and 0 < mine["mfu"] < 1
    # both train the same model from the same kind of start: the first losses near log(vocabulary), router loss in
    assert abs(mine["final_loss"] - reference["final_loss"]) < 0.5, (mine["final_loss"], reference["final_loss"])
