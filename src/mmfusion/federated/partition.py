"""Dividing a training split among federated clients, and what each client's samples carry.

    parts = partition(labels, n_clients, cfg.partition, seed)   # list of index arrays, disjoint, covering all
    data = ClientDataset(train_set, parts[cid], drop={"image"})  # an audio-only edge

Partitions (non-IID as in Hsu et al. 2019, "Measuring the effects of non-identical data distribution"):
  iid    a seeded shuffle cut into equal parts
  label  per class, the class's samples are split among the clients by shares drawn from Dirichlet(alpha)
  size   client sizes drawn from Dirichlet(alpha); which samples go where is a plain shuffle
Each is redrawn (seeded) until every client has at least `min_samples`; an impossible request is an error.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..train.federated_config import PartitionConfig

_TRIES = 100


def sample_labels(dataset, field: str) -> list[Any]:
    """The value of `field` of every sample of a map-style dataset, in order (None where a sample has none),
    read without decoding media where the dataset allows it."""
    from ..data.splits import field_values

    values = field_values(dataset, field)
    if values is None:
        raise ConfigError(
            "federated.partition.by = 'label' needs a map-style training split (synthetic or JSONL data); "
            "a WebDataset stream cannot be partitioned by label before training"
        )
    return values


def _too_small(n: int, clients: int, min_samples: int) -> None:
    if n < clients * min_samples:
        raise ConfigError(
            f"federated: {n} training samples cannot give {clients} clients at least "
            f"federated.partition.min_samples = {min_samples} each"
        )


def _split_by_counts(order: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return [np.sort(part) for part in np.split(order, np.cumsum(counts)[:-1])]


def partition(
    labels: Sequence[Any] | None, n: int, clients: int, cfg: PartitionConfig, seed: int
) -> list[np.ndarray]:
    """`clients` disjoint sorted index arrays that together cover range(n).

    labels: each sample's class (any hashable; None is a class of its own), needed for `by: label`."""
    _too_small(n, clients, cfg.min_samples)
    rng = np.random.default_rng([seed, 20])
    if cfg.by == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), clients)]
    if cfg.by == "size":
        for _ in range(_TRIES):
            shares = rng.dirichlet(np.full(clients, cfg.alpha))
            counts = np.floor(shares * n).astype(int)
            counts[np.argmax(counts)] += n - counts.sum()
            if counts.min() >= cfg.min_samples:
                return _split_by_counts(rng.permutation(n), counts)
        raise ConfigError(
            f"federated.partition: no Dirichlet(alpha={cfg.alpha}) size split of {n} samples gives every one of "
            f"{clients} clients min_samples = {cfg.min_samples} in {_TRIES} draws: raise alpha or lower "
            "min_samples"
        )
    if labels is None or len(labels) != n:
        raise ValueError("partition(by='label') needs one label per sample")
    by_class: dict[Any, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    keys = sorted(by_class, key=repr)  # a fixed class order: the draw does not depend on dict order
    for _ in range(_TRIES):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for key in keys:
            idx = rng.permutation(by_class[key])
            shares = rng.dirichlet(np.full(clients, cfg.alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].extend(chunk.tolist())
        if min(len(p) for p in parts) >= cfg.min_samples:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ConfigError(
        f"federated.partition: no Dirichlet(alpha={cfg.alpha}) label split gives every one of {clients} "
        f"clients min_samples = {cfg.min_samples} in {_TRIES} draws: raise alpha or lower min_samples"
    )


def label_histogram(labels: Sequence[Any], parts: Sequence[np.ndarray]) -> list[dict[str, int]]:
    """Per client: class -> sample count (for the run log and docs)."""
    return [dict(sorted(Counter(str(labels[i]) for i in p).items())) for p in parts]


class ClientDataset(Dataset):
    """The samples `indices` of `base`, without the fields in `drop` (the modalities this edge lacks: the
    collate masks them as missing)."""

    def __init__(self, base, indices: Sequence[int], drop: set[str] | frozenset[str] = frozenset()):
        self.base, self.indices, self.drop = base, [int(i) for i in indices], frozenset(drop)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.base[self.indices[i]]
        if not self.drop or not isinstance(sample, dict):
            return sample
        return {k: v for k, v in sample.items() if k not in self.drop}


def dropped_fields(inputs: dict[str, str], fields: dict[str, str], keep: Sequence[str] | None) -> set[str]:
    """The sample fields a client that has only the inputs `keep` must not see.

    inputs: model input key -> modality kind; fields: input key -> sample field (data.inputs); keep: input
    keys (None: all). An unknown key is a ConfigError naming the allowed ones."""
    if keep is None:
        return set()
    unknown = sorted(set(keep) - set(inputs))
    if unknown:
        raise ConfigError(
            f"federated.modalities names {unknown}: the model's inputs are {sorted(inputs)} (model.encoders)"
        )
    return {fields.get(k, k) for k in inputs if k not in keep}


__all__ = ["ClientDataset", "dropped_fields", "label_histogram", "partition", "sample_labels"]
