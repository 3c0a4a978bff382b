"""From samples to Batches: resumable, rank-sharded step iteration over datasets (collated by mmfusion.data.collate)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..batch import Batch
from ..errors import DataError


class ListDataset(Dataset):
    """A map-style dataset over samples already in memory (e.g. a rendered synthetic split)."""

    def __init__(self, samples: Sequence[dict[str, Any]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.samples[i]


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a function of (seed, epoch) only, so resume and any world size agree."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class MapData:
    """Resumable step iteration over a map-style dataset.

    Each optimizer step takes the next `batch_size` (global) indices of the epoch permutation and splits
    them into world x accumulation micro-batches; rank r gets micro-batches r, r + world, ... so the
    global batch is the same whatever the world size. Incomplete final batches are dropped.
    """

    def __init__(self, dataset: Dataset, collate, batch_size: int, seed: int, num_workers: int = 0):
        self.dataset = dataset
        self.collate = collate
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers

    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.batch_size

    def step_batches(
        self, epoch: int, start_step: int, rank: int, world: int, accumulation: int
    ) -> Iterator[list[Batch]]:
        perm = epoch_permutation(len(self.dataset), self.seed, epoch)
        steps = (
            perm[step * self.batch_size : (step + 1) * self.batch_size].tolist()
            for step in range(start_step, self.steps_per_epoch())
        )
        index_lists = rank_micro_batches(steps, self.batch_size, rank, world, accumulation)
        yield from _index_batches(self, index_lists, epoch, accumulation)


def _index_batches(
    data, index_lists: list[list[int]], epoch: int, accumulation: int
) -> Iterator[list[Batch]]:
    """`data.dataset` read in the given micro-batches of indices (collated by `data.collate`), grouped by
    optimizer step."""
    loader = DataLoader(
        data.dataset,
        batch_sampler=index_lists,
        collate_fn=data.collate,
        num_workers=data.num_workers,
        persistent_workers=False,
        # a private generator: creating the iterator must not draw from the global RNG, or a resumed
        # run (which creates it after restoring the RNG) would diverge from an uninterrupted one
        generator=torch.Generator().manual_seed(data.seed * 1_000_003 + epoch),
    )
    yield from _groups(loader, accumulation)


def rank_micro_batches(
    steps: Iterator[list[int]], batch_size: int, rank: int, world: int, accumulation: int
) -> list[list[int]]:
    """Each step's global batch of indices split into world x accumulation micro-batches; rank r gets
    micro-batches r, r + world, ... so the global batch is the same whatever the world size."""
    parts = world * accumulation
    if batch_size % parts:
        raise DataError(
            f"train.batch_size {batch_size} is not divisible by world size {world} x accumulation {accumulation}"
        )
    micro = batch_size // parts
    out = []
    for flat in steps:
        for a in range(accumulation):
            j = a * world + rank
            out.append(flat[j * micro : (j + 1) * micro])
    return out


def _groups(loader, accumulation: int) -> Iterator[list[Batch]]:
    """The loader's batches in groups of `accumulation` (one optimizer step each)."""
    group: list[Batch] = []
    for b in loader:
        group.append(b)
        if len(group) == accumulation:
            yield group
            group = []


class StreamData:
    """Step iteration over an IterableDataset (WebDataset shards), one pass per epoch.

    Shards are split over ranks and DataLoader workers by the source; resuming mid-epoch replays the
    epoch and drops the steps already taken. Every micro-batch is full: each DataLoader worker batches its
    own part of the stream, so the last, partial batch of every worker is dropped (at most
    workers x (micro - 1) samples per rank and epoch), which keeps the global batch constant and the ranks'
    batches equal in size (all-gathers need that).
    """

    def __init__(
        self, dataset: IterableDataset, collate, batch_size: int, num_samples: int, num_workers: int = 0
    ):
        self.dataset = dataset
        self.collate = collate
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.num_workers = num_workers

    def steps_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def step_batches(
        self, epoch: int, start_step: int, rank: int, world: int, accumulation: int
    ) -> Iterator[list[Batch]]:
        micro = self.batch_size // (world * accumulation)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        loader = DataLoader(
            self.dataset,
            batch_size=micro,
            drop_last=True,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(epoch),
        )
        group: list[Batch] = []
        step = 0
        for b in loader:
            group.append(b)
            if len(group) == accumulation:
                if step >= start_step:
                    yield group
                step += 1
                group = []
                if step >= self.steps_per_epoch():
                    return


def iterate_eval(dataset, collate, batch_size: int, num_workers: int = 0) -> Iterator[Batch]:
    """Plain in-order batches for evaluation (map-style or iterable)."""
    yield from DataLoader(
        dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers, shuffle=False
    )


class SourceTagged:
    """Collate wrapper: the batch's meta["source"] lists each sample's "source" (for mixture logging)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, samples: list[dict[str, Any]]) -> Batch:
        batch = self.collate(samples)
        batch.meta["source"] = [s.get("source") for s in samples]
        return batch


class MixtureData:
    """Step iteration over several map-style sources mixed by a `MixtureSampler` (D3, T9).

    sources: name -> samples (dicts; each is given its "source" name). weights: the target mixture, fixed
    (K floats) or a CurriculumSchedule over optimizer steps. Step s of the run (counted over epochs, an
    epoch being total size // batch_size steps) takes the draws s * batch_size ... of one seeded sampler, so
    the stream is a function of (seed, sizes, weights) only: resume replays the draws up to the step (cheap:
    no data is read) and any world size sees the same global batches, split over ranks and micro-batches as
    in MapData. Batches carry meta["source"]; `target_mixture(step)` gives the target the trainer logs.
    """

    def __init__(
        self,
        sources: dict[str, list[dict[str, Any]]],
        weights,
        collate,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
    ):
        from torch.utils.data import ConcatDataset

        if not sources:
            raise DataError("a mixture needs at least one source")
        self.source_names = list(sources)
        self.sizes = [len(v) for v in sources.values()]
        self.dataset = ConcatDataset(
            [ListDataset([{**s, "source": name} for s in samples]) for name, samples in sources.items()]
        )
        self.weights = weights
        self.collate = SourceTagged(collate)
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self._targets = None  # a sampler kept only to evaluate the target mixture

    def _sampler(self):
        from .samplers import MixtureSampler

        return MixtureSampler(self.sizes, self.weights, seed=self.seed, batch_size=self.batch_size)

    def target_mixture(self, step: int) -> dict[str, float]:
        """The target share of each source at optimizer step `step` (counted from the start of the run)."""
        if self._targets is None:
            self._targets = self._sampler()
        return dict(zip(self.source_names, self._targets.target(step)))

    def steps_per_epoch(self) -> int:
        return sum(self.sizes) // self.batch_size

    def step_batches(
        self, epoch: int, start_step: int, rank: int, world: int, accumulation: int
    ) -> Iterator[list[Batch]]:
        spe = self.steps_per_epoch()
        sampler = self._sampler()
        for _ in range(epoch * spe + start_step):
            sampler.next_batch()
        steps = ([sampler.flat_index(pair) for pair in sampler.next_batch()] for _ in range(start_step, spe))
        index_lists = rank_micro_batches(steps, self.batch_size, rank, world, accumulation)
        yield from _index_batches(self, index_lists, epoch, accumulation)
