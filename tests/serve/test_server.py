"""The HTTP server in process (FastAPI TestClient / httpx ASGITransport), plus one real uvicorn smoke test."""

import asyncio
import base64
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from mmfusion.batch import Batch  # noqa: E402
from mmfusion.serve.app import create_app  # noqa: E402
from mmfusion.serve.backend import LocalBackend  # noqa: E402
from mmfusion.serve.engine import Engine  # noqa: E402
from mmfusion.serve.http import ServeSettings  # noqa: E402
from mmfusion.serve.index import EmbeddingIndex, build_index  # noqa: E402

CAPTIONS = ["a small red circle", "a large blue square", "a small green triangle", "a large white cross"]
COLOURS = [(255, 0, 0), (0, 0, 255), (0, 200, 0), (255, 255, 255)]


def draw(i: int) -> Image.Image:
    im = Image.new("RGB", (32, 32), (12, 12, 16))
    d = ImageDraw.Draw(im)
    c = COLOURS[i]
    if i == 0:
        d.ellipse((10, 10, 22, 22), fill=c)
    elif i == 1:
        d.rectangle((4, 4, 28, 28), fill=c)
    elif i == 2:
        d.polygon([(16, 9), (23, 23), (9, 23)], fill=c)
    else:
        d.rectangle((13, 3, 19, 29), fill=c)
        d.rectangle((3, 13, 29, 19), fill=c)
    return im


def png(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def wav(wave: np.ndarray, sr: int = 16000, subtype: str = "PCM_16") -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@pytest.fixture(scope="module")
def trained(make_tiny_model):
    """The conftest tiny model, overfit on the four caption/image pairs (a second or two on one thread)."""
    model = make_tiny_model().train()
    images = torch.stack([torch.from_numpy(np.array(draw(i))).permute(2, 0, 1) for i in range(4)])
    pixels = images.float().div(127.5).sub(1.0)
    pixels = torch.nn.functional.interpolate(pixels, size=(16, 16), mode="bilinear", antialias=True)
    ids = model.tokenizer.encode(CAPTIONS)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(150):
        loss = model(Batch({"image": pixels, "text": ids}, {})).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def index(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    files = []
    for i in range(4):
        p = root / "images" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        draw(i).save(p)
        files.append((f"img{i}", p, CAPTIONS[i]))
    build_index(Engine(trained), files, root)
    return EmbeddingIndex.load(root)


@pytest.fixture
def client(trained, index):
    with TestClient(create_app(trained, index=index)) as c:
        yield c


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


# ---- happy paths ------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_embed_text_and_image_are_unit_vectors_matching_the_model(client, trained):
    r = client.post("/v1/embed", json={"text": CAPTIONS[:2]})
    assert r.status_code == 200, r.text
    body = r.json()
    emb = torch.tensor(body["embeddings"])
    assert body["modality"] == "text" and body["dim"] == 16 and emb.shape == (2, 16)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(emb, trained.encode_text(CAPTIONS[:2]), atol=1e-5, rtol=0)

    r = client.post("/v1/embed", json={"image": [b64(png(draw(0))), b64(png(draw(1), "JPEG"))]})
    assert r.status_code == 200, r.text
    assert torch.tensor(r.json()["embeddings"]).shape == (2, 16)
    # the binary path gives the same vector as base64 in JSON (and hits the cache: same bytes)
    r2 = client.post("/v1/embed/image", content=png(draw(0)), headers={"content-type": "image/png"})
    assert r2.status_code == 200 and r2.json()["cache_hits"] == 1
    assert r2.json()["embeddings"][0] == r.json()["embeddings"][0]


@pytest.mark.timeout(60)
def test_search_returns_the_captioned_image_first(client):
    for i, caption in enumerate(CAPTIONS):
        r = client.post("/v1/search", json={"text": caption, "k": 4})
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        assert [x["rank"] for x in res] == [1, 2, 3, 4]
        assert res[0]["id"] == f"img{i}" and res[0]["caption"] == caption, (caption, res)
    r = client.post("/v1/search", json={"text": CAPTIONS[2], "k": 1, "include_images": True})
    top = r.json()["results"][0]
    assert base64.b64decode(top["image_png_base64"]) == client.get(top["url"]).content
    img = client.get("/v1/index/image/2")
    assert img.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(img.content))), np.asarray(draw(2)))
    assert client.get("/v1/index/image/99").status_code == 404
    assert client.get("/v1/index").json()["size"] == 4


@pytest.mark.timeout(60)
def test_cache_hit_returns_identical_results_and_is_counted(client):
    req = {"text": ["a large white cross"]}
    first, second = client.post("/v1/embed", json=req).json(), client.post("/v1/embed", json=req).json()
    assert (first["cache_hits"], second["cache_hits"]) == (0, 1)
    assert first["embeddings"] == second["embeddings"]
    m = client.get("/metrics").text
    assert metric(m, "mmfusion_cache_hits_total") == 1 and metric(m, "mmfusion_cache_misses_total") == 1
    assert metric(m, "mmfusion_cache_hit_rate") == pytest.approx(0.5)


@pytest.mark.timeout(60)
def test_metrics_and_health_and_openapi(client):
    client.post("/v1/embed", json={"text": ["a small red circle"]})
    client.post("/v1/embed", json={"text": [""]})
    m = client.get("/metrics")
    assert m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert 'mmfusion_requests_total{endpoint="/v1/embed",status="200"} 1' in text
    assert 'mmfusion_requests_total{endpoint="/v1/embed",status="422"} 1' in text
    assert 'mmfusion_request_duration_seconds_bucket{endpoint="/v1/embed",le="+Inf"} 2' in text
    assert 'mmfusion_request_latency_seconds{endpoint="/v1/embed",quantile="0.99"}' in text
    assert 'mmfusion_batch_size_count{encoder="text"} 1' in text
    assert 'mmfusion_model_executions_total{encoder="text"} 1' in text
    assert 'mmfusion_queue_depth{encoder="image"} 0' in text
    assert "# TYPE mmfusion_request_duration_seconds histogram" in text
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["modalities"] == ["text", "image"] and h["index_size"] == 4
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/embed", "/v1/embed/{modality}", "/v1/search", "/v1/classify", "/healthz", "/metrics"} <= set(
        paths
    )
    assert "requestBody" in paths["/v1/search"]["post"]
    page = client.get("/")
    assert page.status_code == 200 and "/v1/search" in page.text


@pytest.mark.timeout(60)
def test_simultaneous_requests_are_batched_into_ceil_n_over_b_calls(trained):
    n, b = 10, 4
    backend = LocalBackend(Engine(trained), ServeSettings(max_batch=b, max_delay_ms=200, cache=False))
    app = create_app(backend=backend)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            rs = await asyncio.gather(
                *(c.post("/v1/embed", json={"text": [f"a small red circle {i}"]}) for i in range(n))
            )
        return rs

    rs = asyncio.run(main())
    assert all(r.status_code == 200 for r in rs)
    assert backend.batchers["text"].executions == math.ceil(n / b)
    expected = trained.encode_text([f"a small red circle {i}" for i in range(n)])
    got = torch.tensor([r.json()["embeddings"][0] for r in rs])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)  # each request got its own result


# ---- bad input --------------------------------------------------------------------------------------------
BAD = [
    ("non-JSON", "/v1/embed", b"{not json", "application/json", 400, "not valid JSON"),
    ("wrong media type", "/v1/embed", b'{"text": ["a"]}', "text/plain", 415, "application/json"),
    ("missing media type", "/v1/search", b'{"text": "a"}', None, 415, "Content-Type"),
    ("empty text", "/v1/embed", b'{"text": ["  "]}', "application/json", 422, "empty"),
    ("text not a string", "/v1/embed", b'{"text": [3]}', "application/json", 422, "expected a string"),
    ("NaN", "/v1/search", b'{"text": "a", "k": NaN}', "application/json", 422, "NaN"),
    ("not an object", "/v1/embed", b"[1, 2]", "application/json", 422, "expected an object"),
    (
        "two modalities",
        "/v1/embed",
        b'{"text": ["a"], "image": ["x"]}',
        "application/json",
        422,
        "exactly one",
    ),
    ("unknown field", "/v1/embed", b'{"txt": ["a"]}', "application/json", 422, "unknown field"),
    ("empty list", "/v1/embed", b'{"text": []}', "application/json", 422, "empty list"),
    ("bad k", "/v1/search", b'{"text": "a", "k": 0}', "application/json", 422, "k = 0"),
    ("no encoder", "/v1/embed", b'{"audio": ["AAAA"]}', "application/json", 422, "no audio encoder"),
    ("bad base64", "/v1/embed", b'{"image": ["@@@"]}', "application/json", 400, "not valid base64"),
    (
        "not an image",
        "/v1/embed",
        b'{"image": ["aGVsbG8gd29ybGQ="]}',
        "application/json",
        400,
        "not a decodable image",
    ),
    ("binary wrong type", "/v1/embed/image", b"\x89PNG", "image/gif", 415, "image/png"),
    ("binary undecodable", "/v1/embed/image", b"\x89PNG garbage", "image/png", 400, "not a decodable image"),
    ("binary empty", "/v1/embed/image", b"", "image/png", 422, "empty"),
    ("unknown modality", "/v1/embed/smell", b"x", "text/plain", 404, "smell"),
    (
        "classify contrastive",
        "/v1/classify",
        b'{"inputs": [{"text": "a"}]}',
        "application/json",
        404,
        "multimodal",
    ),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,path,body,ctype,status,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_json_error_naming_the_problem(client, name, path, body, ctype, status, needle):
    headers = {"content-type": ctype} if ctype else {}
    r = client.post(path, content=body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["status"] == status and needle in err["message"], err


@pytest.mark.timeout(60)
def test_body_over_the_limit_is_413(trained):
    with TestClient(create_app(trained, settings=ServeSettings(max_body_bytes=1000))) as c:
        r = c.post("/v1/embed", json={"text": ["a" * 2000]})
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
        r = c.post("/v1/embed/image", content=b"x" * 5000, headers={"content-type": "image/png"})
        assert r.status_code == 413
        assert c.post("/v1/embed", json={"text": ["fits"]}).status_code == 200


@pytest.mark.timeout(60)
def test_huge_image_dimensions_are_422_not_a_crash(client):
    # a PNG header claiming 100000 x 100000 pixels, without the pixel data
    im = Image.new("L", (1, 1))
    data = bytearray(png(im))
    data[16:24] = (100000).to_bytes(4, "big") + (100000).to_bytes(4, "big")
    r = client.post("/v1/embed/image", content=bytes(data), headers={"content-type": "image/png"})
    assert r.status_code in (400, 422) and "error" in r.json()


# ---- multimodal model: audio, video, classify -------------------------------------------------------------
@pytest.mark.timeout(60)
def test_multimodal_embed_audio_video_and_classify(multimodal):
    tone = (0.5 * np.sin(np.linspace(0, 440 * 2 * np.pi, 8000))).astype(np.float32)
    video = np.random.default_rng(0).integers(0, 255, (3, 20, 20, 3), dtype=np.uint8)
    with TestClient(create_app(multimodal)) as c:
        assert c.get("/healthz").json()["modalities"] == ["text", "image", "audio", "video"]
        for m, payload in [("audio", wav(tone)), ("video", npy(video)), ("image", png(draw(1)))]:
            r = c.post("/v1/embed", json={m: [b64(payload)]})
            assert r.status_code == 200, r.text
            e = torch.tensor(r.json()["embeddings"])
            assert e.shape == (1, 16) and abs(float(e.norm()) - 1) < 1e-5
        r = c.post("/v1/embed/audio", content=wav(tone), headers={"content-type": "audio/wav"})
        assert r.status_code == 200 and r.json()["cache_hits"] == 1
        r = c.post(
            "/v1/classify",
            json={
                "inputs": [{"text": "a red circle", "image": b64(png(draw(0)))}, {"audio": b64(wav(tone))}]
            },
        )
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert len(preds) == 2 and all(0 <= p["label"] < 3 and len(p["probabilities"]) == 3 for p in preds)
        # the same sample alone gives the same prediction: absent modalities are masked, not mixed in
        alone = c.post("/v1/classify", json={"inputs": [{"audio": b64(wav(tone))}]}).json()["predictions"][0]
        assert alone["probabilities"] == pytest.approx(preds[1]["probabilities"], abs=1e-5)

        bad = [
            ({"audio": [b64(b"RIFF....not a wav")]}, 400, "not a decodable WAV"),
            ({"audio": [b64(wav(np.full(800, np.nan, np.float32), subtype="FLOAT"))]}, 422, "NaN"),
            ({"video": [b64(npy(video[..., 0]))]}, 422, "expected a (T, H, W, 3) uint8 array"),
            ({"video": [b64(npy(video.astype(np.float32)))]}, 422, "uint8"),
            ({"video": [b64(b"not npy")]}, 400, "not a decodable .npy"),
        ]
        for body, status, needle in bad:
            r = c.post("/v1/embed", json=body)
            assert r.status_code == status and needle in r.json()["error"]["message"], r.text
        r = c.post("/v1/classify", json={"inputs": [{}]})
        assert r.status_code == 422 and "no modality" in r.json()["error"]["message"]
        r = c.post("/v1/classify", json={"inputs": [{"smell": "x"}]})
        assert r.status_code == 422 and "unknown modality" in r.json()["error"]["message"]


@pytest.mark.timeout(60)
def test_a_prediction_does_not_depend_on_its_batch_neighbours(multimodal):
    # text is padded to the context length: with padding to the batch's longest text, the fusion (which
    # attends over padding tokens) gave "a cross" logits 0.06 apart alone and next to a long question
    long = {"text": "a much longer question about the large blue square and the small red circle"}
    with TestClient(create_app(multimodal)) as c:
        both = c.post("/v1/classify", json={"inputs": [long, {"text": "a cross"}]}).json()["predictions"]
        alone = c.post("/v1/classify", json={"inputs": [{"text": "a cross"}]}).json()["predictions"]
    assert alone[0]["logits"] == pytest.approx(both[1]["logits"], abs=1e-5)


# ---- overload and auth ------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_full_queue_gives_503_with_retry_after_and_every_request_is_answered(trained):
    engine = Engine(trained)
    real = engine.embed

    def slow(modality, items):
        time.sleep(0.3)
        return real(modality, items)

    engine.embed = slow
    settings = ServeSettings(max_batch=1, max_delay_ms=0, queue_size=1, timeout_s=5, cache=False)
    app = create_app(backend=LocalBackend(engine, settings), settings=settings)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
            return await asyncio.gather(
                *(c.post("/v1/embed", json={"text": [f"caption {i}"]}) for i in range(6))
            )

    rs = asyncio.run(main())
    codes = sorted(r.status_code for r in rs)
    assert len(rs) == 6 and set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    for r in rs:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and "queue full" in r.json()["error"]["message"]


@pytest.mark.timeout(60)
def test_timeout_gives_503(trained):
    engine = Engine(trained)
    engine.embed = lambda m, items: time.sleep(1.0) or [np.zeros(16, np.float32)] * len(items)
    settings = ServeSettings(timeout_s=0.2, cache=False)
    with TestClient(create_app(backend=LocalBackend(engine, settings), settings=settings)) as c:
        r = c.post("/v1/embed", json={"text": ["slow"]})
        assert r.status_code == 503 and "retry-after" in r.headers and "no result within" in r.text


@pytest.mark.timeout(60)
def test_api_key(trained):
    with TestClient(create_app(trained, settings=ServeSettings(api_key="s3cret"))) as c:
        r = c.post("/v1/embed", json={"text": ["a"]})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "API key" in r.json()["error"]["message"]
        assert c.post("/v1/embed", json={"text": ["a"]}, headers={"x-api-key": "wrong"}).status_code == 401
        assert c.post("/v1/embed", json={"text": ["a"]}, headers={"x-api-key": "s3cret"}).status_code == 200
        ok = c.post("/v1/embed", json={"text": ["a"]}, headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/healthz").status_code == 200  # liveness stays open


# ---- fuzz the OpenAPI surface -----------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_fuzzed_requests_never_give_a_5xx(client):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    leaf = st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
    )
    jsonish = st.recursive(
        leaf,
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
        max_leaves=10,
    )
    fields = st.sampled_from(["text", "image", "audio", "video", "k", "inputs", "include_images"])
    bodies = st.one_of(
        st.dictionaries(fields, jsonish, max_size=3).map(lambda d: json.dumps(d).encode()),
        jsonish.map(lambda d: json.dumps(d).encode()),
        st.binary(max_size=64),
    )
    paths = st.sampled_from(
        ["/v1/embed", "/v1/search", "/v1/classify", "/v1/embed/image", "/v1/embed/text", "/v1/embed/video"]
    )
    ctypes = st.sampled_from(["application/json", "image/png", "text/plain", "application/x-npy", ""])

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(path=paths, body=bodies, ctype=ctypes)
    def check(path, body, ctype):
        r = client.post(path, content=body, headers={"content-type": ctype} if ctype else {})
        assert r.status_code < 500 or r.status_code == 503, (path, body, ctype, r.text)
        assert "error" in r.json() or r.status_code == 200

    check()
    for i in ["-1", "abc", "1e9", "0"]:
        assert client.get(f"/v1/index/image/{i}").status_code < 500
    del hypothesis


@pytest.mark.timeout(120)
def test_schemathesis_fuzz_of_the_openapi_schema_gives_no_5xx(client, fuzz):
    seen = fuzz(client.app, max_examples=10)
    assert {"POST /v1/embed", "POST /v1/search", "POST /v1/classify", "GET /v1/index/image/{i}"} <= set(seen)
    assert seen["POST /v1/search"][200] > 0 and seen["POST /v1/embed"][200] > 0  # valid calls got through
    assert seen["POST /v1/embed"][422] > 0  # and invalid ones were refused


# ---- real processes ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            r = httpx.get(url, timeout=1)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not up in {seconds} s")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and every process it started (its own session's process group)."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children left behind, if any
    except ProcessLookupError:
        pass


def _serve(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "mmfusion.cli", "serve", *args, "--threads", "1"]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    from mmfusion.cli import main

    folder = trained.save_pretrained(tmp_path_factory.mktemp("model"))
    out = tmp_path_factory.mktemp("synth_index")
    assert main(["index", "build", str(folder), "--synthetic", "6", "--out", str(out)]) == 0
    return folder, out


@pytest.mark.timeout(90)
def test_cli_index_build_and_real_uvicorn_server(saved):
    folder, index_dir = saved
    idx = EmbeddingIndex.load(index_dir)
    assert len(idx) == 6 and all(Path(index_dir, it["path"]).is_file() for it in idx.items)
    port = _free_port()
    proc = _serve([str(folder), "--port", str(port), "--index", str(index_dir)])
    try:
        health = _wait(f"http://127.0.0.1:{port}/healthz", proc, 60)
        assert health["index_size"] == 6
        r = httpx.post(f"http://127.0.0.1:{port}/v1/search", json={"text": "a small red circle", "k": 3})
        assert r.status_code == 200 and len(r.json()["results"]) == 3
    finally:
        _stop(proc)


@pytest.mark.timeout(90)
def test_demo_page_headless_screenshot(saved, tmp_path):
    import shutil

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:  # `make test` installs it (Debian package) when run as root
        pytest.fail(
            "chromium is not installed: the demo page cannot be checked in a browser; "
            "install it (`make browser` as root, or `apt-get install chromium`)"
        )
    folder, index_dir = saved
    port = _free_port()
    proc = _serve([str(folder), "--port", str(port), "--index", str(index_dir)])
    try:
        _wait(f"http://127.0.0.1:{port}/healthz", proc, 60)
        url = f"http://127.0.0.1:{port}/?q=a+small+red+circle&k=3"  # the page searches on load
        flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=8000"]
        dom = subprocess.run(
            [*flags, "--dump-dom", url], check=True, timeout=60, capture_output=True, text=True
        ).stdout
        assert 'value="a small red circle"' in dom or "a small red circle" in dom
        assert dom.count("<figure>") == 3 and dom.count('src="data:image/png;base64,') == 3, dom[-2000:]
        assert "3 results in" in dom
        shot = tmp_path / "demo.png"
        subprocess.run(
            [*flags, f"--screenshot={shot}", "--window-size=1000,700", url],
            check=True,
            timeout=60,
            capture_output=True,
        )
        pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
        assert pixels.shape == (700, 1000, 3)
        results_area = pixels[150:450, :600]  # below the form: the three result figures with their images
        assert results_area.std() > 10, "the results area of the screenshot is blank"
    finally:
        _stop(proc)
