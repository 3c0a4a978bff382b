"""SCD scores, threshold calibration and detection metrics on hand-made inputs (mmfusion.safety.scd)."""

import math

import numpy as np
import pytest
import torch

from mmfusion.safety.scd import (
    SCDCalibration,
    calibrate_threshold,
    clean_rank,
    combined_scores,
    detection_metrics,
    distance_scores,
    image_mutation_scores,
    mutate_images,
    mutate_text,
    mutation_scores,
    text_mutation_scores,
    top1,
)


def test_distance_is_one_minus_cosine_of_the_top1_output():
    s = math.sqrt(0.5)
    queries = torch.tensor([[1.0, 0.0], [s, s], [0.0, -1.0]])
    candidates = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    idx, best = top1(queries, candidates)
    assert idx.tolist() == [0, 0, 0]  # the tie of row 1 goes to the first candidate; row 2 is at 90 degrees
    torch.testing.assert_close(best, torch.tensor([1.0, s, 0.0]))
    torch.testing.assert_close(distance_scores(queries, candidates[idx]), torch.tensor([0.0, 1 - s, 1.0]))
    # opposite vectors are at the largest distance, 2
    assert distance_scores(torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])).item() == 2.0


def test_mutation_score_is_the_fraction_of_changed_outputs():
    clean = torch.tensor([3, 1, 2])
    mutated = torch.tensor([[3, 1, 0], [3, 0, 0], [3, 1, 2], [3, 1, 0]])
    torch.testing.assert_close(mutation_scores(clean, mutated), torch.tensor([0.0, 0.25, 0.75]))
    with pytest.raises(ValueError, match=r"expected \(M, 3\)"):
        mutation_scores(clean, torch.tensor([3, 1, 2]))


def test_mutations_are_small_seeded_and_deterministic():
    rng = np.random.default_rng(0)
    texts = [mutate_text("a small red circle", rng) for _ in range(50)]
    from mmfusion.safety.attacks import levenshtein

    assert all(levenshtein(t, "a small red circle") <= 1 for t in texts)
    assert texts == [
        mutate_text("a small red circle", r) for r in [np.random.default_rng(0)] for _ in range(50)
    ]
    assert mutate_text("123 !", rng) == "123 !"
    x = torch.full((2, 3, 8, 8), 0.5)
    y = mutate_images(x, torch.Generator().manual_seed(0), sigma=0.01)
    assert y.shape == x.shape and 0 < (y - x).abs().max() < 0.06 and y.min() >= 0 and y.max() <= 1
    assert torch.equal(y, mutate_images(x, torch.Generator().manual_seed(0), sigma=0.01))


def test_mutation_scores_of_a_stable_and_a_brittle_predictor():
    # a predictor reading only the text length is stable under substitutions, not under deletions / insertions
    lengths = lambda ts: torch.tensor([len(t) for t in ts])  # noqa: E731
    constant = lambda ts: torch.zeros(len(ts), dtype=torch.long)  # noqa: E731
    assert text_mutation_scores(["a red circle"], constant, 8, 0).tolist() == [0.0]
    s = text_mutation_scores(["a red circle"], lengths, 8, 0).item()
    assert 0 < s <= 1 and s * 8 == int(s * 8)
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    brightness = lambda z: (z.mean(dim=(1, 2, 3)) * 1e6).long()  # noqa: E731
    assert image_mutation_scores(x, brightness, 4, 0).tolist() == [1.0, 1.0, 1.0]
    assert image_mutation_scores(x, lambda z: torch.zeros(len(z)), 4, 0).tolist() == [0.0, 0.0, 0.0]


def test_calibrated_threshold_gives_the_stated_fpr_on_its_calibration_set():
    scores = np.arange(100) / 100  # 0.00 .. 0.99, no ties
    t = calibrate_threshold(scores, 0.05)
    assert t == 0.94 and (scores > t).mean() == 0.05
    assert (scores > calibrate_threshold(scores, 0.0)).sum() == 0
    assert (scores > calibrate_threshold(scores, 0.012)).sum() == 1  # floor(1.2)
    shuffled = np.random.default_rng(0).permutation(scores)
    assert calibrate_threshold(shuffled, 0.05) == t
    with pytest.raises(ValueError, match="fpr"):
        calibrate_threshold(scores, 1.0)
    with pytest.raises(ValueError, match="no clean scores"):
        calibrate_threshold([], 0.05)


def test_detection_metrics_exact():
    clean = [0.1, 0.2, 0.3, 0.9]
    adv = [0.25, 0.8, 0.95]
    m = detection_metrics(clean, adv, threshold=0.5)
    assert m["tpr"] == pytest.approx(2 / 3) and m["fpr"] == 0.25
    # pairs (adv > clean): 0.25 beats 2, 0.8 beats 3, 0.95 beats 4 -> 9 of 12
    assert m["auroc"] == pytest.approx(9 / 12)
    assert detection_metrics([0.0, 0.1], [0.5, 0.6], 0.3)["auroc"] == 1.0


def test_calibration_file_round_trip_and_errors(tmp_path):
    cal = SCDCalibration("distance", 0.42, 0.05, 300, "abc", 8, 0)
    back = SCDCalibration.load(cal.save(tmp_path / "scd.json"))
    assert back == cal and back.flag(0.43) and not back.flag(0.42)
    with pytest.raises(ValueError, match="score 'loss'"):
        SCDCalibration("loss", 0.1, 0.05, 10)
    (tmp_path / "bad.json").write_text("{}")
    from mmfusion.errors import ConfigError

    with pytest.raises(ConfigError, match="mmfusion scd calibrate"):
        SCDCalibration.load(tmp_path / "bad.json")


def test_clean_rank_and_combined_score():
    cal = np.array([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(clean_rank(cal, [0.0, 0.2, 0.25, 0.5]), [0.0, 0.375, 0.5, 1.0])
    both = combined_scores(
        {"distance": cal, "mutation": np.array([0.0, 0.0, 0.5, 1.0])},
        {"distance": np.array([0.05, 0.45]), "mutation": np.array([1.0, 0.0])},
    )
    np.testing.assert_allclose(both, [0.875, 1.0])  # the first is extreme on mutation, the second on distance
