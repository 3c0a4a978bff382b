"""The JSON files the safety tools write (SCD calibrations, concept filters): one writer and one reader whose
error names the file, what it should have been and the command that writes one."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ConfigError

T = TypeVar("T")


def write_json(data: dict[str, Any], path: str | Path, indent: int = 2) -> Path:
    """Write `data` to `path` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent) + "\n")
    return path


def read_json(path: str | Path, build: Callable[[dict[str, Any]], T], what: str, command: str) -> T:
    """`build(the file's JSON object)`; ConfigError "<path>: not <what> (<why>); write one with `<command>`" when
    the file is missing, not JSON or not what `build` expects."""
    try:
        return build(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise ConfigError(f"{path}: not {what} ({e}); write one with `{command}`") from None


__all__ = ["read_json", "write_json"]
