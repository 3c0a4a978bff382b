"""`mmfusion generate` (and training the unified model) on the command line."""

from __future__ import annotations

import argparse


def add_generate_commands(sub: argparse._SubParsersAction) -> None:
    """Register `mmfusion generate ...`."""
