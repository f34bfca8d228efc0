"""Reading a data set (file, folder or hub name), tokenizing it and splitting it into train and eval rows."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from moai_jax.data.builtin import PATH as BUILTIN_PATH
from moai_jax.data.formats import Tokenize, detect_format
from moai_jax.data.packing import Documents, Rows, make_rows
from moai_jax.errors import DataError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
EVAL_SPLITS = ("validation", "valid", "test")


@dataclass(frozen=True)
class TokenizedData:
    """A data set tokenized into rows of `block_size` tokens, split into train and eval."""

    source: str
    format: str
    block_size: int
    packing: bool
    train: Rows
    eval: Rows
    dropped: str = ""  # which rows were left out and why, "" when none


    @property
    def packing_efficiency(self) -> float:
        """Share of the train rows' tokens that are not padding."""
        return self.train.efficiency

    def split(self, name: str) -> Rows:
        if name not in ("train", "eval"):
            raise DataError(f"unknown split {name!r}; use 'train' or 'eval'")
        return self.train if name == "train" else self.eval

    def summary(self) -> str:
        """One line for the log."""
        layout = "packed" if self.packing else "padded"
        cut = f", {self.train.split_documents:,} documents longer than the block cut" if self.train.split_documents else ""
        dropped = f"; {self.dropped}" if self.dropped else ""
        return (
            f"data: {self.source} ({self.format}), {len(self.train):,} train / {len(self.eval):,} eval rows "
            f"of {self.block_size} tokens, {layout}, efficiency {self.packing_efficiency:.1%}{cut}{dropped}"
        )


def _check_model_fit(tokenizer, block_size: int, max_positions: int | None, vocab_size: int | None) -> None:
    if block_size < 2:
        raise DataError(f"block size {block_size} is too small; use at least 2")
    if max_positions is not None and block_size > max_positions:
        raise DataError(
            f"block size {block_size} is beyond the model's {max_positions} maximum positions; "
            f"use --block-size {max_positions} or less"
        )
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise DataError(
            f"the tokenizer has {len(tokenizer):,} tokens but the model's vocabulary has {vocab_size:,}; "
            "use the model's own tokenizer"
        )


def _one_line(error: BaseException) -> str:
    """The first line of the error's root cause."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _looks_like_path(name: str) -> bool:
    return name.startswith((os.sep, ".", "~")) or os.path.splitext(name)[1] in BUILDERS or name.count("/") > 1


def _read(name_or_path: str, cache_dir: str | None) -> dict:
    """The splits of a file, folder or hub data set, as `datasets.Dataset`s by split name."""
    import datasets

    path = os.path.expanduser(name_or_path)
    try:
        if os.path.isfile(path):
            builder = BUILDERS.get(os.path.splitext(path)[1])
            if builder is None:
                raise DataError(f"cannot read {name_or_path}: use a {', '.join(BUILDERS)} file")
            if os.path.getsize(path) == 0:
                raise DataError(f"data set {name_or_path} is empty")
            extra = {"sample_by": "paragraph"} if builder == "text" else {}
            loaded = datasets.load_dataset(builder, data_files=path, cache_dir=cache_dir, **extra)
        elif os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(path)
        elif os.path.isdir(path):
            found = {BUILDERS.get(os.path.splitext(f)[1]) for _, _, files in os.walk(path) for f in files} - {None}
            if len(found) != 1:
                kinds = "no" if not found else "mixed"
                raise DataError(f"folder {name_or_path} holds {kinds} data files; put {', '.join(BUILDERS)} files of one kind in it")
            builder = found.pop()
            extra = {"sample_by": "paragraph"} if builder == "text" else {}
            loaded = datasets.load_dataset(builder, data_dir=path, cache_dir=cache_dir, **extra)
        elif _looks_like_path(name_or_path):
            raise DataError(f"no data set file or folder at {name_or_path}")
        else:
            name, _, config = name_or_path.partition(":")
            try:
                loaded = datasets.load_dataset(name, config or None, cache_dir=cache_dir)
            except Exception as e:
                raise DataError(f"cannot read data set {name_or_path} from the hub ({_one_line(e)}); name a local file or folder") from None
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds: bad JSON, mixed columns, unreadable files
        raise DataError(f"cannot read data set {name_or_path}: {_one_line(e)}") from None
    return {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)


def _tokenize(dataset, tokenize: Tokenize) -> tuple[Documents, dict[str, list[int]]]:
    """The documents of a `datasets.Dataset`, tokenized (cached by `datasets`) into flat arrays, and the
    rows left out: reason → row numbers, counting from 1."""
    import datasets

    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                  "loss_mask": datasets.List(datasets.Value("int8")), "dropped": datasets.Value("string")})
    mapped = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, features=features, desc="Tokenizing")
    columns = mapped.with_format("arrow")[:]
    ids, mask = columns["input_ids"].combine_chunks(), columns["loss_mask"].combine_chunks()
    offsets = ids.offsets.to_numpy()
    docs = Documents(
        tokens=ids.values.to_numpy(),
        loss_mask=mask.values.to_numpy(),
        starts=offsets[:-1].astype(np.int64),
        lengths=np.diff(offsets).astype(np.int64),
    )
    reasons = np.asarray(columns["dropped"].to_pylist(), dtype=object)
    dropped = {reason: (np.flatnonzero(reasons == reason) + 1).tolist() for reason in sorted(set(reasons) - {""})}
    return docs.take(np.flatnonzero(reasons == "")), dropped


def _dropped_note(dropped: dict[str, list[int]], split: str, total: int) -> str:
    """E.g. "dropped 3 of 40 rows of the train split: output is empty in rows 2, 7; instruction is int, not text in
    row 9 (rows numbered from 1)"."""
    def rows(numbers: list[int]) -> str:
        more = f" and {len(numbers) - 5:,} more" if len(numbers) > 5 else ""
        return f"row{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers[:5]))}{more}"

    count = sum(len(numbers) for numbers in dropped.values())
    reasons = "; ".join(f"{reason} in {rows(numbers)}" for reason, numbers in dropped.items())
    return f"dropped {count:,} of {total:,} rows of the {split} split: {reasons} (rows numbered from 1)" if count else ""


def load_dataset(
    name_or_path: str | None,
    tokenizer,
    block_size: int,
    *,
    format: str | None = None,
    packing: bool = True,
    eval_fraction: float = 0.05,
    seed: int = 0,
    max_positions: int | None = None,
    vocab_size: int | None = None,
    cache_dir: str | None = None,
) -> TokenizedData:
    """A data set read, tokenized and cut into rows of `block_size` tokens (see the module docstring)."""
    _check_model_fit(tokenizer, block_size, max_positions, vocab_size)
    source = "built-in" if name_or_path is None else name_or_path
    splits = _read(str(BUILTIN_PATH) if name_or_path is None else name_or_path, cache_dir)
    train_name = "train" if "train" in splits else next(iter(splits))
    eval_name = next((s for s in EVAL_SPLITS if s in splits and s != train_name), None)
    if len(splits[train_name]) == 0:
        raise DataError(f"data set {source} is empty")
    chosen = detect_format(splits[train_name].column_names, format, source)
    tokenize = Tokenize(chosen, tokenizer)
    docs, dropped = _tokenize(splits[train_name], tokenize)
    notes = [_dropped_note(dropped, train_name, len(splits[train_name]))]
    if len(docs) == 0:
        why = notes[0] or f"its {', '.join(chosen.columns)} column holds no text"
        raise DataError(f"data set {source} has no row to train on: {why}; fix those rows or pick another format")
    if eval_name is not None:
        eval_docs, eval_dropped = _tokenize(splits[eval_name], tokenize)
        train_docs = docs
        notes.append(_dropped_note(eval_dropped, eval_name, len(splits[eval_name])))
    else:
        held = max(1, int(len(docs) * eval_fraction)) if eval_fraction > 0 and len(docs) > 1 else 0
        order = np.random.default_rng(seed).permutation(len(docs))
        train_docs, eval_docs = docs.take(np.sort(order[held:])), docs.take(np.sort(order[:held]))
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    return TokenizedData(
        source=source,
        format=chosen.name,
        block_size=block_size,
        packing=packing,
        train=make_rows(train_docs, block_size, pad_id, packing),
        eval=make_rows(eval_docs, block_size, pad_id, packing),
        dropped="; ".join(filter(None, notes)),
    )
