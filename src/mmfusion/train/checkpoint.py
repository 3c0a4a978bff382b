"""Training checkpoints (S5): safetensors weights + optimizer, JSON state, a SHA-256 manifest written last.

Layout: <run>/checkpoints/step-00000500/{model.safetensors, optimizer.safetensors, state.json, MANIFEST.json}.
A checkpoint is written into a temporary folder, every file fsynced, the manifest last, then the folder is
renamed into place, so a crash never leaves a half-written checkpoint under a final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

MANIFEST = "MANIFEST.json"
EXTRA = "extra.safetensors"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state_dict -> (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(rest["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


@dataclass
class Checkpoint:
    """A verified checkpoint folder."""

    path: Path
    step: int

    def load(self, device: str | torch.device = "cpu") -> tuple[dict, dict, dict]:
        """-> (model state_dict, optimizer state_dict, state.json contents)."""
        model = load_file(str(self.path / "model.safetensors"), device=str(device))
        state = json.loads((self.path / "state.json").read_text())
        optim = unflatten_optimizer(
            load_file(str(self.path / "optimizer.safetensors"), device=str(device)), state["optimizer"]
        )
        return model, optim, state

    def load_extra(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The checkpoint's extra tensors (e.g. held per-modality gradients); {} when it has none."""
        path = self.path / EXTRA
        return load_file(str(path), device=str(device)) if path.is_file() else {}


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write one checkpoint atomically and delete all but the newest `keep`. `extra`: further tensors of the
    training state (Checkpoint.load_extra)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:08d}"
    tmp = ckpt_dir / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors")
    )
    opt_tensors, opt_rest = flatten_optimizer(optimizer_state)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": opt_rest}))
    files = ["model.safetensors", "optimizer.safetensors", "state.json"]
    if extra:
        save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(tmp / EXTRA))
        files.append(EXTRA)
    publish(tmp, final, step, files, keep)
    return final


def publish(tmp: Path, final: Path, step: int, files: Iterable[str], keep: int | None) -> None:
    """Make a fully written checkpoint folder visible atomically: fsync `files`, write the SHA-256 MANIFEST last,
    rename `tmp` to `final`, then keep only the newest `keep` checkpoints of final's parent (None keeps all)."""
    files = list(files)
    for name in files:
        _fsync_file(tmp / name)
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "sha256": {n: sha256(tmp / n) for n in files}}))
    _fsync_file(tmp / MANIFEST)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if keep:
        for old in list_checkpoints(final.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Final (renamed) checkpoint folders, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step-"))


def verify(path: Path) -> str | None:
    """None when every file matches the manifest, else the reason it does not. A file the manifest does not
    list is a reason too: loaders read files by name (a sharded checkpoint's `.metadata`, `extra.safetensors`),
    so an unlisted one would be read unchecked."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no MANIFEST.json"
    try:
        content = json.loads(manifest.read_text())
        expected, _ = content["sha256"], int(content["step"])
        if not isinstance(expected, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return "unreadable MANIFEST.json"
    unlisted = sorted(p.name for p in path.iterdir() if p.name != MANIFEST and p.name not in expected)
    if unlisted:
        return f"{unlisted[0]} is not in MANIFEST.json"
    for name, digest in expected.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if sha256(f) != digest:
            return f"{name} does not match its checksum"
    return None


def latest_valid(ckpt_dir: Path, log=print) -> Checkpoint | None:
    """The newest checkpoint that verifies; damaged newer ones are reported through `log` and skipped."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        problem = verify(path)
        if problem is None:
            return Checkpoint(path, int(path.name.split("-")[1]))
        log(f"checkpoint {path} is damaged ({problem}); falling back to the previous one")
    return None


def require_latest(ckpt_dir: Path, log=print) -> Checkpoint:
    ckpt = latest_valid(ckpt_dir, log)
    if ckpt is None:
        raise CheckpointError(f"no valid checkpoint in {ckpt_dir}")
    return ckpt
