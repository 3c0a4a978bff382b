"""Client partitions (mmfusion.federated.partition): disjoint, complete, skewed as asked, and what edges see."""

import numpy as np
import pytest

from mmfusion.errors import ConfigError
from mmfusion.federated.partition import ClientDataset, dropped_fields, label_histogram, partition
from mmfusion.train.federated_config import FederatedConfig, PartitionConfig


def _check_cover(parts, n):
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(n))  # disjoint and complete
    assert all((np.diff(p) > 0).all() for p in parts)  # sorted


def test_iid_cuts_a_seeded_shuffle_into_equal_parts():
    parts = partition(None, 10, 3, PartitionConfig(by="iid", min_samples=1), seed=0)
    assert [len(p) for p in parts] == [4, 3, 3]
    _check_cover(parts, 10)
    again = partition(None, 10, 3, PartitionConfig(by="iid", min_samples=1), seed=0)
    assert all((a == b).all() for a, b in zip(parts, again))
    other = partition(None, 10, 3, PartitionConfig(by="iid", min_samples=1), seed=1)
    assert any((a != b).any() for a, b in zip(parts, other) if len(a) == len(b))


def test_label_skew_follows_alpha():
    labels = [i % 4 for i in range(800)]  # 4 classes x 200
    skewed = partition(labels, 800, 4, PartitionConfig(by="label", alpha=0.05), seed=0)
    even = partition(labels, 800, 4, PartitionConfig(by="label", alpha=1000.0), seed=0)
    _check_cover(skewed, 800)
    _check_cover(even, 800)

    def top_share(parts):  # mean over clients of the share of its most common class
        hist = label_histogram(labels, parts)
        return float(np.mean([max(h.values()) / sum(h.values()) for h in hist]))

    assert top_share(skewed) > 0.8  # each client is dominated by one class
    assert top_share(even) < 0.3  # ~0.25: every client sees every class about equally
    for h in label_histogram(labels, even):
        assert set(h) == {"0", "1", "2", "3"}


def test_size_skew_and_minimum_per_client():
    parts = partition(None, 1000, 5, PartitionConfig(by="size", alpha=0.3, min_samples=20), seed=3)
    _check_cover(parts, 1000)
    sizes = sorted(len(p) for p in parts)
    assert sizes[0] >= 20
    assert sizes[-1] > 3 * sizes[0]
    even = partition(None, 1000, 5, PartitionConfig(by="size", alpha=1e4, min_samples=20), seed=3)
    assert max(len(p) for p in even) - min(len(p) for p in even) < 30


def test_impossible_requests_are_config_errors():
    with pytest.raises(
        ConfigError, match="12 training samples cannot give 4 clients at least .*min_samples = 8"
    ):
        partition(None, 12, 4, PartitionConfig(), seed=0)
    labels = [0] * 100
    with pytest.raises(ConfigError, match=r"Dirichlet\(alpha=0.001\).*raise alpha or lower min_samples"):
        partition(labels, 100, 4, PartitionConfig(by="label", alpha=0.001, min_samples=20), seed=0)


def test_edges_see_only_their_modalities():
    inputs = {"audio": "audio", "image": "image", "text": "text"}
    fields = {"text": "question"}
    assert dropped_fields(inputs, fields, None) == set()
    assert dropped_fields(inputs, fields, ["audio"]) == {"image", "question"}
    assert dropped_fields(inputs, fields, ["image", "text"]) == {"audio"}
    with pytest.raises(ConfigError, match=r"federated.modalities names \['video'\]: the model's inputs are"):
        dropped_fields(inputs, fields, ["video"])
    base = [{"id": "a", "image": 1, "audio": 2, "label": 0}, {"id": "b", "image": 3, "audio": 4, "label": 1}]
    ds = ClientDataset(base, [1], drop={"image"})
    assert len(ds) == 1 and ds[0] == {"id": "b", "audio": 4, "label": 1}
    assert base[1]["image"] == 3  # the shared sample is not modified


def test_config_section_checks():
    f = FederatedConfig(clients=3, modalities=[["audio"], ["audio", "image"]])
    assert [f.client_modalities(i) for i in range(3)] == [["audio"], ["audio", "image"], ["audio"]]
    with pytest.raises(ValueError, match=r"federated.modalities\[1\] is empty"):
        FederatedConfig(modalities=[["audio"], []])
    with pytest.raises(ValueError, match="expected host:port"):
        FederatedConfig(address="localhost")
