import argparse
import json

import pytest

from mmfusion.data.engine.stream import combination_counts, sample_combination, scan_shards
from mmfusion.data.engine.topup import add_arguments, plan_topup, topup, topup_main
from mmfusion.data.sources import WebDatasetSource
from mmfusion.data.synthetic import Scene, SyntheticWorld, WorldConfig, make_split
from mmfusion.data.writers import write_webdataset
from mmfusion.errors import ConfigError

WORLD = SyntheticWorld(WorldConfig(seed=0, image_size=8, audio_sample_rate=1000, audio_seconds=0.05))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """5 image+text, 2 text, 1 audio+text samples."""
    root = tmp_path_factory.mktemp("src")
    samples = make_split(WORLD, "train", 8, ("image", "text", "audio"))
    for i, s in enumerate(samples):
        if i >= 5:
            s.pop("image")
        if i != 7:
            s.pop("audio"), s.pop("audio_sr")
    write_webdataset(samples, root, samples_per_shard=3)
    return root


def test_plan_exact():
    counts = {"image+text": 5, "text": 2, "audio+text": 1}
    assert plan_topup(counts, 3) == {"audio+text": 2, "text": 1}
    # named combinations, in any order of names, may be absent from the data
    assert plan_topup(counts, 3, ["text+audio", "image+audio"]) == {"audio+text": 2, "audio+image": 3}
    with pytest.raises(ConfigError, match="cannot render \\['depth'\\]"):
        plan_topup(counts, 3, ["depth+text"])
    with pytest.raises(ConfigError, match="target = 0"):
        plan_topup(counts, 0)


def test_topup_reaches_target_with_paired_samples(src, tmp_path):
    report = topup(src, tmp_path, target=3, world=WORLD)
    assert report["before"] == {"audio+text": 1, "image+text": 5, "text": 2}
    assert report["added"] == {"audio+text": 2, "text": 1}
    assert report["after"] == {"audio+text": 3, "image+text": 5, "text": 3}
    assert combination_counts(scan_shards([src, tmp_path])) == report["after"]
    added = list(WebDatasetSource(tmp_path))
    assert sorted(s["id"] for s in added) == [
        "topup-audio+text-0000000",
        "topup-audio+text-0000001",
        "topup-text-0000000",
    ]
    for s in added:
        assert sample_combination(s) == s["id"].split("-")[1]
        assert s["meta"]["source"] == "synthetic-topup" and s["meta"]["world_index"] >= 1_000_000
        # paired: the caption names every object of the scene it was rendered from
        scene = Scene.from_dict(s["scene"])
        assert scene.key_str() == s["scene_key"]
        assert all(" ".join(k) in s["text"] for k in scene.key())


def test_cli(src, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [str(src), "--target", "2", "--out", str(tmp_path), "--combinations", "image+text,audio+text"]
        + ["--image-size", "8"]
    )
    assert topup_main(args) == 0
    report = json.loads((tmp_path / "topup_report.json").read_text())
    assert report["added"] == {"audio+text": 1}
    out = capsys.readouterr().out
    assert "audio+text" in out and "wrote 1 samples in 1 shard(s)" in out
