"""`mmfusion data build --filter`: concept filters reject blocked samples as `filtered` and count them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from mmfusion import load_model
from mmfusion.data.engine.build_config import BuildConfig
from mmfusion.data.engine.pipeline import build
from mmfusion.errors import ConfigError
from mmfusion.safety.filters import Concept, ConceptFilters


def test_build_filter_rejects_counts_and_explains(make_tiny_model, tmp_path):
    model = make_tiny_model()
    folder = model.save_pretrained(tmp_path / "model")
    src = tmp_path / "pairs"
    src.mkdir()
    captions = ["a small red circle", "a large blue square", "a small green triangle", "a large white cross"]
    rng = np.random.default_rng(0)
    images = [
        np.asarray(Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((64, 64)))
        for _ in captions
    ]
    for i, (img, cap) in enumerate(zip(images, captions)):
        Image.fromarray(img).save(src / f"p{i}.png")
        (src / f"p{i}.txt").write_text(cap)
    # one concept: the caption of p1; text threshold blocks p1's caption only, image threshold the top image
    vec = model.encode_text([captions[1]])[0].numpy()
    txt_scores = model.encode_text(captions).numpy() @ vec
    processed = [
        np.asarray(ImageOps.fit(Image.fromarray(x), (64, 64), Image.Resampling.LANCZOS)) for x in images
    ]
    img_scores = model.encode_image(processed).numpy() @ vec
    t_text = float(txt_scores[1]) - 1e-4
    t_img = float(img_scores.max()) - 1e-4
    assert (txt_scores >= t_text).sum() == 1  # the other captions are further from it
    filters = ConceptFilters(
        [
            Concept(
                "blue_square",
                [captions[1]],
                vec.tolist(),
                {"text": {"normal": t_text, "strict": 0.0}, "image": {"normal": t_img, "strict": 0.0}},
            )
        ]
    )
    fpath = filters.save(tmp_path / "filters.json")
    cfg = BuildConfig(
        image_size=64, min_image_side=16, shard_size=3, model=str(folder), min_alignment=-1.0, dedup_cosine=1.0,
        concept_filter=str(fpath),
    )  # fmt: skip
    result = build(src, tmp_path / "out", cfg, workers=1, load_model=load_model)
    expected = {f"p{i}" for i in range(4) if txt_scores[i] >= t_text or img_scores[i] >= t_img}
    rejected = {
        r["id"]: r for r in map(json.loads, (tmp_path / "out" / "rejected.jsonl").read_text().splitlines())
    }
    assert set(rejected) == expected and "p1" in expected
    assert all(set(r["reasons"]) == {"filtered"} for r in rejected.values())
    assert any(d.startswith("text: blue_square ") for d in rejected["p1"]["details"])
    assert result.rejected["filtered"] == len(expected) and result.accepted == 4 - len(expected)
    with pytest.raises(ConfigError, match="--filter needs --model"):
        BuildConfig(concept_filter=str(fpath))
