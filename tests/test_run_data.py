"""run.load_split on WebDataset shards: the streaming loader, the stratified validation hold-out (D8) and the
augmentation config (D7) wired into runs."""

import pytest

from mmfusion.config import config_from_dict
from mmfusion.data.sources import write_webdataset
from mmfusion.data.synthetic import SyntheticWorld, WorldConfig, make_split
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
