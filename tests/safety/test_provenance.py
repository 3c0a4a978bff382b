"""Signed provenance manifests and the keyed watermark (mmfusion.safety.provenance, .watermark)."""

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from mmfusion.errors import ConfigError
from mmfusion.safety import watermark
from mmfusion.safety.provenance import (
    KEY_ENV,
    load_key,
    make_manifest,
    sign_manifest,
    verify_manifest,
    write_signed_manifest,
)

KEY = b"test-key"


def test_manifest_sign_verify_round_trip_and_tampering(tmp_path):
    data = b"\x89PNG fake image bytes"
    m = sign_manifest(make_manifest(data, "model-abc", 7, "a red circle"), KEY)
    assert m["sha256"] == hashlib.sha256(data).hexdigest() and m["model_id"] == "model-abc"
    assert m["bytes"] == len(data) and m["seed"] == 7 and m["signature"]["alg"] == "HMAC-SHA256"
    assert verify_manifest(m, KEY, data).ok
    # a changed byte of the file, a changed field, another key: each caught, and said which
    bad = verify_manifest(m, KEY, data[:-1] + b"!")
    assert not bad.ok and bad.problems == ["content mismatch: the file's SHA-256 is not the manifest's"]
    assert "signature mismatch" in verify_manifest({**m, "prompt": "a blue square"}, KEY, data).problems[0]
    assert "signature mismatch" in verify_manifest(m, b"other", data).problems[0]
    assert "no HMAC-SHA256 signature" in verify_manifest(make_manifest(data, "x", 0, ""), KEY).problems[0]
    # the written manifest verifies after a JSON round trip
    f = tmp_path / "gen.png"
    f.write_bytes(data)
    path, _ = write_signed_manifest(f, KEY, "model-abc", 7, "a red circle")
    assert path.name == "gen.png.provenance.json"
    assert verify_manifest(json.loads(path.read_text()), KEY, f.read_bytes()).ok


def test_key_from_file_or_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=KEY_ENV):
        load_key()
    monkeypatch.setenv(KEY_ENV, "env-secret")
    assert load_key() == b"env-secret"
    (tmp_path / "k").write_text("file-secret\n")
    assert load_key(tmp_path / "k") == b"file-secret"
    with pytest.raises(ConfigError, match="cannot read"):
        load_key(tmp_path / "missing")


def _image(seed: int, side: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((side, side, 3), 20, dtype=np.uint8)
    img[side // 4 : side // 2, side // 4 : 3 * side // 4] = (230, 30, 30)
    return np.clip(img + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)


def test_watermark_detected_with_its_key_only_and_invisible():
    img = _image(0)
    marked = watermark.embed(img, KEY)
    assert np.abs(marked.astype(int) - img).max() <= 3
    assert watermark.detect(marked, KEY) and watermark.score(marked, KEY) > 20
    assert not watermark.detect(img, KEY)
    assert not watermark.detect(marked, b"another key")
    # unmarked images: |z| stays small
    assert all(abs(watermark.score(_image(s), KEY)) < watermark.DEFAULT_THRESHOLD for s in range(10))


def test_watermark_survives_lossless_png_not_a_resize():
    marked = watermark.embed(_image(1), KEY)
    buf = io.BytesIO()
    Image.fromarray(marked).save(buf, format="PNG")
    assert watermark.detect(np.asarray(Image.open(io.BytesIO(buf.getvalue()))), KEY)
    small = Image.fromarray(marked).resize((32, 32), Image.BILINEAR).resize((64, 64), Image.BILINEAR)
    assert not watermark.detect(np.asarray(small), KEY)
