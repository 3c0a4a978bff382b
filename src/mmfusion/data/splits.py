"""A run's datasets from its `data:` section: the synthetic world (image-caption pairs or a task's samples), a
JSONL manifest or WebDataset shards, split by split; mixtures of several sources; a stage's own data.

Every dataset yields sample dicts in the manifest format (mmfusion.data.sources), or SkippedSample for an
unreadable one; the run collates them with its model's Collate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError
from ..modalities.base import read_field
from .config import DataConfig
from .loader import ListDataset

SPLITS = ("train", "val", "test")


def synthetic_world(data: DataConfig):
    """The synthetic world `data.synthetic` describes."""
    from .synthetic import SyntheticWorld, WorldConfig

    s = data.synthetic
    return SyntheticWorld(
        WorldConfig(seed=s.seed, image_size=s.image_size, object_count_probs=s.object_count_probs)
    )


def open_split(
    data: DataConfig,
    split: str,
    fields: Sequence[str] | None = ("image", "text"),
    require: bool = True,
    seed: int = 0,
    progress: bool = False,
):
    """The dataset of `split` ("train" | "val" | "test").

    fields: the media / text fields to read from user data (None: every one a sample has); `require`: a sample
    lacking one of them is skipped ("missing_modality") rather than kept without it. The synthetic world
    renders image-caption pairs, or the samples of `data.synthetic.task`."""
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if data.source == "synthetic":
        s = data.synthetic
        world = synthetic_world(data)
        if s.task is not None:
            from .tasks import make_task_data

            return ListDataset(make_task_data(s.task, world, split, s.size(split), seed=s.task_seed))
        from .synthetic import make_split

        return ListDataset(
            make_split(world, split, s.size(split), modalities=("image", "text"), progress=progress)
        )
    path = getattr(data, split)
    if data.source == "webdataset" and (path or split == "val"):
        # the streaming loader: lazy shards, shuffle buffer, split over ranks and workers exactly once;
        # without data.val the validation split is a stratified hold-out of the training shards (D8)
        from .engine.stream import StreamingDataset

        which = "all" if path else "val"
        if split == "train" and not data.val:
            which = "train"
        return StreamingDataset(
            path or data.train,
            split=which,
            val_fraction=data.val_fraction,
            modalities=tuple(fields) if fields else None,
            on_error=data.on_error,
            shuffle=data.shuffle_buffer if split == "train" else 0,
            seed=seed,
            augment=data.augment if split == "train" else None,
            require=require,
        )
    if not path:
        raise ConfigError(
            f"data.{split} is not set: data.source={data.source} needs a path for the {split} split"
        )
    from .sources import open_source

    return open_source(data.source, path, modalities=fields, on_error=data.on_error, require=require)


def source_fields(data: DataConfig, inputs: dict[str, str]) -> list[str]:
    """The fields a source must read for a model whose inputs (batch key -> modality kind) read the fields
    `data.inputs` names (default: the key): media fields are decoded, text fields typed; other fields (labels,
    questions) come along in the sample's meta."""
    from .sources import readable_fields

    out = []
    for key, kind in inputs.items():
        field = data.inputs.get(key, key)
        if field in readable_fields():
            out.append(field)
        elif kind != "text":
            raise ConfigError(
                f"data.inputs.{key} = {field!r}: a {kind} input reads the media field {kind!r} of a manifest "
                f"(image / audio / video files); only text inputs can read another field"
            )
    return out


def field_values(dataset, field: str) -> list[Any] | None:
    """Every sample's value of `field` in a map-style dataset, in order (None where a sample has none; a field
    kept in the sample's meta counts), read without decoding media where possible. None: a stream."""
    from .sources import JsonlDataset

    if isinstance(dataset, JsonlDataset):
        return [o.get(field) if isinstance(o, dict) else None for _, o in dataset.entries]
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return None
    return [read_field(s, field) if isinstance(s, dict) else None for s in samples]


def dataset_values(dataset, field: str) -> list[Any]:
    """Every value of `field` in a map-style dataset (manifest entries are read without decoding media)."""
    values = field_values(dataset, field)
    if values is None:
        raise ConfigError(
            f"the classes of data.target.field {field!r} cannot be read from a stream before training: "
            "list them in data.target.classes"
        )
    return [v for v in values if v is not None]


def dataset_texts(dataset, field: str = "text") -> list[str]:
    """Every text of `field` in a dataset (for tokenizer training), without decoding media where possible."""
    if field == "text" and hasattr(dataset, "texts"):
        return list(dataset.texts())
    if hasattr(dataset, "entries") or hasattr(dataset, "samples"):
        return [v for v in dataset_values(dataset, field) if isinstance(v, str)]
    return [s[field] for s in dataset if isinstance(s, dict) and isinstance(s.get(field), str)]


def stage_subset(dataset, index: int, n_train: int | None):
    """The first `n_train` samples of a map-style training set (all of it when None)."""
    if n_train is None:
        return dataset
    from torch.utils.data import IterableDataset, Subset

    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise ConfigError(
            f"train.stages.{index}.n_train: a subset needs a map-style training set (synthetic or jsonl data)"
        )
    if n_train > len(dataset):
        raise ConfigError(
            f"train.stages.{index}.n_train = {n_train}: the training split has only {len(dataset)} samples"
        )
    return dataset if n_train == len(dataset) else Subset(dataset, range(n_train))


def mixture_sources(
    data: DataConfig, keys: Sequence[str], fields: Sequence[str] | None, seed: int = 0
) -> dict[str, Any]:
    """The training sources of `data.mixture` (name -> map-style dataset), each keeping only its `modalities`
    (the model's other inputs absent). Synthetic data: disjoint consecutive slices of the training split;
    JSONL: each source's own manifest."""
    mix = data.mixture
    if data.source == "synthetic":
        total = sum(s.n or 0 for s in mix.sources)
        missing = [s.name for s in mix.sources if s.n is None]
        if missing:
            raise ConfigError(
                f"data.mixture.sources {missing}: a synthetic source needs n (its number of samples)"
            )
        base = list(
            open_split(
                data.model_copy(update={"synthetic": data.synthetic.model_copy(update={"n_train": total})}),
                "train",
                seed=seed,
            )
        )
    out, start = {}, 0
    for source in mix.sources:
        keep = set(source.modalities or keys)
        unknown = sorted(keep - set(keys))
        if unknown:
            raise ConfigError(
                f"data.mixture.sources.{source.name}.modalities: {unknown} are not inputs of the model ({list(keys)})"
            )
        drop = [data.inputs.get(k, k) for k in keys if k not in keep]
        if data.source == "synthetic":
            rows = base[start : start + source.n]
            start += source.n
        else:
            if not source.train:
                raise ConfigError(
                    f"data.mixture.sources.{source.name}: give its train manifest (train: path)"
                )
            if data.source != "jsonl":
                raise ConfigError(
                    "data.mixture with data.source=webdataset: mixtures read map-style sources (jsonl)"
                )
            from .sources import open_source

            rows = _Dropped(
                open_source("jsonl", source.train, modalities=fields, on_error=data.on_error, require=False),
                drop,
            )
            out[source.name] = rows
            continue
        out[source.name] = [{**s, **dict.fromkeys(drop)} for s in rows]
    return out


class _Dropped:
    """A map-style dataset whose samples lose `drop` fields (set to None: absent)."""

    def __init__(self, dataset, drop: Sequence[str]):
        self.dataset, self.drop = dataset, list(drop)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        s = self.dataset[i]
        return {**s, **dict.fromkeys(self.drop)} if isinstance(s, dict) else s


__all__ = [
    "SPLITS",
    "dataset_texts",
    "dataset_values",
    "mixture_sources",
    "open_split",
    "source_fields",
    "stage_subset",
    "synthetic_world",
]
