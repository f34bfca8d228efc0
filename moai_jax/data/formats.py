"""Data set formats: which columns mean what, and how one example becomes tokens with a loss mask.

Formats are detected from the column names, in this order (the first match wins), and can be named
to override the detection (e.g. `text` for an Alpaca set that also carries a `text` column):

| format          | columns                                                            |
| --------------- | ------------------------------------------------------------------ |
| `instructions`  | `messages` (chat), `instruction`/`output` (+ optional `input`), `prompt`/`response` |
| `summarization` | `article`/`highlights` (cnn_dailymail), `document`/`summary` (xsum) |
| `text`          | `text`                                                             |

Instructions and summaries are rendered with an Alpaca-style prompt, e.g.
`### Instruction:\\n...\\n\\n### Input:\\n...\\n\\n### Response:\\n` followed by the answer; the loss
falls on the answer and the eos after it only. Chat `messages` use the tokenizer's chat template
(loss on every assistant turn); a tokenizer without one renders `### Role:\\ncontent\\n\\n` per message.
Text is trained on every token. Except with a chat template (which writes its own), each example
starts with the tokenizer's bos and ends with its eos, where it has them.

An example that cannot be trained on is dropped, with its reason (`problem`): a column holding
something other than text (a number, a list), an empty answer, a conversation without an
assistant turn. `load_dataset` reports which rows were dropped and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moai_jax.errors import DataError

FORMATS: dict[str, tuple[tuple[str, ...], ...]] = {
    "instructions": (("messages",), ("instruction", "output"), ("prompt", "response")),
    "summarization": (("article", "highlights"), ("document", "summary")),
    "text": (("text",),),
}


def _accepted() -> str:
    return "; ".join(f"{name}: " + ", ".join("/".join(cols) for cols in options) for name, options in FORMATS.items())


@dataclass(frozen=True)
class Format:
    """A format and the columns it reads."""

    name: str
    columns: tuple[str, ...]


def detect_format(column_names: Sequence[str], format: str | None, source: str) -> Format:
    """The format of a data set with these columns, or the named one if its columns are there."""
    if format is not None and format not in FORMATS:
        raise DataError(f"unknown data set format {format!r}; use one of {', '.join(FORMATS)}")
    for name in [format] if format else FORMATS:
        for columns in FORMATS[name]:
            if set(columns) <= set(column_names):
                return Format(name, columns)
    wanted = f"the {format} format reads" if format else "moai_jax reads"
    raise DataError(
        f"data set {source} has columns {', '.join(column_names) or '(none)'}, but {wanted} "
        f"({_accepted()}); rename the columns or pick another format"
    )


def _text(value) -> str:
    return "" if value is None else str(value)


def _alpaca(instruction: str, input: str) -> str:
    prompt = f"### Instruction:\n{instruction}\n\n"
    if input:
        prompt += f"### Input:\n{input}\n\n"
    return prompt + "### Response:\n"


def _chat(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """A conversation as (text, is_answer) pieces; the assistant turns are the answers."""
    if not getattr(tokenizer, "chat_template", None):
        pieces = []
        for m in messages:
            role = m["role"]
            pieces += [(f"### {role.capitalize()}:\n", False), (_text(m["content"]) + "\n\n", role == "assistant")]
        return pieces

    def render(turns, prompt):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)

    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (before.startswith(done) and through.startswith(before)):
            raise DataError("the tokenizer's chat template does not render a conversation turn by turn; use another format")
        pieces += [(before[len(done) :], False), (through[len(before) :], True)]
        done = through
    return pieces + [(render(messages, False)[len(done) :], False)]


def problem(format: Format, example: dict) -> str | None:
    """Why an example cannot be trained on (None when it can): a value that is not text, or no answer."""
    if format.columns == ("messages",):
        messages = example["messages"]
        turns = isinstance(messages, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), (str, type(None)))
            for m in messages)
        if not turns:
            return "messages is not a list of {role, content} texts"
        return None if any(m["role"] == "assistant" for m in messages) else "messages has no assistant turn"
    optional = ("input",) if format.columns == ("instruction", "output") else ()
    for column in format.columns + optional:
        value = example.get(column)
        if value is not None and not isinstance(value, str):
            return f"{column} is {type(value).__name__}, not text"
    answer = format.columns[-1]
    return None if (example[answer] or "").strip() else f"{answer} is empty"


def render(format: Format, example: dict, tokenizer) -> list[tuple[str, bool]]:
    """One example (one without a `problem`) as (text, is_answer) pieces."""
    columns = format.columns
    if columns == ("text",):
        return [(example["text"], True)]
    if columns == ("messages",):
        return _chat(tokenizer, example["messages"])
    if columns == ("instruction", "output"):
        prompt = _alpaca(_text(example["instruction"]), _text(example.get("input")))
    elif columns == ("prompt", "response"):
        prompt = _alpaca(_text(example["prompt"]), "")
    else:
        prompt = f"### Article:\n{_text(example[columns[0]])}\n\n### Summary:\n"
    return [(prompt, False), (_text(example[columns[1]]), True)]


@dataclass(frozen=True)
class Tokenize:
    """The `datasets.map` function (batched): examples → `input_ids` and `loss_mask` per document, and
    `dropped`, the reason an example was left out ("" when it was not; its ids are then empty)."""

    format: Format
    tokenizer: object

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        size = len(next(iter(batch.values())))
        examples = [{k: v[i] for k, v in batch.items()} for i in range(size)]
        reasons = [problem(self.format, example) or "" for example in examples]
        docs = [None if reason else render(self.format, example, self.tokenizer)
                for example, reason in zip(examples, reasons)]
        texts = [text for doc in docs if doc is not None for text, _ in doc]
        ids = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        templated = self.format.columns == ("messages",) and getattr(self.tokenizer, "chat_template", None)
        bos = None if templated else getattr(self.tokenizer, "bos_token_id", None)
        eos = None if templated else getattr(self.tokenizer, "eos_token_id", None)
        out = {"input_ids": [], "loss_mask": [], "dropped": reasons}
        for doc in docs:
            tokens, mask = ([bos], [0]) if bos is not None and doc is not None else ([], [])
            for _, is_answer in doc or ():
                piece = list(next(ids))
                tokens += piece
                mask += [int(is_answer)] * len(piece)
            if eos is not None and doc is not None:
                tokens.append(eos)
                mask.append(1)
            out["input_ids"].append(tokens)
            out["loss_mask"].append(mask)
        return out
