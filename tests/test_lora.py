"""LoRA (models/lora.py): 50 steps through finetune.py against the base model, PEFT and the merged
model; the same steps on three meshes and resumed on another; the planner's LoRA; bad inputs."""

import importlib.util
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moai_jax as moai
from moai_jax.checkpoint import Checkpoints
from moai_jax.models import Decoder, ModelConfig, flops_per_token, load_pretrained, save_pretrained
from moai_jax.models import lora as lora_lib
from moai_jax.optimizer import adamw, learning_rate_schedule

# one xdist worker runs these tests (--dist loadgroup): they share the 50-step LoRA run
pytestmark = pytest.mark.xdist_group("lora")

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--batch-size", "8", "--block-size", "32", "--seed", "0", "--lr", "1e-2", "--warmup-steps", "0"]


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def losses(metrics_file: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in metrics_file.read_text().splitlines()]


def tiny_base(path: Path, tokenizer_dir: Path) -> Path:
    """A Hugging Face folder: a random tiny Llama (design.md's tiny config) and a BPE tokenizer."""
    shutil.copytree(tokenizer_dir, path)
    save_pretrained(Decoder(ModelConfig(vocab_size=300), rngs=nnx.Rngs(7)), path)
    return path


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, bpe_tokenizer_dir):
    """50 LoRA steps through finetune.py on the tiny base, checkpointed, a PEFT folder out; the Trainer kept."""
    out = tmp_path_factory.mktemp("lora")
    base = tiny_base(out / "base", bpe_tokenizer_dir)
    trainers = []
    init = moai.Trainer.__init__

    def keep(self, *args, **kwargs):
        init(self, *args, **kwargs)
        trainers.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(moai.Trainer, "__init__", keep)
        assert script("finetune")([*RUN, "--model-name-or-path", str(base), "--max-steps", "50", "--use-lora",
                                   "--metrics-file", str(out / "lora.jsonl"), "--checkpoint-dir", str(out / "ckpt"),
                                   "--save-steps", "50", "--save-model-dir", str(out / "peft")]) == 0
        assert script("finetune")([*RUN, "--model-name-or-path", str(base), "--max-steps", "1",
                                   "--metrics-file", str(out / "full.jsonl")]) == 0
    return out, base, trainers[0]


def test_lora_trains_adapters_only_from_the_base(lora_run):
    out, base, trainer = lora_run
    lora_losses, base_loss = losses(out / "lora.jsonl"), losses(out / "full.jsonl")[0]
    assert len(lora_losses) == 50 and np.mean(lora_losses[-10:]) < 0.96 * lora_losses[0], lora_losses[::10]
    assert lora_losses[0] == pytest.approx(base_loss, rel=1e-6)  # B = 0: the first step is the base model's
    assert "LoRA r 8" in trainer.plan.summary() and trainer.plan.lora["targets"] == list(lora_lib.TARGETS)
    frozen, _ = lora_lib.split_base(jax.device_get(trainer._rest))
    original = jax.device_get(nnx.to_pure_dict(nnx.state(load_pretrained(base), nnx.Param)))
    flat, reference = jax.tree.leaves_with_path(frozen), dict(jax.tree.leaves_with_path(original))
    assert len(flat) == len(reference) and all(np.array_equal(v, reference[k]) for k, v in flat)  # bit-identical
    trained = jax.tree.leaves(trainer.state.params)
    assert all(x.dtype == jnp.float32 for x in trained) and sum(x.size for x in trained) == lora_lib.adapter_param_count(
        trainer.config, lora_lib.LoraConfig())
    moments = [x for x in jax.tree.leaves(trainer.state.opt_state) if x.ndim > 0]  # Adam's, float32, adapters only
    assert all(x.dtype == jnp.float32 for x in moments) and sum(x.size for x in moments) == 2 * sum(
        x.size for x in trained)


def test_merged_and_peft_models_match_the_lora_model(lora_run, tmp_path):
    import torch
    import transformers
    from peft import PeftModel

    out, base, trainer = lora_run
    model = trainer.model
    model.eval()
    ids = np.random.default_rng(0).integers(0, 300, (2, 32))
    logits = np.asarray(model(jnp.asarray(ids)))
    assert np.abs(logits - np.asarray(lora_lib.merge(model)(jnp.asarray(ids)))).max() < 1e-5

    assert script("export")(["--checkpoint-dir", str(out / "ckpt"), "--save-model-dir", str(tmp_path / "merged"),
                             "--merge-lora"]) == 0
    assert np.abs(logits - np.asarray(load_pretrained(tmp_path / "merged")(jnp.asarray(ids)))).max() < 1e-5
    assert script("export")(["--checkpoint-dir", str(out / "ckpt"), "--save-model-dir", str(tmp_path / "adapter")]) == 0
    for folder in (out / "peft", tmp_path / "adapter"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft = PeftModel.from_pretrained(hf, folder).eval()
        with torch.no_grad():
            theirs = peft(torch.as_tensor(ids)).logits.numpy()
        assert np.abs(logits - theirs).max() < 1e-4, folder


def spec(sharding) -> tuple:
    """A sharding's PartitionSpec as a tuple without trailing Nones (P(None, "fsdp", None) is P(None, "fsdp"))."""
    parts = tuple(sharding.spec)
    while parts and parts[-1] is None:
        parts = parts[:-1]
    return parts


def full_batch(input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """A batch with every key the Trainer plans for (one document per row), so each step runs the
    executable the planner compiled instead of compiling one for fewer keys."""
    rows, length = input_ids.shape
    labels = np.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    return {"input_ids": input_ids, "labels": labels, "segment_ids": np.ones_like(input_ids),
            "positions": np.broadcast_to(np.arange(length), (rows, length))}


def test_same_lora_steps_on_every_mesh_and_resumed_on_another(lora_run, tmp_path):
    out, base, _ = lora_run
    config = ModelConfig(vocab_size=300)
    batches = [full_batch(np.random.default_rng(i).integers(0, 300, (8, 32))) for i in range(3)]
    lora = lora_lib.LoraConfig(r=4, targets=("q", "v", "o", "down"))
    runs, trainers = {}, {}
    for mesh in ("data=1,fsdp=1,tensor=1", "data=1,fsdp=8,tensor=1", "data=2,fsdp=2,tensor=2"):  # 2×2×2: data too
        flavor = 1 if mesh.startswith("data=1,fsdp=1") else 8
        # built eagerly (a tiny model: no initializer to compile per mesh), but on 2×2×2 built under jit into its shards
        build = lambda: Decoder(config, rngs=nnx.Rngs(3))  # noqa: E731
        model = build if mesh == "data=2,fsdp=2,tensor=2" else build()
        trainer = trainers[mesh] = moai.Trainer(model, adamw(1e-2), 8, 32, moai.Accelerator(flavor), mesh,
                                                micro_batches=1, remat="none", lora=lora)
        runs[mesh] = [float(trainer.step(b)["loss"]) for b in batches]
    reference = runs["data=1,fsdp=1,tensor=1"]
    for mesh, run in runs.items():
        np.testing.assert_allclose(run, reference, rtol=1e-5, err_msg=mesh)
    # 2×2×2: adapters split like the weight they adapt, the frozen base split by its logical names
    attention = trainer.rest_shardings["layers"]["attention"]
    assert spec(attention["q_proj"]) == (None, "fsdp", "tensor")
    adapters = trainer.param_shardings["layers"]["attention"]
    assert spec(adapters["lora_query"]["a"]) == (None, "fsdp")
    assert spec(adapters["lora_query"]["b"]) == (None, None, "tensor")
    assert spec(adapters["lora_out"]["a"]) == (None, "tensor")
    # a LoRA checkpoint of the 50-step run (adapters and Adam state, no base) resumes on 8 devices
    saved = Checkpoints(out / "ckpt", writable=False)
    params = saved._manager.item_metadata(50)["params"]
    assert all("lora_" in "/".join(map(str, k)) for k, _ in jax.tree.leaves_with_path(params))
    schedule = learning_rate_schedule(1e-2, 50, warmup_steps=0)  # finetune.py's optimizer, so its state fits
    resumed = moai.Trainer(lambda: Decoder(config, rngs=nnx.Rngs(0)), adamw(schedule), 8, 32, moai.Accelerator(8),
                           "data=2,fsdp=4,tensor=1", micro_batches=1, remat="none", lora=lora_lib.LoraConfig(),
                           params=lambda shardings: load_pretrained(base, shardings=shardings))
    saved.restore(resumed)
    trained = lora_run[2]
    np.testing.assert_array_equal(jax.device_get(resumed.state.params["layers"]["mlp"]["lora_up"]["b"]),
                                  jax.device_get(trained.state.params["layers"]["mlp"]["lora_up"]["b"]))
    assert resumed.evaluate(batches[:1]) == pytest.approx(trained.evaluate(batches[:1]), rel=1e-5)
    with pytest.raises(moai.CheckpointError, match="resume with the LoRA options"):  # r 4 on q,v,o,down: refused
        saved.restore(trainers["data=1,fsdp=1,tensor=1"])
    saved.close()


def test_planner_fits_70b_with_lora_where_full_fine_tuning_does_not():
    acc = moai.Accelerator(8, "h100")
    config = ModelConfig.preset("llama3-70b")
    with pytest.raises(moai.NoPlanFits, match="LoRA"):
        moai.plan(config, 32, 1024, acc, verify=False)
    plan = moai.plan(config, 32, 1024, acc, verify=False, lora=lora_lib.LoraConfig())
    memory = plan.estimated_bytes_per_device
    assert memory["total"] <= plan.budget_bytes_per_device and memory["optimizer"] < 2**30
    assert plan.lora == lora_lib.LoraConfig().to_dict() and "LoRA" in str(plan)
    ratio = lora_lib.flops_per_token(config, 1024, lora_lib.LoraConfig()) / flops_per_token(config, 1024)
    assert 0.6 < ratio < 0.72  # no base weight gradients: about 2/3 of full fine-tuning's FLOPs


@pytest.mark.parametrize("args, message", [
    (["--use-lora", "--lora-r", "0"], "LoRA rank 0 must be"),
    (["--use-lora", "--lora-targets", "q,attn"], "unknown LoRA target(s) 'attn'"),
    (["--lora-r", "4"], "--lora-r needs --use-lora"),
    (["--merge-lora"], "--merge-lora needs --use-lora"),
    (["--use-lora", "--lora-r", "33"], "exceeds the smaller side (32) of the k projection"),
])
def test_bad_lora_input_is_one_line_and_exit_2(args, message, capsys):
    assert script("finetune")(["--max-steps", "1", *args]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err and "Traceback" not in err, err
