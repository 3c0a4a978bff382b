"""run.load_split on WebDataset shards: the streaming loader, the stratified validation hold-out (D8) and the
augmentation config (D7) wired into runs."""

import pytest

from mmfusion.config import config_from_dict
from mmfusion.data.synthetic import SyntheticWorld, WorldConfig, make_split
from mmfusion.data.writers import write_webdataset
from mmfusion.errors import ConfigError
from mmfusion.run import load_split


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    samples = make_split(SyntheticWorld(WorldConfig(seed=0)), "train", 40, modalities=("image", "text"))
    write_webdataset(samples, out, name="train", samples_per_shard=10)
    return out


def ids(dataset):
    return [s["id"] for s in dataset]


def test_without_data_val_the_validation_split_is_held_out_of_the_training_shards(shards):
    cfg = config_from_dict({"data": {"source": "webdataset", "train": str(shards), "val_fraction": 0.25}})
    train, val = load_split(cfg, "train"), load_split(cfg, "val")
    t, v = ids(train), ids(val)
    assert len(v) == 10 and len(t) == 30 and set(t).isdisjoint(v)  # one combination (image+text): 25 %
    assert train.num_samples() == 30  # the epoch length the trainer uses
    assert ids(load_split(cfg, "val")) == v  # deterministic, unshuffled


def test_augmentation_is_validated_and_only_for_streamed_training_data(shards):
    base = {"source": "webdataset", "train": str(shards)}
    with pytest.raises(ConfigError, match=r"augment\.image\.hflip_p"):
        config_from_dict({"data": {**base, "augment": {"image": {"hflip_p": 2}}}})
    with pytest.raises(ConfigError, match="augmentation applies to the streaming loader"):
        config_from_dict({"data": {"augment": {"image": {"hflip_p": 0.5}}}})
    cfg = config_from_dict({"data": {**base, "augment": {"image": {"hflip_p": 1.0}}}})
    assert load_split(cfg, "train").augmenter.active and not load_split(cfg, "val").augmenter.active


def test_streamed_micro_batches_are_full_with_several_workers(shards):
    """40 samples (4 shards) over 2 DataLoader workers in micro-batches of 3: each worker streams 20, and its
    last partial batch (2 rows) is dropped, so every batch the trainer sees has 3 rows (a partial one would
    break equal-size all-gathers)."""
    from mmfusion.data.engine.stream import StreamingDataset
    from mmfusion.data.loader import StreamData

    dataset = StreamingDataset(shards, shuffle=0)
    data = StreamData(dataset, lambda samples: samples, batch_size=3, num_samples=40, num_workers=2)
    sizes = [len(b) for group in data.step_batches(0, 0, rank=0, world=1, accumulation=1) for b in group]
    assert sizes == [3] * 12  # 2 workers x 6 full batches; 2 x 2 samples dropped
