"""A federation of a run config: the cloud side (global model, strategy, evaluation, model folders) and how
its clients are built.

    runs/<name>/config.yaml          the resolved config every client trains with
               rounds/round-NNN/     the global model after round NNN (model folder: config.json,
                                     model.safetensors), the newest train.keep_checkpoints kept
               model/                the final global model (same format as `mmfusion train`'s)
               federated.jsonl       per round: held-out metrics, bytes down/up, clients ok/failed, loss
               federated.json        the final evaluation, bytes, failures, the partition; plots/federated.png
               clients/client-<i>/   each client's own training log (metrics.jsonl, one stage per round)

The server never reads the training split, except to infer a user JSONL's class names (data.target.classes
unset) or to train a BPE tokenizer for a text input (data.tokenizer.path unset); both are logged. Give
both to keep every training sample on its edge.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset

from ..config import RunConfig, dump_config
from ..errors import ConfigError
from ..run import (
    build_model,
    infer_classes,
    load_split,
    load_tokenizer,
    model_inputs,
    run_dir,
    text_field,
    write_tokenizer,
)
from ..train.model_setup import prepare_model
from ..train.rng import seed_everything
from .partition import ClientDataset, dropped_fields, label_histogram, partition, sample_labels

KINDS = ("fusion", "contrastive")


@dataclass
class Federation:
    """A run config resolved for federation, and its run directory."""

    cfg: RunConfig
    out: Path
    tokenizer: Any = None
    log: Any = field(default=print, repr=False)

    def new_model(self):
        """The run's model, freshly initialised from the run seed (the same on the server and every client)."""
        seed_everything(self.cfg.seed)
        model = build_model(self.cfg, self.tokenizer)
        return prepare_model(model, self.cfg.train, False, lambda _m: None)

    def label_field(self) -> str:
        p = self.cfg.federated.partition
        if p.field:
            return p.field
        if self.cfg.kind != "fusion":
            raise ConfigError(
                "federated.partition.by = 'label' on a two-tower run: set federated.partition.field"
            )
        return self.cfg.data.target.field

    def client_datasets(self, train_set, cids) -> tuple[dict[int, ClientDataset], dict[str, Any]]:
        """The ClientDataset of each client in `cids`, and a description of the whole partition."""
        f = self.cfg.federated
        if isinstance(train_set, IterableDataset) or not hasattr(train_set, "__len__"):
            raise ConfigError(
                f"federated training needs a map-style training split (synthetic data or a JSONL manifest) to "
                f"partition among clients; data.train is a WebDataset stream ({type(train_set).__name__}): point "
                f"data.train at a JSONL manifest (e.g. the one the shards were built from)"
            )
        labels = None
        if f.partition.by == "label" or self.cfg.kind == "fusion":
            try:
                labels = sample_labels(train_set, self.label_field())
            except ConfigError:
                if f.partition.by == "label":
                    raise
        parts = partition(labels, len(train_set), f.clients, f.partition, self.cfg.seed)
        fields = self.cfg.data.inputs if self.cfg.kind == "fusion" else {}
        inputs = model_inputs(self.cfg)
        out = {}
        for cid in cids:
            drop = dropped_fields(inputs, fields, f.client_modalities(cid))
            out[cid] = ClientDataset(train_set, parts[cid], drop)
        info: dict[str, Any] = {
            "by": f.partition.by,
            "sizes": [len(p) for p in parts],
            "modalities": [f.client_modalities(c) or sorted(inputs) for c in range(f.clients)],
        }
        if f.partition.by != "iid":
            info["alpha"] = f.partition.alpha
        if labels is not None:
            info["labels"] = label_histogram(labels, parts)
        return out, info


def _needs_train_split(cfg: RunConfig) -> list[str]:
    """Why the server must read the training split (empty: it need not)."""
    why = []
    if cfg.kind == "fusion" and cfg.data.source != "synthetic" and cfg.model.classes is None:
        if cfg.model.head == "classify":
            why.append("to name the classes (set data.target.classes to avoid it)")
    tok_path = cfg.model.text.tokenizer if cfg.kind == "contrastive" else cfg.data.tokenizer.path
    if text_field(cfg) is not None and not (tok_path or cfg.train.init_from):
        why.append("to train the BPE tokenizer (set data.tokenizer.path / model.text.tokenizer to avoid it)")
    return why


def prepare_server(cfg: RunConfig, overwrite: bool = False, log=print) -> Federation:
    """Check the config, create the run directory, resolve what every party needs (classes, tokenizer)."""
    if cfg.federated is None:
        raise ConfigError("the config has no federated: section (see configs/federated.yaml)")
    if cfg.kind not in KINDS:
        raise ConfigError(f"model.kind = {cfg.kind!r}: federated training supports {', '.join(KINDS)} models")
    if cfg.train.stages or cfg.train.distill is not None or cfg.data.mixture is not None:
        raise ConfigError(
            "federated runs train one model on plain data: drop train.stages / train.distill / data.mixture"
        )
    inputs, fields = model_inputs(cfg), cfg.data.inputs if cfg.kind == "fusion" else {}
    for cid in range(cfg.federated.clients):  # names checked before anything is written
        dropped_fields(inputs, fields, cfg.federated.client_modalities(cid))
    out = run_dir(cfg)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"run directory {out} is not empty: pass --overwrite to start over")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    why = _needs_train_split(cfg)
    if why:
        log("note: the server reads the training split " + "; ".join(why))
        train_set = load_split(cfg, "train")
        cfg = infer_classes(cfg, train_set)
        write_tokenizer(cfg, out, train_set)
    dump_config(cfg, out / "config.yaml")
    return Federation(cfg, out, load_tokenizer(cfg, out), log)


def open_client_side(config_path: str | Path, log=print) -> Federation:
    """A client process's view: the resolved config the server wrote (<run>/config.yaml) and its tokenizer."""
    from ..config import load_config

    path = Path(config_path)
    cfg = load_config(path)
    if cfg.federated is None:
        raise ConfigError(f"{path}: no federated: section")
    out = path.parent
    return Federation(cfg, out, load_tokenizer(cfg, out), log)


# ---- held-out evaluation of the global model ------------------------------------------------------------------
class Evaluator:
    """The global model's held-out metrics each round ("accuracy_*" for fusion models, retrieval recall for
    two-tower ones) on `split`, and its model folder rounds/round-NNN."""

    def __init__(self, fed: Federation, model, split: str = "test"):
        self.fed, self.model, self.split = fed, model, split
        cfg = fed.cfg
        if cfg.kind == "fusion":
            from ..evaluate import task_batches

            self.batches = task_batches(cfg, model, split)
            if not self.batches:
                raise ConfigError(f"no usable sample in the {split} split to evaluate the global model on")
        else:
            self.dataset = load_split(cfg, split)
        self.history: list[dict[str, Any]] = []

    def metrics(self) -> dict[str, float]:
        if self.fed.cfg.kind == "fusion":
            from ..eval.missing import missing_modality_eval

            return {f"accuracy_{k}": v for k, v in missing_modality_eval(self.model, self.batches).items()}
        from ..eval.report import evaluate_contrastive

        cfg = self.fed.cfg
        m, _ = evaluate_contrastive(self.model, self.dataset, cfg.eval.recall_at, cfg.eval.batch_size)
        return {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}

    def headline(self, metrics: dict[str, float]) -> tuple[str, float]:
        for key in ("accuracy_all", "t2i_recall@1"):
            if key in metrics:
                return key, metrics[key]
        key = sorted(metrics)[0]
        return key, metrics[key]

    def save_round(self, server_round: int) -> Path:
        rounds = self.fed.out / "rounds"
        path = self.model.save_pretrained(rounds / f"round-{server_round:03d}")
        keep = self.fed.cfg.train.keep_checkpoints
        for old in sorted(rounds.glob("round-*"))[:-keep]:
            shutil.rmtree(old)
        return Path(path)


def write_round(out: Path, row: dict[str, Any]) -> None:
    with open(out / "federated.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def round_lr(cfg: RunConfig, server_round: int) -> float:
    """train.lr, cosine-decayed over the rounds down to train.min_lr_ratio (constant within a round)."""
    rounds, r = cfg.federated.rounds, server_round - 1
    progress = r / max(1, rounds - 1) if rounds > 1 else 0.0
    ratio = cfg.train.min_lr_ratio
    return cfg.train.lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


__all__ = ["Evaluator", "Federation", "open_client_side", "prepare_server", "round_lr", "write_round"]
