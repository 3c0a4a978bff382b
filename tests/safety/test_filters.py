"""Concept filters: thresholds for a recall target, precision / recall, levels, the file (mmfusion.safety.filters)."""

import numpy as np
import pytest

from mmfusion.errors import ConfigError, DataError
from mmfusion.safety.filters import (
    Concept,
    ConceptFilters,
    concept_vector,
    level_for,
    precision_recall,
    threshold_for_precision,
    threshold_for_recall,
)


def test_concept_vector_is_the_normalised_mean():
    v = concept_vector(np.array([[1.0, 0.0], [0.0, 1.0]]))
    np.testing.assert_allclose(v, [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)
    # with negatives: the direction mean(prompts) - mean(negatives)
    v = concept_vector(np.array([[1.0, 0.0], [0.6, 0.8]]), np.array([[0.6, 0.8]]))
    np.testing.assert_allclose(v, [np.sqrt(0.2), -np.sqrt(0.8)], rtol=1e-6)  # (0.2, -0.4) normalised


def test_threshold_for_recall_and_precision_recall_exact():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    labels = np.array([1, 1, 0, 1, 0, 1, 0, 0, 0, 0], dtype=bool)  # positives at 0.9, 0.8, 0.6, 0.4
    assert threshold_for_recall(scores, labels, 0.5) == 0.8  # 2 of 4
    assert threshold_for_recall(scores, labels, 0.75) == 0.6  # 3 of 4
    assert threshold_for_recall(scores, labels, 1.0) == 0.4
    assert threshold_for_recall(scores, labels, 0.9) == 0.4  # ceil(3.6) = 4
    pr = precision_recall(scores, labels, 0.6)
    assert pr == {"precision": 0.75, "recall": 0.75, "blocked": 4, "positives": 4, "n": 10}
    assert precision_recall(scores, labels, 2.0)["precision"] == 1.0  # nothing blocked
    with pytest.raises(ValueError, match="no positive"):
        threshold_for_recall(scores, np.zeros(10, dtype=bool), 0.9)


def test_threshold_for_precision_exact():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    labels = np.array([1, 1, 0, 1, 0, 1, 0, 0, 0, 0], dtype=bool)
    # blocking down to 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3: precision 1, 1, 2/3, 3/4, 3/5, 4/6, 4/7
    assert threshold_for_precision(scores, labels, 1.0) == 0.8  # the most recall at precision 1: 2 of 4
    assert threshold_for_precision(scores, labels, 0.75) == 0.6
    assert threshold_for_precision(scores, labels, 0.6) == 0.4  # 4/6: not the first one to qualify
    assert threshold_for_precision(scores, labels, 0.4) == 0.0  # 4/10 when everything is blocked
    # ties: a threshold blocks every input tied with it, so 0.5 cannot stop between the two scores of 0.5
    tied = threshold_for_precision(np.array([0.9, 0.5, 0.5, 0.1]), np.array([1, 1, 0, 0], dtype=bool), 0.9)
    assert tied == 0.9
    with pytest.raises(ValueError, match=r"no threshold reaches precision 1.0 \(at best 0.500\)"):
        threshold_for_precision(np.array([0.9, 0.9, 0.1]), np.array([1, 0, 0], dtype=bool), 1.0)


def _filters():
    return ConceptFilters(
        [Concept("red", ["a red thing"], [1.0, 0.0]), Concept("cross", ["a cross"], [0.0, 1.0])]
    )


def test_calibrate_check_levels_and_report():
    f = _filters()
    emb = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    labels = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [0, 0]], dtype=bool)
    f.recall = {"normal": 0.5, "strict": 1.0}
    f.calibrate("image", emb, labels)
    assert f.concepts[0].thresholds["image"] == pytest.approx({"normal": 1.0, "strict": 0.8})
    assert f.concepts[1].thresholds["image"] == pytest.approx({"normal": 1.0, "strict": 0.8})
    assert f.check("image", emb) == [["red"], [], [], ["cross"], []]
    assert f.check("image", emb, "strict") == [["red"], ["red"], ["cross"], ["cross"], []]
    # per-input levels: only the SCD-flagged input (index 1) is checked strictly
    levels = [level_for(flag) for flag in (False, True, False, False, False)]
    assert f.check("image", emb, levels) == [["red"], ["red"], [], ["cross"], []]
    # no thresholds for text: nothing is blocked there
    assert f.check("text", emb, "strict") == [[], [], [], [], []]
    rep = f.report("image", emb, labels)
    assert rep["red"]["normal"]["recall"] == 0.5 and rep["red"]["strict"]["recall"] == 1.0
    assert rep["red"]["strict"]["precision"] == 1.0
    # red: positives score 1.0 and 0.8, negatives 0.6, 0.0, -1.0; cross: 0.8, 1.0 against 0.6, 0.0, 0.0
    assert rep["red"]["auroc"] == 1.0 and rep["cross"]["auroc"] == 1.0


def test_a_level_calibrated_for_precision():
    f = _filters()
    emb = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 1], [0, 0]], dtype=bool)
    f.recall, f.precision = {"normal": 0.5, "strict": 1.0}, {"strict": 0.6}
    f.calibrate("image", emb, labels)
    # red scores 1.0 (pos), 0.8 (neg), 0.6 (pos), 0.0, -1.0: precision 1, 1/2, 2/3, 2/4, 2/5 -> 0.6 at 2/3
    assert f.concepts[0].thresholds["image"] == pytest.approx({"normal": 1.0, "strict": 0.6})
    f.precision = {"normal": 1.0}
    with pytest.raises(
        DataError, match="concept 'red', image, normal level: no threshold reaches precision 1.0"
    ):
        f.calibrate("image", emb, np.array([[0, 0], [1, 1], [0, 1], [0, 1], [0, 0]], dtype=bool))


def test_filter_file_round_trip_and_errors(tmp_path):
    f = _filters()
    f.calibrate("text", np.eye(2), np.eye(2, dtype=bool))
    back = ConceptFilters.load(f.save(tmp_path / "f.json"))
    assert back == f
    with pytest.raises(ConfigError, match="calibrated with another model"):
        back.scores(np.zeros((1, 3)))
    (tmp_path / "bad.json").write_text('{"x": 1}')
    with pytest.raises(ConfigError, match="mmfusion filter calibrate"):
        ConceptFilters.load(tmp_path / "bad.json")
