"""Prompts for generation, read from a file and written the way training wrote its examples.

A `.jsonl` file holds one prompt per line: a JSON string (used as it is), or an object with
`instruction` (and optional `input`) or `prompt`, rendered with the Alpaca-style prompt the
instructions format trains on (`### Instruction:\\n...\\n\\n### Response:\\n`; answer columns such as
`output` are ignored, so rows of a training set work), or with `text` (used as it is). Any other
file holds one prompt per line, as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

from moai_jax.data.formats import Format, render
from moai_jax.errors import DataError

_INSTRUCTIONS = (("instruction", "output"), ("prompt", "response"))


def prompt_text(row, where: str = "prompt") -> str:
    """A prompt as the model saw prompts in training: a string as it is, an instruction row rendered."""
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        for columns in _INSTRUCTIONS:
            if columns[0] in row:
                return render(Format("instructions", columns), {**row, columns[1]: ""}, None)[0][0]
        if "text" in row:
            return str(row["text"])
    raise DataError(f"{where} is neither a string nor an object with 'instruction', 'prompt' or 'text'; "
                    "write one of those per line")


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a file (see the module's docstring); a DataError names a file or line it cannot read."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read prompts from {path} ({getattr(e, 'strerror', None) or e}); pass a readable "
                        "text or .jsonl file") from None
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number} is not JSON ({e.msg}); write one JSON string or object per line"
                            ) from None
        prompts.append(prompt_text(row, f"{path} line {number}"))
    return prompts
