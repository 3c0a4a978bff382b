"""`mmfusion tokenize train|encode|decode`, `mmfusion generate` and `mmfusion train-unified` (imports stay light)."""

from __future__ import annotations

import argparse

from .generate_cli import add_generate_commands
from .tokenize_cli import add_tokenize_commands
from .train_cli import add_train_unified_command


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the unified-model commands."""
    add_tokenize_commands(sub)
    add_generate_commands(sub)
    add_train_unified_command(sub)
