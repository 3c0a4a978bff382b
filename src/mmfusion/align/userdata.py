"""A user's JSONL files for `mmfusion align` (one object per line; blank lines skipped): the one row reader
(`jsonl_rows`), and the SFT pairs and prompts a run on the user's own text trains and samples from.

  data.sft       {"prompt": "...", "response": "..."}   supervised fine-tuning demonstrations
  data.prompts   {"prompt": "..."}                      PPO prompts (other fields are ignored)
  data.labels    see align.scorer (labelled / preference pairs for the reward and cost models)

Errors (DataError) name the file, the line and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ..errors import DataError


def jsonl_rows(path: str | Path, what: str) -> Iterator[tuple[str, dict]]:
    """(`file:line`, object) per non-blank line; DataError for a missing file, invalid JSON, a non-object, or
    no rows at all. `what` says what the file should hold (for the not-found message)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: expected a JSONL file of {what}")
    n_rows = 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object")
        n_rows += 1
        yield where, row
    if not n_rows:
        raise DataError(f"{path}: no rows")


def text_field(row: dict, key: str, where: str) -> str:
    """row[key], which must be a non-empty string."""
    v = row.get(key)
    if not isinstance(v, str) or not v.strip():
        raise DataError(f"{where}: {key!r} must be a non-empty string; got {v!r}")
    return v


def load_sft_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, response) demonstrations of a `data.sft` file."""
    return [
        (text_field(row, "prompt", where), text_field(row, "response", where))
        for where, row in jsonl_rows(path, '{"prompt", "response"} demonstrations (data.sft)')
    ]


def load_prompts(path: str | Path) -> list[str]:
    """The prompts of a `data.prompts` file."""
    return [
        text_field(row, "prompt", where) for where, row in jsonl_rows(path, '{"prompt"} rows (data.prompts)')
    ]


__all__ = ["jsonl_rows", "load_prompts", "load_sft_pairs", "text_field"]
