"""`mmfusion data build|info|diff` argument parsing (imports stay light: handlers import lazily)."""

from __future__ import annotations

import argparse


def add_data_commands(dsub: argparse._SubParsersAction) -> None:
    """Register the data-engine subcommands under `mmfusion data`."""
