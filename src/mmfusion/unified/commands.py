"""`mmfusion tokenize train|encode|decode`, and `mmfusion generate` (imports stay light)."""

from __future__ import annotations

import argparse

from .generate_cli import add_generate_commands
from .tokenize_cli import add_tokenize_commands


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the unified-model commands."""
    add_tokenize_commands(sub)
    add_generate_commands(sub)
