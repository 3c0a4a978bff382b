"""Dynamic data weighting (D4): ``DDWASampler`` samples one dataset i.i.d. from per-sample weights: uniform
for a warm-up, then every K steps the samples whose mean score (``logit_grad_norm``, a per-sample gradient-norm
proxy) is in the top fraction get weight ``boost`` (1.3), the others 1.0, renormalised.

(The Trainer side, `data.sampler: ddwa` in a run, is mmfusion.data.ddwa.) Its state_dict holds only tensors,
ints, floats, lists and dicts, so ``torch.load(weights_only=True)`` reads it back.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from ...errors import ConfigError, DataError
from .mixture import sub_seed


def logit_grad_norm(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample ||d CE / d logits||_2 = ||softmax(z) - onehot(y)||_2, (B,) float32, closed form, no backward."""
    z = logits.detach().float()
    if z.dim() != 2 or labels.shape != (z.shape[0],):
        raise ConfigError(
            f"logits must be (B, C) and labels (B,), got logits {tuple(z.shape)} and labels {tuple(labels.shape)}"
        )
    g = torch.softmax(z, dim=1)
    g[torch.arange(z.shape[0]), labels.long()] -= 1.0
    return g.norm(dim=1)


class DDWASampler:
    """Dynamic data weighting over one dataset of `n` samples, drawn i.i.d. with replacement.

    Steps 0 .. warmup-1 draw uniformly. Scores come from `update`: a sample's score is the mean over the
    times it was seen of its per-sample gradient-norm proxy (`logit_grad_norm`: ||softmax(z) - onehot(y)||,
    the gradient of the loss w.r.t. the logits, not w.r.t. the parameters). At every step s >= warmup with
    (s - warmup) % update_every == 0 the weights are recomputed before drawing: of the samples seen at least
    once, the top ceil(top_fraction * seen) by mean score (ties: lower index first) get `boost`, every other
    sample 1.0; the weights are then divided by their sum. boost=1.0 is plain uniform sampling with the same
    random stream (a like-for-like baseline).

    Iterating yields batches (lists of `batch_size` indices); `num_steps` bounds the iteration.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        warmup: int = 100,
        update_every: int = 50,
        boost: float = 1.3,
        top_fraction: float = 0.25,
        seed: int = 0,
        num_steps: int | None = None,
    ):
        if int(n) < 1:
            raise DataError(f"n must be >= 1 (the dataset is empty), got {n}")
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if int(warmup) < 0:
            raise ConfigError(f"warmup must be >= 0, got {warmup}")
        if int(update_every) < 1:
            raise ConfigError(f"update_every must be >= 1, got {update_every}")
        if not (float(boost) > 0 and math.isfinite(float(boost))):
            raise ConfigError(f"boost must be a finite number > 0, got {boost}")
        if not 0 <= float(top_fraction) <= 1:
            raise ConfigError(f"top_fraction must be in [0, 1], got {top_fraction}")
        self.n, self.batch_size, self.warmup = int(n), int(batch_size), int(warmup)
        self.update_every, self.boost, self.top_fraction = (
            int(update_every),
            float(boost),
            float(top_fraction),
        )
        self.seed = int(seed)
        self.num_steps = num_steps
        self.generator = torch.Generator().manual_seed(sub_seed(self.seed, 0xDD3A))
        self.step = 0
        self.score_sum = torch.zeros(self.n, dtype=torch.float64)
        self.seen = torch.zeros(self.n, dtype=torch.long)
        self.weights = torch.full((self.n,), 1.0 / self.n, dtype=torch.float64)
        self.boosted = torch.zeros(self.n, dtype=torch.bool)
        self.reweights = 0

    def mean_scores(self) -> torch.Tensor:
        """(n,) mean score per sample; NaN where never seen."""
        return torch.where(self.seen > 0, self.score_sum / self.seen.clamp(min=1), torch.nan)

    def update(
        self,
        indices: Sequence[int] | torch.Tensor,
        logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        scores: Sequence[float] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Add one score per index: `scores` directly, or logit_grad_norm(logits, labels). Returns them."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if scores is None:
            if logits is None or labels is None:
                raise ConfigError("update needs either scores or both logits and labels")
            s = logit_grad_norm(logits, labels)
        else:
            if logits is not None or labels is not None:
                raise ConfigError("give update either scores or logits and labels, not both")
            s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
        if s.shape[0] != idx.shape[0]:
            raise ConfigError(f"update got {idx.shape[0]} indices but {s.shape[0]} scores")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.n):
            raise ConfigError(
                f"indices must be in [0, {self.n}), got min {int(idx.min())} max {int(idx.max())}"
            )
        s64 = s.to(torch.float64)
        if not torch.isfinite(s64).all():
            raise ConfigError("scores must be finite")
        self.score_sum.index_add_(0, idx, s64)
        self.seen.index_add_(0, idx, torch.ones_like(idx))
        return s

    def reweight(self) -> None:
        """Recompute the weights from the current mean scores (see the class docstring)."""
        seen = torch.nonzero(self.seen > 0).reshape(-1)
        w = torch.ones(self.n, dtype=torch.float64)
        self.boosted = torch.zeros(self.n, dtype=torch.bool)
        k = math.ceil(self.top_fraction * seen.numel() - 1e-9)
        if k > 0:
            mean = self.score_sum[seen] / self.seen[seen]
            # stable sort on -score keeps lower indices first among ties
            order = torch.sort(-mean, stable=True).indices[:k]
            top = seen[order]
            w[top] = self.boost
            self.boosted[top] = True
        self.weights = w / w.sum()
        self.reweights += 1

    def next_batch(self) -> list[int]:
        """Indices of the next step (reweighting first when due)."""
        if self.step >= self.warmup and (self.step - self.warmup) % self.update_every == 0:
            self.reweight()
        batch = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=self.generator)
        self.step += 1
        return batch.tolist()

    def __iter__(self) -> Iterator[list[int]]:
        while self.num_steps is None or self.step < self.num_steps:
            yield self.next_batch()

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless DDWASampler (num_steps=None) has no len()")
        return self.num_steps

    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "seed": self.seed,
            "generator": self.generator.get_state(),
            "step": self.step,
            "score_sum": self.score_sum.clone(),
            "seen": self.seen.clone(),
            "weights": self.weights.clone(),
            "boosted": self.boosted.clone(),
            "reweights": self.reweights,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, mine in (("n", self.n), ("seed", self.seed)):
            if state[key] != mine:
                raise ConfigError(f"state_dict {key}={state[key]} does not match this sampler's {key}={mine}")
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        self.score_sum = state["score_sum"].clone()
        self.seen = state["seen"].clone()
        self.weights = state["weights"].clone()
        self.boosted = state["boosted"].clone()
        self.reweights = int(state["reweights"])


__all__ = ["DDWASampler", "logit_grad_norm"]
