"""Unified vocabulary, task sequences and temperature task mixing (issue 6 parts 2 and 8)."""

import numpy as np
import pytest
import torch

from mmfusion.errors import ConfigError, DataError
from mmfusion.modalities.text import TextTokenizer
from mmfusion.unified.sequences import (
    IMAGE,
    SPECIAL_TOKENS,
    TEXT,
    MixedBatches,
    SequenceBuilder,
    TaskMixture,
    UnifiedVocab,
    collate,
    draw_sequence,
    mixture_probabilities,
)

TEXTS = [
    "a small red circle",
    "a large blue square",
    "how many objects are there?",
    "what colour is it?",
    "one",
]


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.train(TEXTS * 4, vocab_size=120, context_length=32)


@pytest.fixture(scope="module")
def builder(tok):
    return SequenceBuilder(UnifiedVocab(tok.vocab_size, n_image=16, tokens_per_image=4), tok)


def test_vocab_layout_and_single_special_ids():
    v = UnifiedVocab(n_text=10, n_image=5, tokens_per_image=4)
    assert v.size == 10 + 5 + len(SPECIAL_TOKENS) == 24
    assert v.image_range == (10, 15)
    ids = [v[t] for t in SPECIAL_TOKENS]
    assert ids == list(range(15, 24))  # one id each, after the codes
    assert v["<boi>"] == 18 and v.pad == 15
    with pytest.raises(ConfigError, match="unknown special token '<img>'"):
        v["<img>"]
    with pytest.raises(ConfigError, match="n_image must be >= 1"):
        UnifiedVocab(10, 0, 4)


def test_text_never_produces_special_or_code_ids(builder, tok):
    ids = builder.text_ids("<boi> <caption> <eos> a red circle")
    assert max(ids) < tok.vocab_size == builder.vocab.n_text


def test_codes_round_trip_and_range_check():
    v = UnifiedVocab(n_text=10, n_image=5, tokens_per_image=4)
    codes = torch.tensor([[0, 4], [2, 3]])
    ids = v.image_ids(codes)
    assert ids.tolist() == [[10, 14], [12, 13]]
    assert torch.equal(v.codes_from_ids(ids), codes)
    assert v.modality_of(torch.tensor([9, 10, 14, 15])).tolist() == [TEXT, IMAGE, IMAGE, TEXT]
    with pytest.raises(DataError, match=r"image codes must lie in \[0, 5\); got \[0, 5\]"):
        v.image_ids(torch.tensor([0, 5]))
    with pytest.raises(DataError, match=r"expected ids in \[10, 15\)"):
        v.codes_from_ids(torch.tensor([9]))


def test_task_sequences_layout_modality_and_loss_mask(builder, tok):
    v = builder.vocab
    codes = torch.tensor([[1, 2], [3, 4]])  # a 2x2 "image"
    img = [v.image_offset + c for c in (1, 2, 3, 4)]
    cap = builder.text_ids("a red circle")

    s = builder.caption(codes, "a red circle")
    assert s.ids.tolist() == [v["<bos>"], v["<caption>"], v["<boi>"], *img, v["<eoi>"], *cap, v["<eos>"]]
    assert s.modality.tolist() == [TEXT] * 3 + [IMAGE] * 4 + [TEXT] * (2 + len(cap))
    assert s.loss_mask.tolist() == [False] * 8 + [True] * (len(cap) + 1)
    assert s.target_start == 8 and s.prompt()[0].tolist() == s.ids[:8].tolist()
    assert torch.equal(builder.caption(codes).ids, s.ids[:8])  # prompt only

    s = builder.image("a red circle", codes)
    assert s.ids.tolist() == [v["<bos>"], v["<gen_image>"], *cap, v["<boi>"], *img, v["<eoi>"], v["<eos>"]]
    assert s.loss_mask.tolist() == [False] * (3 + len(cap)) + [True] * 6
    assert s.modality[s.loss_mask].tolist() == [IMAGE] * 4 + [TEXT] * 2

    q, a = builder.text_ids("how many objects are there?"), builder.text_ids("one")
    s = builder.vqa(codes, "how many objects are there?", "one")
    head = [v["<bos>"], v["<vqa>"], v["<boi>"], *img, v["<eoi>"], *q, v["<answer>"]]
    assert s.ids.tolist() == [*head, *a, v["<eos>"]]
    assert s.loss_mask.tolist() == [False] * len(head) + [True] * (len(a) + 1)
    assert tok.decode(s.ids[s.loss_mask][:-1].tolist()) == "one"


def test_wrong_code_count_and_empty_text_are_errors(builder):
    with pytest.raises(DataError, match="an image has 3 codes; the vocab expects 4"):
        builder.caption(torch.tensor([1, 2, 3]), "a red circle")
    with pytest.raises(DataError, match="expected a non-empty text"):
        builder.image("  ", torch.tensor([1, 2, 3, 4]))


def test_collate_pads_right_without_training_padding(builder):
    a = builder.caption(torch.tensor([1, 2, 3, 4]), "a red circle")
    b = builder.caption(torch.tensor([1, 2, 3, 4]), "a large blue square")
    ids, mod, mask = collate([a, b], builder.vocab.pad)
    t = max(len(a.ids), len(b.ids))
    assert ids.shape == mod.shape == mask.shape == (2, t)
    short = 0 if len(a.ids) < t else 1
    n = len((a, b)[short].ids)
    assert (ids[short, n:] == builder.vocab.pad).all() and not mask[short, n:].any()
    assert (mod[short, n:] == TEXT).all()


def test_vocab_save_load_and_drawing(tmp_path, builder, tok):
    builder.vocab.save(tmp_path / "vocab.json")
    assert UnifiedVocab.load(tmp_path / "vocab.json") == builder.vocab
    with pytest.raises(DataError, match="needs its vocab.json"):
        UnifiedVocab.load(tmp_path / "missing.json")
    s = builder.caption(torch.arange(4), "a red circle")
    drawing = draw_sequence(s, builder.vocab, tok, max_codes=2).splitlines()
    assert drawing[0].split()[1:8] == ["<bos>", "<caption>", "<boi>", "img:0", "img:1", "...", "<eoi>"]
    assert drawing[1].split()[1:] == list("TTTIIIT") + ["T"] * (len(s.ids) - 8)
    assert drawing[2].count("^") == int(s.loss_mask.sum())


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_mixture_probabilities_equal_the_formula(temperature):
    sizes = {"caption": 1000, "image": 100, "vqa": 10}
    n = np.array(list(sizes.values()), dtype=float)
    expected = (n / n.sum()) ** (1 / temperature)
    expected /= expected.sum()
    p = mixture_probabilities(sizes, temperature)
    assert np.allclose(list(p.values()), expected, atol=1e-12)
    if temperature == 1.0:
        assert p["caption"] == pytest.approx(1000 / 1110)


def test_mixture_empirical_ratios_within_two_percent():
    sizes = {"caption": 1000, "image": 100, "vqa": 10}
    mix = TaskMixture(sizes, temperature=2.0, seed=0)
    draws = mix.draw(10_000)
    for task, p in mix.probabilities.items():
        assert abs(draws.count(task) / 10_000 - p) <= 0.02
    assert TaskMixture(sizes, 2.0, seed=0).draw(50) == draws[:50]  # seeded
    with pytest.raises(ConfigError, match="temperature must be > 0; got 0"):
        TaskMixture(sizes, 0.0)


def test_mixed_batches_follow_the_mixture(builder):
    codes = torch.arange(4)
    ex = {
        "caption": [builder.caption(codes, "a red circle")],
        "vqa": [builder.vqa(codes, "what colour is it?", "one")],
    }
    ids, mod, mask = next(iter(MixedBatches(ex, batch_size=64, pad_id=builder.vocab.pad, seed=3)))
    vqa_rows = (ids[:, 1] == builder.vocab["<vqa>"]).sum().item()
    assert ids.shape[0] == 64 and 16 <= vqa_rows <= 48  # p = 1/2 each
    with pytest.raises(DataError, match="tasks without examples"):
        MixedBatches({"caption": []}, 4, 0)
