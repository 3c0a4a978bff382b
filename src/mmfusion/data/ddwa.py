"""`data.sampler: ddwa` in a run: the DDWASampler (mmfusion.data.samplers) as the Trainer's data (D4).

Each optimizer step draws `batch_size` indices i.i.d. from the sampler's per-sample weights. After the step
the Trainer hands the step's (batch, ModelOutput) pairs to `observe` (mmfusion.train.step_hooks), which scores
every drawn sample by `logit_grad_norm(its logits, its label)`; the sampler's own rule then reweights every
`update_every` steps after `warmup`. A match head's single logit z is scored as the two-class logits [0, z]
(||softmax - onehot|| = sqrt(2) |sigmoid(z) - y|, the same ranking). The sampler's state (scores, weights,
random stream) is part of the checkpoint, so a resumed run draws exactly what an uninterrupted one draws.

One process only: the next batch depends on every rank's scores of this one, and the batches are collated in
the training process (no DataLoader workers can prefetch them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..batch import Batch
from ..errors import ConfigError
from .loader import rank_micro_batches
from .samplers import DDWASampler

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..models.contrastive import ModelOutput
    from .config import DDWAConfig


def check_ddwa(cfg: RunConfig) -> None:
    """Raise ValueError (a config error) when `data.sampler: ddwa` is combined with what it cannot drive."""
    if cfg.data.sampler != "ddwa":
        return
    why = None
    if cfg.kind != "fusion":
        why = (
            "it weights each training sample by its classification gradient (logits vs label), so it needs a "
            "fusion model (model.kind: fusion); the two-tower contrastive loss has no per-sample label"
        )
    elif cfg.data.mixture is not None:
        why = "a data.mixture run draws its batches with the mixture sampler; use one or the other"
    elif cfg.data.source == "webdataset":
        why = "it draws samples by index: use a map-style source (synthetic or jsonl)"
    elif cfg.train.stages:
        why = "train.stages is not supported with it yet"
    elif cfg.train.distill is not None:
        why = "train.distill is not supported with it yet (unlabelled rows have no score)"
    elif cfg.data.num_workers:
        why = (
            "each batch is drawn after the previous step's scores, so DataLoader workers cannot prefetch it: "
            "set data.num_workers: 0"
        )
    if why:
        raise ValueError(f"data.sampler = 'ddwa': {why}")


class DDWAData:
    """TrainData drawing from a DDWASampler over `samples` (a list), collated by `collate` in this process.

    Batches carry meta["index"] (the drawn sample indices); an epoch is len(samples) // batch_size steps."""

    def __init__(
        self,
        samples: Sequence[dict[str, Any]],
        collate: Callable[[list[dict[str, Any]]], Batch],
        batch_size: int,
        seed: int,
        ddwa: DDWAConfig,
    ):
        self.samples = samples
        self.collate = collate
        self.batch_size = batch_size
        self.sampler = DDWASampler(
            len(samples),
            batch_size,
            warmup=ddwa.warmup,
            update_every=ddwa.update_every,
            boost=ddwa.boost,
            top_fraction=ddwa.top_fraction,
            seed=seed,
        )

    def steps_per_epoch(self) -> int:
        return len(self.samples) // self.batch_size

    def step_batches(
        self, epoch: int, start_step: int, rank: int, world: int, accumulation: int
    ) -> Iterator[list[Batch]]:
        if world > 1:
            raise ConfigError(
                "data.sampler = 'ddwa' runs in one process: the next batch depends on every rank's scores of "
                "this one; train without --nproc or use data.sampler: shuffle"
            )
        for _ in range(start_step, self.steps_per_epoch()):
            flat = self.sampler.next_batch()  # drawn now, after the previous step's observe()
            yield [
                self._collate(idx) for idx in rank_micro_batches([flat], self.batch_size, 0, 1, accumulation)
            ]

    def _collate(self, indices: list[int]) -> Batch:
        batch = self.collate([self.samples[i] for i in indices])
        batch.meta["index"] = list(indices)
        return batch

    def observe(self, micro: list[tuple[Batch, ModelOutput]]) -> dict[str, float]:
        """Score the step's samples (the sampler's `update`); returns metrics to log."""
        for batch, out in micro:
            if out.logits is None:
                raise ConfigError(
                    "data.sampler = 'ddwa' needs the model's per-sample logits (ModelOutput.logits); this "
                    "model's forward returns none"
                )
            logits = out.logits.detach().float()
            if logits.dim() == 1:  # a match head: one logit per sample
                logits = torch.stack([torch.zeros_like(logits), logits], dim=1)
            self.sampler.update(batch.meta["index"], logits=logits.cpu(), labels=batch.data["label"].cpu())
        return {
            "ddwa/boosted": float(self.sampler.boosted.sum()),
            "ddwa/reweights": float(self.sampler.reweights),
        }

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


__all__ = ["DDWAData", "check_ddwa"]
