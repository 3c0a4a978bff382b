"""Learned reward and cost models: a small unified decoder read at the last response token, trained from
labelled (prompt, response) pairs, from the synthetic world or a user's JSONL.

JSONL rows (one object per line; a file may mix them):
  {"prompt": "...", "response": "...", "reward": 0.8, "cost": 1}   a labelled pair (either label may be absent)
  {"prompt": "...", "chosen": "...", "rejected": "..."}            a preference pair (reward model only)
The reward model is fitted by squared error on "reward" labels and by the Bradley-Terry loss
-log sigmoid(r(chosen) - r(rejected)) on preference pairs; the cost model by binary cross-entropy on "cost"
labels in [0, 1] (1 = harmful), and scores P(harmful) = sigmoid(logit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from ..unified.model import UnifiedConfig, UnifiedDecoder
from .ppo import decoder_hidden
from .userdata import jsonl_rows, text_field
from .vocab import WordVocab, pack


@dataclass(frozen=True)
class Labelled:
    """A (prompt, response) pair with a reward and / or a cost label (None when absent)."""

    prompt: str
    response: str
    reward: float | None = None
    cost: float | None = None


@dataclass(frozen=True)
class Preference:
    """A prompt with a preferred (chosen) and a dispreferred (rejected) response."""

    prompt: str
    chosen: str
    rejected: str


def _label(row: dict, key: str, where: str, lo: float | None = None, hi: float | None = None) -> float | None:
    v = row.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v):
        raise DataError(f"{where}: {key!r} must be a number; got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise DataError(f"{where}: {key!r} = {v} must lie in [{lo}, {hi}]")
    return float(v)


def load_labels(path: str | Path) -> tuple[list[Labelled], list[Preference]]:
    """Read a JSONL file of labelled pairs and preference pairs (see the module docstring)."""
    labelled, prefs = [], []
    for where, row in jsonl_rows(path, "labelled / preference pairs (data.labels)"):
        prompt = text_field(row, "prompt", where)
        if "chosen" in row or "rejected" in row:
            prefs.append(
                Preference(prompt, text_field(row, "chosen", where), text_field(row, "rejected", where))
            )
            continue
        reward, cost = _label(row, "reward", where), _label(row, "cost", where, 0.0, 1.0)
        if reward is None and cost is None:
            raise DataError(
                f"{where}: a row needs 'response' with a 'reward' and / or 'cost' label, or 'chosen' and "
                "'rejected'"
            )
        labelled.append(Labelled(prompt, text_field(row, "response", where), reward, cost))
    return labelled, prefs


class ScoreModel(nn.Module):
    """A unified decoder trunk with a scalar head read at each row's last response token."""

    def __init__(self, cfg: UnifiedConfig):
        super().__init__()
        self.decoder = UnifiedDecoder(cfg)
        self.head = nn.Linear(cfg.dim, 1)

    def forward(self, ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """ids, response_mask (batch, T) -> score (batch,) at the last True of each mask row."""
        _, hidden = decoder_hidden(self.decoder, ids)
        last = response_mask.long().cumsum(1).argmax(1)
        return self.head(hidden[torch.arange(len(ids)), last]).squeeze(-1).float()

    def score(
        self, vocab: WordVocab, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """Raw scores (batch,) of packed prompt / response ids (an empty response scores its <sep>)."""
        responses = [r if len(r) else [vocab.eos] for r in responses]
        ids, mask = pack(prompts, responses, vocab.pad)
        self.eval()
        with torch.no_grad():
            return self(ids, mask)


def train_score_model(
    model: ScoreModel,
    vocab: WordVocab,
    kind: str,
    labelled: Sequence[Labelled],
    prefs: Sequence[Preference] = (),
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """Fit a reward ("reward": squared error + Bradley-Terry on preferences) or cost ("cost": BCE) model;
    returns the loss per step."""
    if kind not in ("reward", "cost"):
        raise ConfigError(f"score model kind {kind!r}: expected 'reward' or 'cost'")
    rows = [r for r in labelled if getattr(r, kind) is not None]
    pairs = list(prefs) if kind == "reward" else []
    if not rows and not pairs:
        raise DataError(f"no {kind} labels to train the {kind} model on")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    p_ids = {t: vocab.prompt_ids(t) for t in {r.prompt for r in rows} | {p.prompt for p in pairs}}
    losses = []
    model.train()
    for _ in range(steps):
        loss = torch.zeros(())
        if rows:
            batch = [rows[i] for i in rng.integers(len(rows), size=min(batch_size, len(rows)))]
            ids, mask = pack(
                [p_ids[r.prompt] for r in batch], [vocab.response_ids(r.response) for r in batch], vocab.pad
            )
            target = torch.tensor([getattr(r, kind) for r in batch])
            out = model(ids, mask)
            loss = loss + (
                F.mse_loss(out, target)
                if kind == "reward"
                else F.binary_cross_entropy_with_logits(out, target)
            )
        if pairs:
            batch_p = [pairs[i] for i in rng.integers(len(pairs), size=min(batch_size, len(pairs)))]
            prompts = [p_ids[p.prompt] for p in batch_p] * 2
            responses = [vocab.response_ids(p.chosen) for p in batch_p] + [
                vocab.response_ids(p.rejected) for p in batch_p
            ]
            ids, mask = pack(prompts, responses, vocab.pad)
            chosen, rejected = model(ids, mask).chunk(2)
            loss = loss - F.logsigmoid(chosen - rejected).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


__all__ = ["Labelled", "Preference", "ScoreModel", "load_labels", "train_score_model"]
