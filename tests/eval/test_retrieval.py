"""Retrieval recall@K (mmfusion.eval.retrieval) against rankings worked out by hand."""

import pytest
import torch

from mmfusion.eval.retrieval import match_keys, recall_at_k, retrieval_metrics

# 4 queries x 4 gallery items; gallery keys a, b, c, a (two items of scene a). No ties inside the ranks that
# decide a hit. Rankings (best first) and the rank of the first item with the query's key:
#   q0 (a): 1 b, 2 c, 3 a, 0 a  -> rank 3
#   q1 (b): 1 b, ...            -> rank 1
#   q2 (c): 0 a, 2 c, ...       -> rank 2
#   q3 (z): no item of z        -> never
SIM = torch.tensor(
    [
        [0.1, 0.9, 0.5, 0.3],
        [0.2, 0.8, 0.1, 0.0],
        [0.7, 0.1, 0.65, 0.2],
        [0.4, 0.3, 0.2, 0.1],
    ]
)
QUERY_KEYS = ["a", "b", "c", "z"]
GALLERY_KEYS = ["a", "b", "c", "a"]


def test_recall_at_k_counts_the_first_matching_rank():
    got = recall_at_k(SIM, QUERY_KEYS, GALLERY_KEYS, [1, 2, 3, 4])
    assert got == {1: 0.25, 2: 0.5, 3: 0.75, 4: 0.75}


def test_recall_at_k_beyond_the_gallery_and_with_one_query():
    # K larger than the gallery: every item is retrieved, so only the query without a match misses
    assert recall_at_k(SIM, QUERY_KEYS, GALLERY_KEYS, [10]) == {10: 0.75}
    # any gallery item of the query's key counts: q0's second "a" (item 0, rank 4) is not needed at K = 3
    assert recall_at_k(SIM[:1], ["a"], GALLERY_KEYS, [2, 3]) == {2: 0.0, 3: 1.0}
    # a higher score is better: negating the scores reverses every ranking (q0 now finds "a" first)
    assert recall_at_k(-SIM, QUERY_KEYS, GALLERY_KEYS, [1]) == {1: 0.25}
    assert recall_at_k(-SIM[:1], ["a"], GALLERY_KEYS, [1]) == {1: 1.0}


def test_retrieval_metrics_ranks_images_per_text_and_texts_per_image():
    # images are the unit vectors, so sim[text t, image i] = TEXT[t, i]
    #   t2i: t0 -> i0 first (hit); t1 -> i0, i1 (rank 2); t2 -> i1, i2 (rank 2)
    #   i2t: i0 -> t0 (1.0 > 0.9); i1 -> t1 (0.5 > 0.2); i2 -> t2 (0.1 > 0 = 0) — all at rank 1
    text = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.5, 0.0], [0.0, 0.2, 0.1]])
    emb = {"text": text, "image": torch.eye(3), "keys": ["s0", "s1", "s2"]}
    got = retrieval_metrics(emb, [1, 2])
    assert got == pytest.approx(
        {"t2i_recall@1": 1 / 3, "t2i_recall@2": 1.0, "i2t_recall@1": 1.0, "i2t_recall@2": 1.0}
    )


def test_match_keys_fall_back_to_the_normalised_caption():
    assert match_keys(["scene-7", None, ""], ["x", "  A Red Circle ", "b"]) == [
        "scene-7",
        "a red circle",
        "b",
    ]
