"""Data pipeline: formats, packing, global batches per process, resume, tokenizers, bad input."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from moai_jax.data import Batches, ByteTokenizer, load_dataset, load_tokenizer_for
from moai_jax.data.builtin import PATH as BUILTIN_PATH
from moai_jax.data.builtin import builtin_examples, to_jsonl
from moai_jax.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures"
EXAMPLES = [
    {"instruction": "Reverse the word.", "input": "stone", "output": "enots"},
    {"instruction": "Add the numbers.", "input": "3 + 4", "output": "7"},
    {"instruction": "Say hello.", "input": "", "output": "hello there"},
] * 4


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(path, tokenizer=None, block_size=128, tmp_path=None, **kwargs):
    cache = str(tmp_path / "cache") if tmp_path else None
    return load_dataset(None if path is None else str(path), tokenizer or ByteTokenizer(), block_size, cache_dir=cache, **kwargs)


@pytest.fixture(scope="session")
def builtin(tmp_path_factory):
    return load(None, block_size=512, tmp_path=tmp_path_factory.mktemp("builtin"))


def test_builtin_file_is_the_generated_one():
    assert BUILTIN_PATH.read_text() == to_jsonl(builtin_examples())


def test_batch_contract(builtin):
    assert builtin.format == "instructions" and 0.9 < builtin.packing_efficiency <= 1
    assert "efficiency" in builtin.summary()
    batch = next(iter(Batches(builtin, 4, seed=0)))
    assert set(batch) == {"input_ids", "labels", "segment_ids", "positions"}
    for array in batch.values():
        assert array.dtype == np.int32 and array.shape == (4, 512)
    ids, labels, segments, positions = (batch[k] for k in ("input_ids", "labels", "segment_ids", "positions"))
    same_document = (segments[:, :-1] == segments[:, 1:]) & (segments[:, 1:] > 0)
    trained = labels[:, :-1] != -100
    assert np.all(same_document[trained])  # never across documents
    assert np.all(labels[:, :-1][trained] == ids[:, 1:][trained])  # the next token
    assert np.all(labels[segments == 0] == -100) and np.all(labels[:, -1] == -100)
    starts = segments[:, 1:] != segments[:, :-1]
    assert np.all(positions[:, 1:][starts & (segments[:, 1:] > 0)] == 0)
    assert segments.max() > 1  # several documents per row


def test_no_loss_on_prompt_tokens(tmp_path):
    data = load(write_jsonl(tmp_path / "d.jsonl", EXAMPLES), tmp_path=tmp_path, packing=False, eval_fraction=0)
    tok = ByteTokenizer()
    batch = data.train.batch(np.arange(len(data.train)))
    answers = sorted(tok.decode(row[row != -100]) for row in batch["labels"])
    assert answers == sorted(e["output"] + "\x02" for e in EXAMPLES)
    prompt = tok.decode(batch["input_ids"][0][batch["segment_ids"][0] > 0])
    assert prompt.startswith("\x01### Instruction:\n")


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_process_slices_concatenate_to_the_global_batch(builtin, processes):
    whole = list(Batches(builtin, 8, seed=3, epochs=2))
    slices = [list(Batches(builtin, 8, seed=3, epochs=2, process_index=p, process_count=processes)) for p in range(processes)]
    assert len(whole) == Batches(builtin, 8, seed=3, epochs=2).steps == 2 * (len(builtin.train) // 8)
    for step, batch in enumerate(whole):
        for key, array in batch.items():
            assert np.array_equal(np.concatenate([s[step][key] for s in slices]), array)


def test_resume_continues_with_the_next_batch(builtin):
    uninterrupted = list(Batches(builtin, 8, seed=1, epochs=2))
    first = Batches(builtin, 8, seed=1, epochs=2)
    k = first.steps_per_epoch - 2  # resume across the epoch boundary
    for _, _ in zip(range(k), first):
        pass
    saved = json.loads(json.dumps(first.position))
    resumed = list(Batches(builtin, 8, seed=1, epochs=2, position=saved, process_index=1, process_count=2))
    assert len(resumed) == len(uninterrupted) - k
    for got, want in zip(resumed, uninterrupted[k:]):
        assert np.array_equal(got["input_ids"], want["input_ids"][4:])


def test_epochs_are_reshuffled(builtin):
    batches = Batches(builtin, 8, seed=0, epochs=2)
    first = np.stack([b["input_ids"] for b in batches])
    per_epoch = batches.steps_per_epoch
    assert not np.array_equal(first[:per_epoch], first[per_epoch:])
    assert np.array_equal(np.stack([b["input_ids"] for b in Batches(builtin, 8, seed=0, epochs=2)]), first)


def test_eval_visits_every_row_once(builtin):
    rows = len(builtin.eval)
    batches = list(Batches(builtin, rows + 3, split="eval"))
    assert len(batches) == 1 and batches[0]["input_ids"].shape[0] == rows + 3
    filled = batches[0]["segment_ids"].max(axis=1) > 0
    assert filled.sum() == rows and np.all(batches[0]["labels"][~filled] == -100)


def test_resume_with_other_settings_is_refused(builtin):
    position = Batches(builtin, 8, seed=1).position
    with pytest.raises(DataError, match="batch_size 8 but this run has batch_size 4"):
        Batches(builtin, 4, seed=1, position=position)


def test_long_documents_are_cut_into_pieces(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": "abcdefghij" * 10}, {"text": "short"}])
    data = load(path, block_size=32, tmp_path=tmp_path, eval_fraction=0)
    assert data.train.split_documents == 1
    batch = data.train.batch(np.arange(len(data.train)))
    assert (batch["labels"] != -100).sum() == (102 - 4) + (7 - 1)  # 4 pieces of the long text, the short one


def test_unpacked_rows_hold_one_document(tmp_path):
    data = load(write_jsonl(tmp_path / "d.jsonl", EXAMPLES), tmp_path=tmp_path, packing=False, eval_fraction=0)
    assert len(data.train) == len(EXAMPLES) and data.packing_efficiency < 0.8
    assert data.train.batch(np.arange(len(data.train)))["segment_ids"].max() == 1


def test_packed_loss_equals_unpacked_loss(tmp_path):
    import jax
    import optax
    from flax import nnx

    from moai_jax.models import Decoder, ModelConfig

    path = write_jsonl(tmp_path / "d.jsonl", builtin_examples(24, seed=5))
    model = Decoder(ModelConfig.preset("tiny"), rngs=nnx.Rngs(0))

    def mean_loss(packing):
        rows = load(path, block_size=256, tmp_path=tmp_path, packing=packing, eval_fraction=0).train
        batch = rows.batch(np.arange(len(rows)))
        logits = model(batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"])
        labels = batch["labels"]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, np.maximum(labels, 0))
        return float(jax.numpy.sum(losses * (labels != -100)) / (labels != -100).sum()), len(rows)

    (packed, packed_rows), (unpacked, unpacked_rows) = mean_loss(True), mean_loss(False)
    assert packed_rows < unpacked_rows == 24
    assert abs(packed - unpacked) < 1e-5


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "folder", "save_to_disk", "dataset_dict"])
def test_inputs(tmp_path, kind):
    import datasets

    rows = EXAMPLES
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", rows)
    elif kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows))
    elif kind in ("parquet", "csv"):
        path = tmp_path / f"d.{kind}"
        getattr(datasets.Dataset.from_list(rows), f"to_{kind}")(str(path))
    elif kind == "folder":
        (tmp_path / "folder").mkdir()
        write_jsonl(tmp_path / "folder" / "train.jsonl", rows)
        write_jsonl(tmp_path / "folder" / "validation.jsonl", rows[:3])
        path = tmp_path / "folder"
    elif kind == "save_to_disk":
        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        path = tmp_path / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:3])}).save_to_disk(str(path))
    data = load(path, tmp_path=tmp_path, packing=False)
    assert data.format == "instructions"
    if kind in ("folder", "dataset_dict"):
        assert (len(data.train), len(data.eval)) == (len(rows), 3)
    else:
        assert (len(data.train), len(data.eval)) == (len(rows) - 1, 1)  # eval_fraction of 12 rounds up to 1


def test_formats(tmp_path):
    alpaca = [dict(e, text="whole text") for e in EXAMPLES]
    assert load(write_jsonl(tmp_path / "a.jsonl", alpaca), tmp_path=tmp_path).format == "instructions"
    assert load(write_jsonl(tmp_path / "a.jsonl", alpaca), tmp_path=tmp_path, format="text").format == "text"
    news = [{"article": "The river rose.", "highlights": "Flood.", "id": "1"}] * 4
    data = load(write_jsonl(tmp_path / "n.jsonl", news), tmp_path=tmp_path, packing=False, eval_fraction=0)
    labels = data.train.batch(np.arange(1))["labels"][0]
    assert data.format == "summarization" and ByteTokenizer().decode(labels[labels != -100]) == "Flood.\x02"
    prompts = [{"prompt": "Say yes.", "response": "yes"}] * 4
    assert load(write_jsonl(tmp_path / "p.jsonl", prompts), tmp_path=tmp_path).format == "instructions"


def test_chat_without_template_trains_on_assistant_turns(tmp_path):
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]}] * 2
    data = load(write_jsonl(tmp_path / "c.jsonl", chat), tmp_path=tmp_path, packing=False, eval_fraction=0)
    labels = data.train.batch(np.arange(1))["labels"][0]
    assert ByteTokenizer().decode(labels[labels != -100]) == "hello\n\nsee you\n\n\x02"


def test_bpe_tokenizer_from_a_folder(tmp_path, bpe_tokenizer_dir):
    tokenizer = load_tokenizer_for(str(bpe_tokenizer_dir))
    assert type(tokenizer).__name__ != "ByteTokenizer" and len(tokenizer) <= 300
    data = load(FIXTURES / "bpe_corpus.txt", tokenizer, block_size=128, tmp_path=tmp_path, vocab_size=300)
    assert data.format == "text" and len(data.eval) >= 1
    assert list((tmp_path / "cache").rglob("cache-*.arrow"))  # tokenized once, cached by datasets
    batch = next(iter(Batches(data, 2, seed=0)))
    ids = batch["input_ids"][0][batch["segment_ids"][0] == 1]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]).split()[0] in Path(FIXTURES / "bpe_corpus.txt").read_text()
    assert batch["input_ids"].max() < 300


def test_chat_template_marks_assistant_turns(tmp_path, bpe_tokenizer_dir):
    tokenizer = load_tokenizer_for(str(bpe_tokenizer_dir))
    chat = [{"messages": [{"role": "user", "content": "where is the river"}, {"role": "assistant", "content": "in the valley"}]}] * 2
    data = load(write_jsonl(tmp_path / "c.jsonl", chat), tokenizer, tmp_path=tmp_path, packing=False, eval_fraction=0)
    labels = data.train.batch(np.arange(1))["labels"][0]
    assert tokenizer.decode(labels[labels != -100]) == "in the valley</s>"


def test_preset_gets_the_byte_tokenizer():
    tokenizer = load_tokenizer_for("tiny")
    assert isinstance(tokenizer, ByteTokenizer) and len(tokenizer) == 256
    assert tokenizer.decode(tokenizer.encode("héllo")) == "\x01héllo"


def test_byte_tokenizer_saves_as_a_hugging_face_tokenizer(tmp_path):
    ByteTokenizer().save_pretrained(str(tmp_path))
    saved, tokenizer = load_tokenizer_for(str(tmp_path)), ByteTokenizer()
    assert len(saved) == 256 and (saved.bos_token_id, saved.eos_token_id, saved.pad_token_id) == (1, 2, 0)
    text = "héllo, 世界!\n\n### Response:\n  x"
    assert saved.encode(text) == tokenizer.encode(text)
    assert saved(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert saved.decode(tokenizer.encode(text), skip_special_tokens=True) == text


@pytest.mark.parametrize(
    "make, kwargs, message",
    [
        (lambda d: d / "missing.jsonl", {}, "no data set file or folder at .*missing.jsonl"),
        (lambda d: write_jsonl(d / "empty.jsonl", []), {}, "data set .*empty.jsonl is empty"),
        (lambda d: write_jsonl(d / "blank.jsonl", [{"text": " "}]), {}, "has no row to train on: .*text is empty"),
        (lambda d: write_jsonl(d / "typed.jsonl", [{"instruction": 5, "output": None}]), {},
         r"no row to train on: dropped 1 of 1 rows of the train split: instruction is int, not text in row 1 "),
        (lambda d: write_jsonl(d / "qa.jsonl", [{"question": "q", "answer": "a"}]), {},
         r"has columns question, answer, but moai_jax reads \(instructions: messages, instruction/output"),
        (lambda d: write_jsonl(d / "qa.jsonl", [{"text": "a"}]), {"format": "summarization"}, "the summarization format reads"),
        (lambda d: write_jsonl(d / "qa.jsonl", [{"text": "a"}]), {"format": "poetry"}, "unknown data set format 'poetry'"),
        (lambda d: d / "x.jsonl", {"block_size": 1024, "max_positions": 512}, "block size 1024 is beyond the model's 512 maximum positions"),
        (lambda d: d / "x.jsonl", {"vocab_size": 128}, "the tokenizer has 256 tokens but the model's vocabulary has 128"),
        (lambda d: d / "d.yaml", {}, "cannot read .*d.yaml: use a .jsonl"),
    ],
)
def test_bad_input_raises_one_line_data_error(tmp_path, make, kwargs, message):
    (tmp_path / "d.yaml").write_text("a: 1")
    with pytest.raises(DataError, match=message) as error:
        load(make(tmp_path), tmp_path=tmp_path, **kwargs)
    assert "\n" not in str(error.value)


def test_too_few_rows_for_a_batch(tmp_path):
    data = load(write_jsonl(tmp_path / "d.jsonl", EXAMPLES), tmp_path=tmp_path, packing=False)
    with pytest.raises(DataError, match="the train split has 11 rows of 128 tokens, fewer than one batch of 16; use a batch size of at most 10"):
        Batches(data, 16, process_count=2)
    with pytest.raises(DataError, match="does not split over 4 processes"):
        Batches(data, 6, process_count=4)


def test_rows_that_cannot_be_trained_on_are_named(tmp_path):
    bad = [{"instruction": "say hi", "output": None}, {"instruction": ["a list"], "output": "x"},
           {"instruction": "a", "output": " "}]
    data = load(write_jsonl(tmp_path / "d.jsonl", EXAMPLES[:3] + bad), tmp_path=tmp_path, eval_fraction=0)
    note = ("dropped 3 of 6 rows of the train split: instruction is list, not text in row 5; output is empty in "
            "rows 4, 6 (rows numbered from 1)")
    assert data.dropped == note and note in data.summary()
    advice = "use a batch size of at most 2 (--batch-size) or a smaller block size"
    with pytest.raises(DataError, match=re.escape(f"2 rows of 128 tokens, fewer than one batch of 8; {advice}; {note}")):
        Batches(data, 8)


def test_missing_model_folder():
    with pytest.raises(DataError, match="no model folder at /no/such/model"):
        load_tokenizer_for("/no/such/model")
