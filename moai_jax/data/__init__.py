"""Data sets in, tokenized and packed global batches out, resumable.

    from moai_jax import data

    tokenizer = data.load_tokenizer_for("tiny")                   # a preset: the built-in byte tokenizer
    tokens = data.load_dataset(None, tokenizer, block_size=512)   # None: the built-in data set
    print(tokens.summary())                                       # rows, packing efficiency
    for batch in data.Batches(tokens, batch_size=8, seed=0, epochs=3):
        ...                                                       # numpy int32 arrays [8, 512]

Public API:
- `load_tokenizer_for(model_name_or_path)`: a Hugging Face model folder's own tokenizer
  (`AutoTokenizer`, local files), or `ByteTokenizer` for a preset name (see `byte_tokenizer.py`).
- `load_dataset(name_or_path, tokenizer, block_size, *, format=None, packing=True,
  eval_fraction=0.05, seed=0, max_positions=None, vocab_size=None, cache_dir=None) -> TokenizedData`.
  `name_or_path`: None for the built-in data set (`default_data/tasks.jsonl`); a `.jsonl`, `.json`,
  `.parquet`, `.csv` or `.txt` file (text files: one document per paragraph); a folder of such files
  or one written by `datasets.save_to_disk`; or a hub name, `owner/name[:config]`, when online.
  Formats: see `formats.py`. A `validation` (or `test`) split is the eval split; without one,
  `eval_fraction` of the documents, drawn with `seed`, is held out. Tokenizing shows a progress bar
  and is cached by `datasets` (under `cache_dir`, default the `datasets` cache).
- `Batches(data, batch_size, *, seed=0, epochs=1, split="train", process_index=0, process_count=1,
  position=None)`: this process's slice of the global batches of a split, in a fixed order for the
  seed; `.steps` (one pass per epoch), `.position` (plain state for a checkpoint; pass it back as
  `position=` to continue with the next batch). See `batches.py`.

A batch is a dict of int32 arrays [rows, block_size]: `input_ids`; `labels`, the token that should
follow each input token, -100 where there is no loss (prompt, padding, the last token of a
document); `segment_ids`, 1, 2, 3... per document in the row and 0 for padding; `positions`, from 0
in each document.

Modules: `load.py` (read, tokenize, split), `formats.py` (which columns make a document),
`packing.py` (documents → rows), `batches.py` (rows → global batches, resumable),
`byte_tokenizer.py` (presets' tokenizer), `builtin.py` (the built-in data set in `default_data/`).
"""

from moai_jax.data.batches import Batches
from moai_jax.data.byte_tokenizer import ByteTokenizer, load_tokenizer_for
from moai_jax.data.load import TokenizedData, load_dataset

__all__ = ["Batches", "ByteTokenizer", "TokenizedData", "load_dataset", "load_tokenizer_for"]
