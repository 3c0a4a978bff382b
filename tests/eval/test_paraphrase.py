"""Paraphrased captions of the synthetic world and the plain + paraphrased evaluation (eval.paraphrase)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mmfusion.data.synthetic import COLOURS, SHAPES, SIZES, Scene, SyntheticWorld, make_split
from mmfusion.data.synthetic.paraphrase import (
    SYNONYMS,
    TRAINING_WORDS,
    paraphrase_caption,
    paraphrase_prompts,
    paraphrase_split,
)
from mmfusion.eval.paraphrase import evaluate_plain_and_paraphrased
from mmfusion.eval.retrieval import zero_shot_prompts


@pytest.fixture(scope="module")
def samples():
    return make_split(SyntheticWorld(), "test", 60)


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_training_vocabulary_is_the_worlds():
    assert {"left", "right", "middle", "between", "there", "is", "of"} <= TRAINING_WORDS
    assert set(SIZES) | set(COLOURS) | set(SHAPES) <= TRAINING_WORDS
    assert set(SYNONYMS) == set(SIZES) | set(COLOURS) | set(SHAPES)


def test_paraphrases_never_use_a_training_word_but_a(samples):
    para = paraphrase_split(samples)
    for plain, p in zip(samples, para):
        assert words(p["text"]) & TRAINING_WORDS <= {"a"}, p["text"]
        assert p["scene_key"] == plain["scene_key"] and p["image"] is plain["image"]
        # every object is named, left to right, by synonyms of its attributes
        scene = Scene.from_dict(p["scene"])
        for size, colour, shape in scene.key():
            assert any(re.search(rf"\b{w}\b", p["text"]) for w in SYNONYMS[colour])
            assert any(re.search(rf"\b{w}\b", p["text"]) for w in SYNONYMS[shape])
            assert any(re.search(rf"\b{w}\b", p["text"]) for w in SYNONYMS[size])
    assert [p["text"] for p in paraphrase_split(samples)] == [p["text"] for p in para]  # seeded
    assert len({p["text"] for p in para}) > len(para) // 2


def test_paraphrase_example():
    scene = Scene.from_dict(
        {"objects": [{"shape": "circle", "colour": "red", "size": "small", "x": 0.2, "y": 0.5}]}
    )
    texts = {paraphrase_caption(scene, np.random.default_rng(i)) for i in range(40)}
    assert "a tiny crimson sphere" in texts and "just one little scarlet ball" in texts


def test_paraphrased_prompts_follow_the_plain_ones():
    plain, attrs = zero_shot_prompts()
    para, para_attrs = paraphrase_prompts()
    assert attrs == para_attrs and len(para) == len(plain) == 80
    assert plain[0] == "a small red circle" and para[0] == "a tiny crimson sphere"
    assert all(words(p) & TRAINING_WORDS <= {"a"} for p in para)


def test_eval_reports_both_sets(samples, make_tiny_model):
    metrics = evaluate_plain_and_paraphrased(make_tiny_model(), samples, (1, 5), 32)
    for prefix in ("", "para_"):
        for key in (
            "t2i_recall@1",
            "t2i_recall@5",
            "i2t_recall@5",
            "zero_shot_colour_acc",
            "zero_shot_shape_acc",
        ):
            assert 0.0 <= metrics[prefix + key] <= 1.0
        assert metrics[prefix + "n_pairs"] == len(samples)
    # the same images: the zero-shot sets are the same single-object images
    assert metrics["para_zero_shot_n_images"] == metrics["zero_shot_n_images"] > 0
