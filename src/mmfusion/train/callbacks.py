"""Trainer callbacks named in the config (`train.callbacks`), built before any work.

A callback is any object; the Trainer calls the hooks it has:

    on_before_optimizer_step(trainer)   after backward and gradient unscaling, before clipping and the step
    on_step_end(trainer)   after each optimizer step, its logging and evaluation, before that step's checkpoint

`train.callbacks: [{target: "package.module:Name", args: {...}}]` imports `Name` and calls `Name(**args)`,
like Lightning's callback classes or Hydra's `_target_`. The config is code the user runs: only name modules
you trust.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

HOOKS = ("on_before_optimizer_step", "on_step_end")


def resolve_target(target: str) -> Any:
    """The object `target` ("package.module:Name") names; ValueError saying what was wrong."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{target!r}: expected 'package.module:Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{target!r}: cannot import {module_name!r} ({e})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{target!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def build_callbacks(specs: Sequence[Any]) -> list[Any]:
    """Instantiate `train.callbacks` entries (objects with `.target` and `.args`); a ConfigError names the
    entry."""
    from ..errors import ConfigError

    out = []
    for i, spec in enumerate(specs):
        where = f"train.callbacks[{i}]"
        try:
            cls = resolve_target(spec.target)
        except ValueError as e:
            raise ConfigError(f"{where}.target = {e}") from None
        try:
            cb = cls(**spec.args)
        except TypeError as e:
            raise ConfigError(f"{where}: {spec.target}(**{spec.args}) failed: {e}") from None
        if not any(callable(getattr(cb, h, None)) for h in HOOKS):
            raise ConfigError(f"{where}: {spec.target} has none of the hooks {', '.join(HOOKS)}")
        out.append(cb)
    return out
