"""`mmfusion tokenize train|encode|decode`: VQ tokenizers on the command line."""

from __future__ import annotations

import argparse


def add_tokenize_commands(sub: argparse._SubParsersAction) -> None:
    """Register `mmfusion tokenize ...`."""
