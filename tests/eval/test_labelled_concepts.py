"""Concept filters on a user's labelled JSONL: reading, the stratified split, vectors and thresholds by hand,
and the errors (mmfusion.eval.labelled_concepts)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion.errors import DataError
from mmfusion.eval.labelled_concepts import calibrate_labelled, labelled_report, read_labelled, split_rows

# text -> 2-d embedding: three rows show "weapon", three do not
EMB = {
    "p1": (1.0, 0.0),
    "p2": (0.0, 1.0),
    "p3": (0.6, 0.8),
    "n1": (-1.0, 0.0),
    "n2": (0.0, -1.0),
    "n3": (-0.6, -0.8),
}


class StubModel:
    """encode_text by table; encode_image: the image's mean red and green, L2-normalised."""

    def encode_text(self, texts):
        return torch.tensor([EMB[t] for t in texts], dtype=torch.float32)

    def encode_image(self, images):
        rg = torch.from_numpy(
            np.stack([np.asarray(im, dtype=np.float32)[..., :2].mean(axis=(0, 1)) for im in images])
        )
        return rg / rg.norm(dim=1, keepdim=True)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_vector_thresholds_and_report_by_hand(tmp_path):
    rows = [{"text": t, "concepts": ["weapon"] if t[0] == "p" else []} for t in EMB]
    data = read_labelled(_write(tmp_path / "d.jsonl", rows))
    assert data.concepts == ["weapon"] and data.labels[:, 0].tolist() == [True] * 3 + [False] * 3
    f = calibrate_labelled(StubModel(), data, {"normal": 0.5, "strict": 0.9})
    # mean(positives) - mean(negatives) = (1.6/3, 1.8/3) * 2, normalised: (0.8, 0.9) / sqrt(1.45)
    v = np.array([0.8, 0.9]) / math.sqrt(1.45)
    np.testing.assert_allclose(f.concepts[0].vector, v, rtol=1e-6)
    # positives score 0.8/s = 0.664, 0.9/s = 0.747, 1.2/s = 0.997: recall 0.5 -> the 2nd largest (ceil 1.5),
    # 0.9 -> the 3rd (ceil 2.7); no image column, no image thresholds
    th = f.concepts[0].thresholds
    assert set(th) == {"text"}
    assert th["text"]["normal"] == pytest.approx(0.9 / math.sqrt(1.45), rel=1e-6)
    assert th["text"]["strict"] == pytest.approx(0.8 / math.sqrt(1.45), rel=1e-6)
    rep = labelled_report(StubModel(), f, data)
    assert rep["text"]["weapon"]["normal"] == {
        "precision": 1.0, "recall": 2 / 3, "blocked": 2, "positives": 3, "n": 6,
    }  # fmt: skip
    assert rep["text"]["weapon"]["strict"]["recall"] == 1.0 and rep["text"]["weapon"]["auroc"] == 1.0


def test_images_relative_to_the_manifest_and_both_modalities(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for i, (r, g) in enumerate([(200, 10), (180, 40), (10, 200), (40, 180)]):
        Image.fromarray(np.full((4, 4, 3), (r, g, 0), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        t = ("p1", "p3", "n1", "n2")[i]
        rows.append({"image": f"img/{i}.png", "text": t, "concepts": ["red"] if r > g else []})
    rows.append({"image": "img/0.png", "concepts": "red"})  # a single name is a one-concept list; image only
    data = read_labelled(_write(tmp_path / "d.jsonl", rows))
    assert data.has["image"].sum() == 5 and data.has["text"].sum() == 4
    f = calibrate_labelled(StubModel(), data, {"normal": 1.0, "strict": 1.0})
    assert set(f.concepts[0].thresholds) == {"image", "text"}
    rep = labelled_report(StubModel(), f, data)
    assert rep["image"]["red"]["normal"]["recall"] == 1.0 and rep["image"]["red"]["normal"]["n"] == 5
    assert rep["text"]["red"]["normal"]["n"] == 4


def test_split_is_stratified_seeded_and_keeps_rare_label_sets_for_calibration():
    labels = np.array([[1, 0]] * 8 + [[0, 1]] * 4 + [[0, 0]] * 3 + [[1, 1]] * 1, dtype=bool)
    cal, ev = split_rows(labels, 0.25, seed=0)
    assert len(ev) == 2 + 1 + 0 + 0  # floor(0.25 x 8, 4, 3, 1)
    assert sorted(np.concatenate([cal, ev]).tolist()) == list(range(16))
    assert labels[ev].sum(0).tolist() == [2, 1]
    assert (split_rows(labels, 0.25, 0)[1] == ev).all()  # deterministic
    assert any((split_rows(labels, 0.25, s)[1] != ev).any() for s in range(1, 5))  # seeded


def test_errors_name_the_file_line_and_field(tmp_path):
    p = _write(tmp_path / "d.jsonl", [{"text": "p1", "concepts": ["weapon"]}, {"text": "n1"}])
    with pytest.raises(DataError, match=r"d.jsonl line 2: no field 'concepts'"):
        read_labelled(p)
    p = _write(tmp_path / "d.jsonl", [{"text": "p1", "labels": ["weapon", "drug"]}])
    with pytest.raises(
        DataError, match=r"line 1: field 'labels': unknown concept 'drug'; the concepts calibrated are"
    ):
        read_labelled(p, "labels", ["weapon"])
    p = _write(tmp_path / "d.jsonl", [{"text": "p1", "concepts": [1]}])
    with pytest.raises(DataError, match="line 1: field 'concepts': expected a list of concept names"):
        read_labelled(p)
    p = _write(tmp_path / "d.jsonl", [{"concepts": []}])
    with pytest.raises(DataError, match="line 1: a row needs 'text' and / or 'image'"):
        read_labelled(p)
    p = _write(
        tmp_path / "d.jsonl",
        [{"image": "gone.png", "concepts": ["x"]}, {"image": "gone.png", "concepts": []}],
    )
    with pytest.raises(DataError, match="line 1: field 'image': file gone.png not found"):
        calibrate_labelled(StubModel(), read_labelled(p), {"normal": 0.9, "strict": 0.99})
    # every row shows the concept: no negative to calibrate against
    p = _write(tmp_path / "d.jsonl", [{"text": t, "concepts": ["weapon"]} for t in ("p1", "p2")])
    with pytest.raises(
        DataError, match="concept 'weapon' has no negative row with 'text' in the calibration"
    ):
        calibrate_labelled(StubModel(), read_labelled(p), {"normal": 0.9, "strict": 0.99})
    # a concept named by --concepts that no row shows
    p = _write(tmp_path / "d.jsonl", [{"text": "p1", "concepts": []}, {"text": "n1", "concepts": []}])
    with pytest.raises(DataError, match="concept 'drug' has no positive row"):
        calibrate_labelled(StubModel(), read_labelled(p, concepts=["drug"]), {"normal": 0.9, "strict": 0.99})
    with pytest.raises(DataError, match="no row names a concept"):
        read_labelled(p)
