"""Caption metrics against their reference libraries, input validation, and the sample-grid plot.

FID / IS / attribute accuracy need a trained judge: they are tested in test_judge.py, which trains it once.
"""

import numpy as np
import pytest
from PIL import Image

from mmfusion.errors import DataError
from mmfusion.eval.generation import (
    bleu,
    caption_metrics,
    cider,
    rouge_l,
    save_image_grid,
    tokenize_caption,
)

# sacrebleu's README example: two reference streams for three segments; sacrebleu prints BLEU = 48.53
SACRE_HYPS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
SACRE_STREAMS = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]


def test_bleu_identical_is_100_and_disjoint_is_0():
    refs = [["a small red circle on the left"], ["there is a large blue square"]]
    assert bleu([r[0] for r in refs], refs) == pytest.approx(100.0)
    assert bleu(["zebra zebra zebra zebra", "quux quux quux quux"], refs) == pytest.approx(0.0)


def test_bleu_matches_sacrebleu_readme_example():
    per_sample = [list(r) for r in zip(*SACRE_STREAMS)]  # our layout: refs[i] = references of sample i
    assert bleu(SACRE_HYPS, per_sample) == pytest.approx(48.530827, abs=1e-5)


def test_bleu_variable_reference_counts_equal_sacrebleu_with_none_padding():
    import sacrebleu

    hyps = ["a red circle", "a large blue square on the right"]
    refs = [["a small red circle", "a red circle on a dark background"], ["a large blue square"]]
    expected = sacrebleu.corpus_bleu(
        hyps,
        [["a small red circle", "a large blue square"], ["a red circle on a dark background", None]],
    ).score
    assert bleu(hyps, refs) == pytest.approx(expected, abs=1e-9)
    assert 0 < bleu(hyps, refs) < 100


def test_rouge_l_hand_checked_lcs_best_reference_and_mean():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": 5 of 6 words each side
    assert rouge_l(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(5 / 6)
    # best of two references per sample (the exact one), then the mean over samples
    hyps = ["the cat sat on the mat", "A Red Circle!"]
    refs = [["a dog", "the cat is on the mat"], ["blue square", "a red circle"]]
    assert rouge_l(hyps, refs) == pytest.approx((5 / 6 + 1.0) / 2)
    # LCS 2 ("red circle") of hyp length 3 and ref length 4: P = 2/3, R = 1/2, F = 2PR / (P + R) = 4/7
    assert rouge_l(["red big circle"], [["a red small circle"]]) == pytest.approx(4 / 7)


def test_cider_equals_pycocoevalcap_on_a_tiny_corpus():
    from pycocoevalcap.cider.cider import Cider

    hyps = ["a small red circle", "a large blue square on the right", "a green triangle"]
    refs = [
        ["a small red circle", "there is a small red circle"],
        ["a large blue square", "a blue square on the right"],
        ["a small green triangle on the left", "a green triangle"],
    ]
    expected, _ = Cider().compute_score(
        {i: r for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)}
    )
    assert cider(hyps, refs) == pytest.approx(expected, abs=1e-12)
    assert 0 < cider(hyps, refs) < 10
    # case and punctuation are normalised away before scoring
    shouty = [h.upper() + "." for h in hyps]
    assert cider(shouty, refs) == pytest.approx(expected, abs=1e-12)


def test_cider_hand_checked_values():
    # two images, hyp == ref, no n-gram shared between images: idf = log 2 everywhere, cosine 1 for n = 1..4,
    # no length penalty -> 10 * mean(1, 1, 1, 1) = 10
    caps = ["one small red circle", "the large blue square"]
    assert cider(caps, [[c] for c in caps]) == pytest.approx(10.0)
    # a single-sample corpus: every n-gram occurs in all (one) reference sets, idf = log(1/1) = 0
    assert cider(["a red circle"], [["a red circle"]]) == 0.0


def test_caption_metrics_bundles_the_three():
    hyps, refs = ["a small red circle", "the large blue square"], [["a small red circle"], ["a blue square"]]
    got = caption_metrics(hyps, refs)
    assert set(got) == {"bleu", "rouge_l", "cider"}
    assert got == {"bleu": bleu(hyps, refs), "rouge_l": rouge_l(hyps, refs), "cider": cider(hyps, refs)}


def test_tokenize_caption():
    assert tokenize_caption("A Red circle,  LEFT of a blue-square. ") == "a red circle left of a blue square"
    assert tokenize_caption("!!!") == ""


@pytest.mark.parametrize(
    ("hyps", "refs", "message"),
    [
        (["a", "b"], [["a"]], "2 hypotheses but 1 reference lists"),
        ([], [], "empty corpus"),
        (["a"], [[]], r"refs\[0\] is empty"),
        (["a"], ["a red circle"], r"refs\[0\] is str; expected a list"),
        (["a"], [["  ", ""]], r"refs\[0\] holds only blank strings"),
        ([3], [["a"]], r"hyps\[0\] is int"),
        ("a red circle", [["a"]], "hyps must be a list of strings"),
    ],
)
@pytest.mark.parametrize("metric", [bleu, rouge_l, cider, caption_metrics])
def test_caption_metrics_reject_bad_corpora(metric, hyps, refs, message):
    with pytest.raises(DataError, match=message):
        metric(hyps, refs)


def test_save_image_grid_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    caps = ["a small red circle", "a large blue square to the right of a green cross", "", "x", "y"]
    out = save_image_grid(images, caps, tmp_path / "grid" / "samples.png", ncols=3, title="samples")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > im.height > 0
    # float (N, 3, H, W) in [0, 1] is accepted too; [-1, 1] is refused
    floats = images.transpose(0, 3, 1, 2).astype(np.float32) / 255
    assert save_image_grid(floats, caps, tmp_path / "f.png").is_file()
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        save_image_grid(floats * 2 - 1, caps, tmp_path / "bad.png")
    with pytest.raises(DataError, match="5 images but 2 captions"):
        save_image_grid(images, caps[:2], tmp_path / "bad.png")
