"""`mmfusion serve --scd / --filter`: the opt-in checks of /v1/search (mmfusion.serve.safety)."""

import argparse

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from mmfusion.errors import ConfigError  # noqa: E402
from mmfusion.safety.filters import Concept, ConceptFilters  # noqa: E402
from mmfusion.safety.scd import SCDCalibration, mutations_of, top1  # noqa: E402
from mmfusion.serve.app import create_app  # noqa: E402
from mmfusion.serve.commands import _safety  # noqa: E402
from mmfusion.serve.engine import Engine  # noqa: E402
from mmfusion.serve.index import EmbeddingIndex, build_index  # noqa: E402
from mmfusion.serve.safety import SearchSafety  # noqa: E402

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
    with TestClient(create_app(model, index=index, safety=SearchSafety(cal))) as c:
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
    with TestClient(create_app(model, index=index, safety=SearchSafety(cal))) as c:
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
        create_app(model, index=index, safety=SearchSafety(never, ConceptFilters([concept])))
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
        create_app(model, index=index, safety=SearchSafety(always, ConceptFilters([concept])))
    ) as c:
        body = c.post("/v1/search", json={"text": CAPTIONS[0], "k": 4}).json()
        assert body["scd"]["flagged"] and body["filter"]["level"] == "strict" and body["results"] == []


def test_serve_flags_need_an_index_and_matching_filters(model_index, tmp_path):
    _, index = model_index
    args = argparse.Namespace(scd=None, concept_filter=None)
    assert _safety(args, None) is None
    cal = SCDCalibration("distance", 0.5, 0.05, 10).save(tmp_path / "scd.json")
    with pytest.raises(ConfigError, match="--index"):
        _safety(argparse.Namespace(scd=str(cal), concept_filter=None), None)
    bad = ConceptFilters([Concept("c", ["x"], [1.0, 0.0])]).save(tmp_path / "f.json")
    with pytest.raises(ConfigError, match="calibrated with another model"):
        _safety(argparse.Namespace(scd=None, concept_filter=str(bad)), index)
    assert isinstance(
        _safety(argparse.Namespace(scd=str(cal), concept_filter=None), index).scd, SCDCalibration
    )
    other = SCDCalibration("distance", 0.5, 0.05, 10, model_id="0123456789abcdef").save(tmp_path / "o.json")
    with pytest.raises(ConfigError, match="calibrated with model 0123456789abcdef"):
        _safety(argparse.Namespace(scd=str(other), concept_filter=None), index)
