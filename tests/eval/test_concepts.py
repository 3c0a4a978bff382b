"""Concepts of the synthetic world: prompts, negatives, labels (mmfusion.eval.concepts)."""

import pytest

from mmfusion.data.synthetic import Obj, Scene
from mmfusion.errors import ConfigError
from mmfusion.eval.concepts import concept_prompts, negative_prompts, shows, synthetic_data


def test_prompts_negatives_and_labels():
    assert len(concept_prompts("red")) == 10 and "a large red cross" in concept_prompts("red")
    assert len(concept_prompts("cross")) == 16 and len(concept_prompts("large")) == 40
    neg = negative_prompts("red")
    assert len(neg) == 70 and not any(" red " in p for p in neg) and "a small blue circle" in neg
    scene = Scene((Obj("circle", "red", "small", 0.2, 0.5), Obj("cross", "blue", "large", 0.8, 0.5)))
    assert shows(scene, "red") and shows(scene, "cross") and shows(scene, "large")
    assert not shows(scene, "green") and not shows(scene, "square")
    with pytest.raises(ConfigError, match="concepts are"):
        concept_prompts("crimson")


def test_synthetic_data_labels_match_the_scenes():
    d = synthetic_data(0, "val", 20, ["red", "circle"])
    assert d["labels"].shape == (20, 2) and len(d["images"]) == len(d["texts"]) == 20
    for text, (red, circle) in zip(d["texts"], d["labels"]):
        assert red == (" red " in f" {text} ") and circle == ("circle" in text)
