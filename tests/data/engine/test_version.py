"""Versioning: `info` counts and `diff` between two hand-written build manifests."""

import json

import pytest

from mmfusion.data.engine.version import diff, format_diff, format_info, info
from mmfusion.errors import DataError


def _write(folder, samples, rejected=()):
    folder.mkdir()
    manifest = {
        "build_id": "ab" * 32,
        "source": "src",
        "counts": {
            "inputs": len(samples) + len(rejected),
            "accepted": len(samples),
            "rejected": len(rejected),
        },
        "shards": ["shard-000000.tar"],
        "samples": [{"id": i, "modalities": m, "hashes": {"content": h}} for i, m, h in samples],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "rejected.jsonl").write_text(
        "".join(json.dumps({"id": i, "reasons": r}) + "\n" for i, r in rejected)
    )
    return folder


@pytest.fixture
def two_builds(tmp_path):
    a = _write(
        tmp_path / "a",
        [("cat", ["image", "text"], "1"), ("dog", ["image", "text"], "2"), ("bird", ["audio", "text"], "3")],
        [("x", ["blank_image"]), ("y", ["blank_image", "empty_caption"])],
    )
    b = _write(
        tmp_path / "b",
        [("cat", ["image", "text"], "1"), ("dog", ["image", "text"], "9"), ("owl", ["text"], "4")],
    )
    return a, b


def test_info_counts_modalities_and_combinations(two_builds):
    data = info(two_builds[0])
    assert data["modalities"] == {"audio": 1, "image": 2, "text": 3}
    assert data["combinations"] == {"audio+text": 1, "image+text": 2}
    assert data["rejected"] == {"blank_image": 2, "empty_caption": 1}
    text = format_info(data)
    assert text.splitlines()[0] == "build id   " + "ab" * 32
    assert "3 accepted in 1 shards, 2 rejected, 5 inputs" in text


def test_diff_lists_added_removed_changed(two_builds):
    a, b = two_builds
    d = diff(a, b)
    assert d == {"added": ["owl"], "removed": ["bird"], "changed": ["dog"]}
    assert format_diff(d) == "+ owl\n- bird\n~ dog\n1 added, 1 removed, 1 changed"
    assert diff(a, a) == {"added": [], "removed": [], "changed": []}


def test_not_a_build_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"manifest.json not found: .* is not a built dataset"):
        info(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="not an mmfusion build manifest"):
        diff(tmp_path, tmp_path)
