import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmfusion import load_model
from mmfusion.data.engine.pseudo import (
    PseudoLabel,
    add_arguments,
    apply_labels,
    class_texts_from_labelled,
    precision_table,
    pseudo_label,
    pseudo_label_main,
)
from mmfusion.data.sources import WebDatasetSource
from mmfusion.data.synthetic import SyntheticWorld, WorldConfig, make_split
from mmfusion.data.writers import write_webdataset
from mmfusion.errors import ConfigError, DataError


class StubModel:
    """Text -> fixed 2-d vectors; an "image" is its own 2-d embedding; scale 10."""

    VECTORS = {"red thing": [1.0, 0.0], "crimson thing": [1.0, 0.0], "blue thing": [0.0, 1.0]}

    def scale(self):
        return torch.tensor(10.0)

    def encode_text(self, texts):
        return F.normalize(torch.tensor([self.VECTORS[t] for t in texts]), dim=-1)

    def encode_image(self, images):
        return F.normalize(torch.tensor(np.stack(images), dtype=torch.float32), dim=-1)


def test_confidence_is_softmax_of_scaled_cosine_to_prototypes():
    classes = {"red": ["crimson thing", "red thing"], "blue": ["blue thing"]}
    images = [np.array([1.0, 0.0]), np.array([2.0, 1.0]), np.array([1.0, 1.0]), np.array([1.0, 3.0])]
    got = pseudo_label(StubModel(), images, classes, threshold=0.99, ids=["a", "b", "c", "d"])

    def p(margin):  # two classes: softmax probability of the winner = sigmoid(scale * cosine margin)
        return 1 / (1 + math.exp(-10 * margin))

    want = [
        ("red", p(1.0)),
        ("red", p(2 / math.sqrt(5) - 1 / math.sqrt(5))),
        ("red", 0.5),  # a tie goes to the first class
        ("blue", p(3 / math.sqrt(10) - 1 / math.sqrt(10))),
    ]
    assert [r.label for r in got] == [w[0] for w in want]
    assert [r.confidence for r in got] == pytest.approx([w[1] for w in want], abs=1e-6)
    assert [r.accepted for r in got] == [True, False, False, True]  # p(2/sqrt(10)) = 0.99818
    # a given temperature replaces the model's scale: 1 / 0.2 = 5
    hot = pseudo_label(StubModel(), images[:1], classes, temperature=0.2)
    assert hot[0].confidence == pytest.approx(1 / (1 + math.exp(-5)), abs=1e-6)


def test_precision_table_and_apply_labels_exact():
    records = [
        PseudoLabel("a", "red", 0.95, True),
        PseudoLabel("b", "red", 0.80, False),
        PseudoLabel("c", "blue", 0.60, False),
        PseudoLabel("d", "blue", 0.99, True),
        PseudoLabel("e", "blue", 0.99, True),
    ]
    truths = {"a": "red", "b": "blue", "c": "blue", "d": "blue", "e": None}
    rows = precision_table(records, truths, [0.0, 0.7, 0.9, 1.0])
    assert [(r["kept"], r["coverage"], r["precision"]) for r in rows[:3]] == [
        (4, 1.0, 0.75),
        (3, 0.75, 2 / 3),
        (2, 0.5, 1.0),
    ]
    assert rows[3]["kept"] == 0 and math.isnan(rows[3]["precision"])
    samples = [{"id": r.id, "image": i} for i, r in enumerate(records)]
    kept = apply_labels(samples, records, {"red": ["a red thing"], "blue": ["a blue thing", "x"]})
    assert [(s["id"], s["text"], s["meta"]["pseudo_label"]) for s in kept] == [
        ("a", "a red thing", "red"),
        ("d", "a blue thing", "blue"),
        ("e", "a blue thing", "blue"),
    ]


def test_class_texts_and_errors():
    samples = [
        {"text": "b", "scene_key": "k1"},
        {"text": "a", "scene_key": "k1"},
        {"text": "a", "scene_key": "k1"},
        {"text": "c", "meta": {"colour": "red"}, "scene_key": "k2"},
        {"scene_key": "k3"},  # no caption: not a class
    ]
    assert class_texts_from_labelled(samples) == {"k1": ["a", "b"], "k2": ["c"]}
    assert class_texts_from_labelled(samples, "colour") == {"red": ["c"]}
    with pytest.raises(DataError, match="'size' label"):
        class_texts_from_labelled(samples, "size")
    with pytest.raises(ConfigError, match="threshold = 1.5"):
        pseudo_label(StubModel(), [np.array([1.0, 0.0])], {"red": ["red thing"]}, threshold=1.5)


@pytest.mark.timeout(60)
def test_cli_writes_accepted_shards_and_report(tmp_path, make_tiny_model):
    model = make_tiny_model()
    model.save_pretrained(tmp_path / "model")
    world = SyntheticWorld(WorldConfig(seed=0, image_size=16))
    write_webdataset(make_split(world, "train", 40, ("text",)), tmp_path / "lab")
    write_webdataset(make_split(world, "val", 12, ("image",)), tmp_path / "unl")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [str(tmp_path / "unl"), "--labelled", str(tmp_path / "lab"), "--model", str(tmp_path / "model")]
        + ["--out", str(tmp_path / "out"), "--threshold", "0.0", "--report-thresholds", "0,1"]
    )
    assert pseudo_label_main(args, load_model) == 0
    report = json.loads((tmp_path / "out" / "pseudo_report.json").read_text())
    assert report["unlabelled"] == 12 and report["accepted"] == 12 and report["with_true_label"] == 12
    assert [r["kept"] for r in report["precision"]] == [12, 0]
    written = list(WebDatasetSource(tmp_path / "out"))
    assert len(written) == 12
    assert all(s["meta"]["pseudo_label"] == r["label"] for s, r in zip(written, report["labels"]))
    assert all(isinstance(s["text"], str) and s["image"].shape == (16, 16, 3) for s in written)
