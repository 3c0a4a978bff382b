"""PGD and the text attacks (mmfusion.safety.attacks)."""

import torch

from mmfusion.safety.attacks import (
    SYNONYMS,
    char_attack,
    levenshtein,
    pgd_images,
    retrieval_loss,
    synonym_attack,
)


def test_pgd_raises_the_loss_and_stays_in_the_eps_ball(make_tiny_model):
    model = make_tiny_model()
    captions = ["a small red circle", "a large blue square", "a small green triangle", "a large white cross"]
    cands = model.encode_text(captions)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4)
    loss = retrieval_loss(lambda z: model.embed_image_tensor(z * 2 - 1), cands, labels, 10.0)
    eps = 8 / 255
    adv = pgd_images(x, loss, eps, steps=5, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        before, after = loss(x), loss(adv)
    assert (after > before).all(), (before, after)
    # eps 0 leaves the images as they are
    assert torch.equal(pgd_images(x, loss, 0.0, steps=3), x)


def test_levenshtein():
    assert levenshtein("circle", "circle") == 0
    assert levenshtein("circle", "cirle") == 1
    assert levenshtein("circle", "circel") == 2
    assert levenshtein("", "abc") == 3


def _target_scorer(target: str):
    """Attacker's score: distance to `target` (lower = closer); success when the text equals it."""
    score = lambda ts: torch.tensor([float(levenshtein(t, target)) for t in ts])  # noqa: E731
    success = lambda ts: torch.tensor([t == target for t in ts])  # noqa: E731
    return score, success


def test_char_attack_makes_at_most_k_edits_and_stops_at_success():
    score, success = _target_scorer("a red cirxle")
    r = char_attack("a red circle", score, success, k=2, max_candidates=None)
    assert r.success and r.edits == 1 and r.text == "a red cirxle"
    far = "a blue square"
    score, success = _target_scorer(far)
    r = char_attack("a red circle", score, success, k=3, max_candidates=None)
    assert not r.success and r.edits == 3 and levenshtein(r.text, "a red circle") <= 3
    # sampled candidates: still at most k edits, and seeded
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    r1 = char_attack("a red circle", score, success, k=2, max_candidates=20, generator=g())
    r2 = char_attack("a red circle", score, success, k=2, max_candidates=20, generator=g())
    assert r1 == r2 and levenshtein(r1.text, "a red circle") <= 2


def test_synonym_attack_substitutes_at_most_k_table_words():
    score, success = _target_scorer("a little crimson circle")
    r = synonym_attack("a small red circle", score, success, k=2)
    assert r.success and r.edits == 2 and r.text == "a little crimson circle"
    score, success = _target_scorer("nothing")
    r = synonym_attack("a small red circle", score, success, k=5)
    words = r.text.split()
    assert not r.success and r.edits == 3  # three substitutable words, then no candidate is left
    assert words[0] == "a" and words[1] in SYNONYMS["small"] and words[2] in SYNONYMS["red"]
    assert words[3] in SYNONYMS["circle"]
    # a text already adversarial costs no edit
    assert synonym_attack("x", score, lambda ts: torch.tensor([True]), k=2).edits == 0
