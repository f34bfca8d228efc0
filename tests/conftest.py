"""Every test sees 8 CPU devices, set before JAX starts; one compilation cache; shared fixtures."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole suite: both xdist workers and every subprocess (they inherit
# this environment) reuse what another compiled. JAX keys each entry by the program's HLO, the compile options,
# the XLA flags, the backend and the jax/jaxlib versions, so a stale entry is never used.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# LLVM's optimisations off: XLA:CPU compiles in about half the CPU-seconds (docs/testing.md), and what the tests
# compare is unchanged (XLA's HLO passes still shard, fuse and assign buffers: the same bytes per device, measured).
# Subprocesses inherit it, so their compiles are in the same cache; the device count is jax_num_cpu_devices below,
# so a script's child process still sets its own.
# The same for XLA:CPU's MLIR fusion emitters: with them off (the older emitters), a step compiles in about half
# the CPU-seconds again, compiled bytes within 0.01%; losses equal in the 3 cases measured, 5th-digit apart over the
# main job's 89 steps (docs/testing.md: the mesh tests compare runs under the same flags).
# jaxlib 0.10 knows the flag; XLA refuses to start on a flag it does not know, so it is set for 0.10 only.
from importlib.metadata import version  # noqa: E402

FAST_COMPILE = ["--xla_backend_optimization_level=0"]
if version("jaxlib").startswith("0.10."):
    FAST_COMPILE.append("--xla_cpu_use_fusion_emitters=false")
for flag in FAST_COMPILE:
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory):
    """A BPE tokenizer trained with `tokenizers` on the fixture text, saved as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(FIXTURES / "bpe_corpus.txt")], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    path = tmp_path_factory.mktemp("bpe") / "tokenizer"
    fast.save_pretrained(str(path))
    return path


# -- what each test costs, in CPU-seconds (docs/testing.md) -------------------------------------------------
# `MOAI_TEST_CPU=costs.jsonl python -m pytest ...` appends one line per test: its CPU-seconds (user + system, of
# this process and of the subprocesses it waited for) and wall seconds, setup and teardown included, so a
# module-scoped fixture is charged to the first test that uses it. CPU-seconds barely change when other work
# shares the cores, wall seconds do. At the end the run prints the CPU-seconds per file.
COSTS = os.environ.get("MOAI_TEST_CPU")


def _cpu_seconds() -> float:
    import resource

    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


if COSTS:
    import collections
    import json
    import time

    # this process's XLA compiles (JAX's monitoring events): requests to the persistent cache, its hits, and the
    # seconds spent compiling or reading the cache; a subprocess's are in its CPU-seconds only
    _compiles = collections.Counter()
    jax.monitoring.register_event_listener(lambda event, **_: _compiles.update([event]))
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **_: _compiles.update({event: seconds}))
    _EVENTS = {"compiles": "/jax/compilation_cache/compile_requests_use_cache",
               "cache_hits": "/jax/compilation_cache/cache_hits", "compile_s": "/jax/core/compile/backend_compile_duration"}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        cpu, wall, compiles = _cpu_seconds(), time.monotonic(), _compiles.copy()
        yield
        record = {"test": item.nodeid, "cpu_s": round(_cpu_seconds() - cpu, 2), "wall_s": round(time.monotonic() - wall, 2)}
        record |= {name: round(_compiles[event] - compiles[event], 2) for name, event in _EVENTS.items()}
        with open(COSTS, "a") as out:  # one short line per write: both xdist workers append safely
            out.write(json.dumps(record) + "\n")

    def pytest_terminal_summary(terminalreporter, config):
        if hasattr(config, "workerinput") or not Path(COSTS).is_file():  # an xdist worker: the controller prints
            return
        per_file: dict[str, collections.Counter] = {}
        for record in map(json.loads, Path(COSTS).read_text().splitlines()):
            per_file.setdefault(record["test"].split("::")[0], collections.Counter()).update(
                {k: v for k, v in record.items() if k != "test"} | {"tests": 1})
        terminalreporter.write_sep("=", f"CPU-seconds per file ({COSTS})")
        for name, c in sorted(per_file.items(), key=lambda kv: -kv[1]["cpu_s"]):
            terminalreporter.write_line(f"{c['cpu_s']:8.1f} CPU-s {c['wall_s']:8.1f} s wall {c['tests']:4d} tests "
                                        f"{c['compiles']:5.0f} compiles {c['cache_hits']:5.0f} cache hits  {name}")
        terminalreporter.write_line(f"{sum(c['cpu_s'] for c in per_file.values()):8.1f} CPU-s in all")
