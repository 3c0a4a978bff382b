"""`mmfusion serve --scd / --filter`: the opt-in checks of /v1/search and /v1/classify (mmfusion.serve.safety)."""

import argparse
import base64
import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from mmfusion.errors import ConfigError  # noqa: E402
from mmfusion.safety.filters import Concept, ConceptFilters  # noqa: E402
from mmfusion.safety.scd import SCDCalibration, mutate_image_bytes, mutations_of, top1  # noqa: E402
from mmfusion.serve.app import create_app  # noqa: E402
from mmfusion.serve.commands import _safety  # noqa: E402
from mmfusion.serve.engine import Engine  # noqa: E402
from mmfusion.serve.index import EmbeddingIndex, build_index  # noqa: E402
from mmfusion.serve.safety import ServeSafety, classify_mutation_scores, classify_mutations  # noqa: E402

CAPTIONS = ["a small red circle", "a large blue square", "a small green triangle", "a large white cross"]


@pytest.fixture(scope="module")
def model_index(make_tiny_model, tmp_path_factory):
    model = make_tiny_model()
    root = tmp_path_factory.mktemp("index")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    files = []
    for i, cap in enumerate(CAPTIONS):
        p = root / "images" / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(p)
        files.append((f"img{i}", p, cap))
    build_index(Engine(model), files, root)
    return model, EmbeddingIndex.load(root)


def _distances(model, index):
    return (1 - top1(model.encode_text(CAPTIONS), index.embeddings)[1]).tolist()


def test_scd_flag_is_added_and_results_are_kept(model_index):
    model, index = model_index
    d = _distances(model, index)
    order = np.argsort(d)
    t = (d[order[1]] + d[order[2]]) / 2  # two queries under the threshold, two above
    cal = SCDCalibration("distance", t, 0.05, 100)
    with TestClient(create_app(model, index=index, safety=ServeSafety(cal))) as c:
        for i, caption in enumerate(CAPTIONS):
            body = c.post("/v1/search", json={"text": caption, "k": 2}).json()
            scd = body["scd"]
            assert scd["score"] == pytest.approx(1 - body["results"][0]["score"], abs=1e-5)
            assert scd["score"] == pytest.approx(d[i], abs=1e-5)
            assert scd["flagged"] == (d[i] > t) and scd["threshold"] == t and scd["kind"] == "distance"
            assert len(body["results"]) == 2  # a flag, not a drop
        assert c.get("/healthz").json()["safety"]["scd"]["threshold"] == t
    with TestClient(create_app(model, index=index)) as c:  # opt-in: no field without --scd
        assert "scd" not in c.post("/v1/search", json={"text": CAPTIONS[0]}).json()


def test_mutation_score_matches_its_definition(model_index):
    model, index = model_index
    cal = SCDCalibration("mutation", 0.5, 0.05, 100, mutations=4, seed=3)
    with TestClient(create_app(model, index=index, safety=ServeSafety(cal))) as c:
        score = c.post("/v1/search", json={"text": CAPTIONS[2]}).json()["scd"]["score"]
    clean = top1(model.encode_text([CAPTIONS[2]]), index.embeddings)[0]
    muts = top1(model.encode_text(mutations_of(CAPTIONS[2], 4, 3)), index.embeddings)[0]
    assert score == pytest.approx((muts != clean).float().mean().item())


def test_filter_blocks_query_or_results_and_level_follows_scd(model_index):
    model, index = model_index
    vec = model.encode_text([CAPTIONS[1]])[0]
    img_scores = (index.embeddings @ vec).tolist()
    t_img = sorted(img_scores)[-2] - 1e-4  # the two images closest to the concept
    concept = Concept(
        "c",
        [CAPTIONS[1]],
        vec.tolist(),
        {"text": {"normal": 0.9999, "strict": 0.9999}, "image": {"normal": t_img, "strict": -1.0}},
    )
    never = SCDCalibration("distance", 5.0, 0.05, 100)  # never flags: normal level
    with TestClient(
        create_app(model, index=index, safety=ServeSafety(never, ConceptFilters([concept])))
    ) as c:
        body = c.post("/v1/search", json={"text": CAPTIONS[1], "k": 4}).json()
        assert body["results"] == [] and body["filter"] == {
            "level": "normal",
            "query_blocked": ["c"],
            "results_blocked": 4,
        }
        body = c.post("/v1/search", json={"text": CAPTIONS[0], "k": 4}).json()
        assert body["filter"]["results_blocked"] == 2 and len(body["results"]) == 2
        kept = {r["index"] for r in body["results"]}
        assert all(img_scores[i] < t_img for i in kept)
    always = SCDCalibration("distance", -5.0, 0.05, 100)  # flags every query: strict level blocks every image
    with TestClient(
        create_app(model, index=index, safety=ServeSafety(always, ConceptFilters([concept])))
    ) as c:
        body = c.post("/v1/search", json={"text": CAPTIONS[0], "k": 4}).json()
        assert body["scd"]["flagged"] and body["filter"]["level"] == "strict" and body["results"] == []


def test_serve_flags_need_an_index_and_matching_filters(model_index, tmp_path):
    _, index = model_index
    info = {"model_type": "contrastive", "model_id": index.model_id}
    args = argparse.Namespace(scd=None, concept_filter=None)
    assert _safety(args, None, info) is None
    cal = SCDCalibration("distance", 0.5, 0.05, 10).save(tmp_path / "scd.json")
    with pytest.raises(ConfigError, match="--index"):
        _safety(argparse.Namespace(scd=str(cal), concept_filter=None), None, info)
    bad = ConceptFilters([Concept("c", ["x"], [1.0, 0.0])]).save(tmp_path / "f.json")
    with pytest.raises(ConfigError, match="calibrated with another model"):
        _safety(argparse.Namespace(scd=None, concept_filter=str(bad)), index, info)
    assert isinstance(
        _safety(argparse.Namespace(scd=str(cal), concept_filter=None), index, info).scd, SCDCalibration
    )
    other = SCDCalibration("distance", 0.5, 0.05, 10, model_id="0123456789abcdef").save(tmp_path / "o.json")
    with pytest.raises(ConfigError, match="calibrated with model 0123456789abcdef"):
        _safety(argparse.Namespace(scd=str(other), concept_filter=None), index, info)
    # a classify calibration needs no index, but a fusion model, and the model it was calibrated with
    cls = SCDCalibration("mutation", 0.5, 0.05, 10, model_id="abc", task="classify").save(tmp_path / "c.json")
    with pytest.raises(ConfigError, match="checks /v1/classify.*this server's model is contrastive"):
        _safety(argparse.Namespace(scd=str(cls), concept_filter=None), None, info)
    with pytest.raises(ConfigError, match="calibrated with model abc; this model is def"):
        _safety(
            argparse.Namespace(scd=str(cls), concept_filter=None),
            None,
            {"model_type": "multimodal", "model_id": "def"},
        )
    made = _safety(
        argparse.Namespace(scd=str(cls), concept_filter=None),
        None,
        {"model_type": "multimodal", "model_id": "abc"},
    )
    assert made.classify_scd is not None and made.search_scd is None
    with pytest.raises(ValueError, match="task 'classify' takes the mutation score"):
        SCDCalibration("distance", 0.5, 0.05, 10, task="classify")


# ---- /v1/classify of a fusion classifier (task classify) ------------------------------------------------------


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


def test_image_mutations_are_seeded_small_and_decodable():
    raw = _png(0)
    a, b = mutate_image_bytes(raw, 3, seed=5), mutate_image_bytes(raw, 3, seed=5)
    assert a == b and len(a) == 3 and len(set(a)) == 3 and mutate_image_bytes(raw, 3, seed=6) != a
    clean = np.asarray(Image.open(io.BytesIO(raw)), dtype=np.float32)
    for m in a:
        im = np.asarray(Image.open(io.BytesIO(m)), dtype=np.float32)
        assert im.shape == clean.shape
        # noise of std 0.03 (7.65 / 255) after a shift of at most one pixel: compare with the best shift
        err = min(
            np.abs(np.roll(clean, (dy, dx), axis=(0, 1)) - im)[1:-1, 1:-1].mean()
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        )
        assert 3 < err < 10


def test_classify_mutation_scores_by_hand():
    clean = [{"label": 0}, {"label": 2}, {"label": 1}]
    mutated = [{"label": 0}, {"label": 1}, {"label": 1}, {"label": 1}]
    # sample 0: 1 of 2 changed; sample 1 has no image (no mutations); sample 2: 0 of 2 changed
    assert classify_mutation_scores(clean, mutated, [0, 0, 2, 2]) == [0.5, None, 0.0]
    samples = [{"image": _png(1), "text": "a"}, {"text": "b"}]
    muts, owners = classify_mutations(
        samples, SCDCalibration("mutation", 0.5, 0.05, 1, mutations=3, task="classify")
    )
    assert owners == [0, 0, 0] and all(m["text"] == "a" and m["image"] != samples[0]["image"] for m in muts)


def test_classify_answers_carry_the_scd_flag(multimodal):
    cal = SCDCalibration("mutation", 0.0, 0.05, 10, mutations=6, seed=2, task="classify", sigma=0.2)
    inputs = [{"image": _png(i), "text": "a small red circle"} for i in range(4)] + [{"text": "a cross"}]
    body = {
        "inputs": [
            {k: base64.b64encode(v).decode() if k == "image" else v for k, v in s.items()} for s in inputs
        ]
    }
    with TestClient(create_app(multimodal)) as c:
        plain = c.post("/v1/classify", json=body).json()["predictions"]
    with TestClient(create_app(multimodal, safety=ServeSafety(cal))) as c:
        preds = c.post("/v1/classify", json=body).json()["predictions"]
        again = c.post("/v1/classify", json=body).json()["predictions"]
        assert c.get("/healthz").json()["safety"]["scd"]["task"] == "classify"
    assert preds == again  # seeded: the same input always gets the same score
    assert [p["label"] for p in preds] == [p["label"] for p in plain] and "scd" not in plain[0]
    engine = Engine(multimodal)
    for s, p in zip(inputs[:4], preds):
        labels = [
            engine.classify([{"image": engine.prepare("image", m, "m"), "text": s["text"]}])[0]["label"]
            for m in mutate_image_bytes(s["image"], 6, seed=2, sigma=0.2)
        ]
        expected = sum(lab != p["label"] for lab in labels) / 6
        assert p["scd"]["checked"] and p["scd"]["score"] == pytest.approx(expected, abs=1e-6)
        assert p["scd"]["flagged"] == (expected > 0.0)
    assert preds[4]["scd"] == {
        "checked": False,
        "score": None,
        "flagged": False,
        "kind": "mutation",
        "threshold": 0.0,
        "fpr": 0.05,
    }
    assert any(
        p["scd"]["score"] > 0 for p in preds[:4]
    )  # noise of std 0.2 flips some labels of a random model
