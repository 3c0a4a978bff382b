from collections import Counter

import pytest
from torch.utils.data import DataLoader

from mmfusion.data.engine.stream import (
    StreamingDataset,
    combination_counts,
    scan_shards,
    stratified_holdout,
)
from mmfusion.data.synthetic import SyntheticWorld, WorldConfig, make_split
from mmfusion.data.writers import write_webdataset
from mmfusion.errors import ConfigError, DataError


def _samples(n, drop_image_every=3, audio_every=None):
    """n tiny image+text samples; every drop_image_every-th is text only, every audio_every-th has audio."""
    world = SyntheticWorld(WorldConfig(seed=0, image_size=8, audio_sample_rate=1000, audio_seconds=0.01))
    out = []
    for i, s in enumerate(make_split(world, "train", n, ("image", "text", "audio"))):
        if i % drop_image_every == 0:
            s.pop("image")
        if audio_every is None or i % audio_every:
            s.pop("audio"), s.pop("audio_sr")
        out.append(s)
    return out


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """23 samples in 5 shards of 5, 5, 5, 5, 3 (cannot be dealt evenly to 2 ranks) and 4 combinations:
    i % 3 == 0 has no image (0, 3, ..., 21), i % 7 == 0 has audio (0, 7, 14, 21)."""
    root = tmp_path_factory.mktemp("uneven")
    write_webdataset(_samples(23, audio_every=7), root, samples_per_shard=5)
    return root


@pytest.fixture(scope="module")
def even(tmp_path_factory):
    """24 samples in 4 shards of 6 (whole shards go to ranks)."""
    root = tmp_path_factory.mktemp("even")
    write_webdataset(_samples(24), root, samples_per_shard=6)
    return root


def _deliver(monkeypatch, root, world, workers, epoch=0, **kw):
    """{rank: ids in delivery order} over `world` simulated ranks, each with `workers` DataLoader workers."""
    out = {}
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        ds = StreamingDataset(root, seed=3, **kw)
        ds.set_epoch(epoch)
        loader = DataLoader(
            ds, batch_size=None, num_workers=workers, collate_fn=lambda s: s, timeout=30 if workers else 0
        )
        out[rank] = [s["id"] for s in loader]
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", ["uneven", "even"])
def test_every_sample_exactly_once_over_2_ranks_x_2_workers(layout, request, monkeypatch):
    root = request.getfixturevalue(layout)
    every = {e.id for e in scan_shards(root)}
    got = _deliver(monkeypatch, root, world=2, workers=2, shuffle=4)
    delivered = got[0] + got[1]
    assert Counter(delivered) == Counter(every)  # no duplicate, no gap
    assert abs(len(got[0]) - len(got[1])) <= 1  # ranks stay in step (no padding needed for DDP)
    # the train / val splits are each exactly-once too, and together they are the whole set
    tr = _deliver(monkeypatch, root, world=2, workers=2, split="train", shuffle=4)
    va = _deliver(monkeypatch, root, world=2, workers=2, split="val")
    train, val = tr[0] + tr[1], va[0] + va[1]
    assert len(train) == len(set(train)) and len(val) == len(set(val))
    assert set(train) | set(val) == every and not set(train) & set(val)


@pytest.mark.timeout(60)
def test_order_is_a_function_of_seed_and_epoch(uneven, monkeypatch):
    a = _deliver(monkeypatch, uneven, world=1, workers=0, epoch=1, shuffle=6)[0]
    b = _deliver(monkeypatch, uneven, world=1, workers=0, epoch=1, shuffle=6)[0]
    c = _deliver(monkeypatch, uneven, world=1, workers=0, epoch=2, shuffle=6)[0]
    plain = _deliver(monkeypatch, uneven, world=1, workers=0, epoch=1, shuffle=0)[0]
    assert a == b
    assert a != c and sorted(a) == sorted(c)
    assert a != plain and plain == sorted(plain)  # shuffle=0 keeps shard order (ids ascend in these shards)


def test_holdout_covers_every_combination(uneven):
    index = scan_shards(uneven)
    counts = combination_counts(index)
    assert counts == {"image+text": 13, "text": 6, "audio+text": 2, "audio+image+text": 2}
    h = stratified_holdout(index, fraction=0.1, seed=0)
    # round(0.1 n) with at least one per combination, never the whole combination when n > 1
    assert h.counts == {
        "audio+image+text": {"train": 1, "val": 1},
        "audio+text": {"train": 1, "val": 1},
        "image+text": {"train": 12, "val": 1},
        "text": {"train": 5, "val": 1},
    }
    by_key = {(e.shard, e.key): e.combination for e in index}
    assert {by_key[k] for k in h.val} == set(counts)
    assert stratified_holdout(index, fraction=0.1, seed=0) == h  # deterministic
    # a combination with one sample goes to validation only
    single = stratified_holdout(index[:1] + [e for e in index if e.combination != index[0].combination], 0.1)
    assert single.singletons == (index[0].combination,)
    assert single.counts[index[0].combination] == {"train": 0, "val": 1}
    with pytest.raises(ConfigError, match="val_fraction = 1.5"):
        stratified_holdout(index, fraction=1.5)


def test_val_split_matches_holdout_and_never_augments(uneven):
    aug = {"image": {"hflip_p": 1.0, "occlude_p": 1.0}, "text": {"synonym_p": 1.0}}
    val = StreamingDataset(uneven, split="val", augment=aug)
    plain = StreamingDataset(uneven, split="val", holdout=val.holdout)
    a, b = list(val), list(plain)
    assert [s["id"] for s in a] == [s["id"] for s in b] and len(a) == val.num_samples() == 4
    assert all(x.get("text") == y.get("text") for x, y in zip(a, b))
    assert sorted(val.texts()) == sorted(s["text"] for s in b)  # the tokenizer sees only its split's captions
    assert all((x.get("image") is None) or (x["image"] == y["image"]).all() for x, y in zip(a, b))
    # the same config does augment the training split
    train = list(StreamingDataset(uneven, split="train", holdout=val.holdout, augment=aug, shuffle=0))
    ref = {s["id"]: s for s in StreamingDataset(uneven, split="train", holdout=val.holdout, shuffle=0)}
    assert len(train) == 19 and len(list(StreamingDataset(uneven, split="train").texts())) == 19
    assert any(s.get("image") is not None and (s["image"] != ref[s["id"]]["image"]).any() for s in train)


def test_bad_split_name_is_a_config_error(uneven):
    with pytest.raises(ConfigError, match="split = 'test'"):
        StreamingDataset(uneven, split="test")


def test_split_needs_distinct_shard_names(uneven, even):
    with pytest.raises(DataError, match="shard-000000.tar"):
        StreamingDataset([uneven, even], split="train")
