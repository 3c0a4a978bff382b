"""POST /v1/generate for a unified model folder, in process (FastAPI TestClient / httpx ASGITransport).

The model is an untrained, seeded tiny unified model (16x16 images, 4x4 = 16 codes, a 1-layer dim-32 decoder)
saved with UnifiedBundle.save and loaded as `mmfusion serve` loads it: the behaviours tested here (shapes,
equality with `mmfusion generate`'s functions, seeds, batching, errors) do not need a trained one.
"""

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from mmfusion.cli import main
from mmfusion.data.synthetic import SyntheticWorld, WorldConfig, make_split
from mmfusion.models.vq import VQVAE
from mmfusion.serve.generate import GenerateBackend, GenerateEngine, load_unified, unified_folder
from mmfusion.serve.server import ServeSettings, create_app
from mmfusion.unified.generate_cli import answer_questions, caption_images, generate_images
from mmfusion.unified.generation import SamplingConfig
from mmfusion.unified.model import UnifiedConfig, UnifiedDecoder
from mmfusion.unified.sequences import UnifiedVocab
from mmfusion.unified.tokenize_cli import load_images
from mmfusion.unified.train import UnifiedBundle, encode_images, train_text_tokenizer

MAX_LEN = 48


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved unified model folder (untrained, seeded) and three PNG files of synthetic scenes."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("unified_serve")
    world = SyntheticWorld(WorldConfig(seed=0, image_size=16))
    samples = make_split(world, "train", 32, ("image", "text", "vqa"))
    tok = train_text_tokenizer(samples, 96)
    torch.manual_seed(0)
    vq = VQVAE(image_size=16, channels=8, codebook_size=16, code_dim=8).eval()
    vocab = UnifiedVocab(tok.vocab_size, vq.codebook_size, vq.tokens_per_image)
    decoder = UnifiedDecoder(UnifiedConfig(vocab.size, dim=32, depth=1, heads=2, max_len=MAX_LEN))
    UnifiedBundle(decoder.eval(), vocab, tok, vq).save(d / "model")
    for i in range(6):
        Image.fromarray(world.sample("test", i)["image"]).save(d / f"im{i}.png")
    return d


@pytest.fixture(scope="module")
def bundle(folder):
    return load_unified(folder / "model")


def make_app(bundle, **kw):
    settings = ServeSettings(**kw)
    backend = GenerateBackend(GenerateEngine(bundle), settings)
    return create_app(backend=backend, settings=settings), backend


@pytest.fixture(scope="module")
def client(bundle):
    app, _ = make_app(bundle)
    with TestClient(app) as c:
        yield c


def b64file(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def decode_png(s: str) -> np.ndarray:
    im = Image.open(io.BytesIO(base64.b64decode(s)))
    assert im.format == "PNG" and im.mode == "RGB"
    return np.asarray(im)


def cli_codes(bundle, paths) -> torch.Tensor:
    """VQ codes of image files exactly as `mmfusion generate` computes them."""
    return encode_images(bundle.vqvae, load_images([(p.stem, p) for p in paths], bundle.vqvae.image_size))


async def gather_posts(app, bodies):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
        return await asyncio.gather(*(c.post("/v1/generate", json=b) for b in bodies))


def metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{line_start} not in /metrics")


# ---- each task --------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_caption_and_vqa_answer_what_mmfusion_generate_answers(client, bundle, folder):
    paths = [folder / "im0.png", folder / "im1.png"]
    codes = cli_codes(bundle, paths)
    captions = caption_images(bundle, codes, max_new_tokens=40)
    answers = answer_questions(bundle, codes, ["how many objects are there?"] * 2, max_new_tokens=40)
    for i, p in enumerate(paths):
        r = client.post("/v1/generate", json={"task": "caption", "image": b64file(p)})
        assert r.status_code == 200, r.text
        assert r.json()["text"] == captions[i] and r.json()["task"] == "caption"
        r = client.post(
            "/v1/generate",
            json={"task": "vqa", "image": b64file(p), "question": "how many objects are there?"},
        )
        assert r.status_code == 200 and r.json()["text"] == answers[i], r.text
    # JPEG and a data: URL with an RGBA PNG are read too (converted to RGB as the CLI does)
    buf = io.BytesIO()
    Image.open(paths[0]).convert("RGBA").save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    assert client.post("/v1/generate", json={"task": "caption", "image": url}).json()["text"] == captions[0]
    buf = io.BytesIO()
    Image.open(paths[0]).save(buf, format="JPEG")
    jpeg = {"task": "caption", "image": base64.b64encode(buf.getvalue()).decode()}
    assert isinstance(client.post("/v1/generate", json=jpeg).json()["text"], str)


@pytest.mark.timeout(60)
def test_text_to_image_gives_n_pngs_of_the_tokenizer_size_reproducible_by_seed(client, bundle):
    body = {"task": "image", "prompt": "a red circle", "n": 3, "cfg_scale": 2.0, "seed": 7}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    pngs = [decode_png(s) for s in r.json()["images"]]
    assert [p.shape for p in pngs] == [(16, 16, 3)] * 3
    again = [decode_png(s) for s in client.post("/v1/generate", json=body).json()["images"]]
    assert all((a == b).all() for a, b in zip(pngs, again))
    expected, _ = generate_images(bundle, ["a red circle"], 3, 2.0, SamplingConfig("sample", seed=7))
    assert (np.stack(pngs) == expected.numpy()).all()  # the function `mmfusion generate` uses
    other = client.post("/v1/generate", json={**body, "seed": 8}).json()["images"]
    assert any((decode_png(o) != p).any() for o, p in zip(other, pngs))
    one = client.post("/v1/generate", json={"task": "image", "prompt": "a red circle"}).json()["images"]
    assert len(one) == 1  # defaults: n 1, cfg_scale 1, seed 0


# ---- batching ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_concurrent_requests_are_grouped_per_task_and_each_gets_its_own_answer(client, bundle, folder):
    app, backend = make_app(bundle, max_batch=4, max_delay_ms=300)
    paths = [folder / f"im{i}.png" for i in range(6)]
    solo = [client.post("/v1/generate", json={"task": "caption", "image": b64file(p)}).json() for p in paths]
    questions = ["how many objects are there?", "what colour is it?", "is there a circle?"]
    vqa_solo = [
        client.post("/v1/generate", json={"task": "vqa", "image": b64file(p), "question": q}).json()
        for p, q in zip(paths, questions)
    ]
    images = [{"task": "image", "prompt": "a blue square", "n": 2, "seed": s} for s in (0, 1)]
    image_solo = [client.post("/v1/generate", json=b).json() for b in images]
    bodies = [{"task": "caption", "image": b64file(p)} for p in paths]
    bodies += [{"task": "vqa", "image": b64file(p), "question": q} for p, q in zip(paths, questions)]
    rs = asyncio.run(gather_posts(app, bodies + images))
    assert [r.status_code for r in rs] == [200] * 11
    assert [r.json()["text"] for r in rs[:6]] == [s["text"] for s in solo]
    assert [r.json()["text"] for r in rs[6:9]] == [s["text"] for s in vqa_solo]
    assert [r.json()["images"] for r in rs[9:]] == [s["images"] for s in image_solo]  # seeds hold
    assert backend.batchers["caption"].executions == 2  # ceil(6 / 4)
    assert backend.batchers["vqa"].executions == 1
    assert backend.batchers["image"].executions == 2  # one request per call
    with TestClient(app) as c:
        text = c.get("/metrics").text
    assert 'mmfusion_batch_size_bucket{encoder="caption",le="4"} 2' in text
    assert metric(text, "mmfusion_generated_images_total") == 4
    assert metric(text, "mmfusion_generated_image_tokens_total") == 4 * 16
    tokens = sum(backend.engine.text_tokens(r.json()["text"]) for r in rs[:6])
    assert metric(text, 'mmfusion_generated_text_tokens_total{task="caption"}') == tokens
    assert metric(text, 'mmfusion_requests_total{endpoint="/v1/generate",status="200"}') == 11


@pytest.mark.timeout(60)
def test_full_queue_or_timeout_gives_503_with_retry_after_and_every_request_is_answered(bundle, folder):
    import time

    app, backend = make_app(bundle, queue_size=1, timeout_s=10)
    real = backend.engine.images
    backend.batchers["image"].fn = lambda reqs: time.sleep(0.2) or real(reqs)
    bodies = [{"task": "image", "prompt": "a red circle", "seed": i} for i in range(5)]
    rs = asyncio.run(gather_posts(app, bodies))
    codes = sorted(r.status_code for r in rs)
    assert len(rs) == 5 and set(codes) == {200, 503}, codes
    for r in rs:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and "queue full" in r.json()["error"]["message"]
    app, backend = make_app(bundle, timeout_s=0.1)
    backend.batchers["caption"].fn = lambda images: time.sleep(0.4) or ["late"] * len(images)
    with TestClient(app) as c:
        r = c.post("/v1/generate", json={"task": "caption", "image": b64file(folder / "im0.png")})
    assert r.status_code == 503 and "retry-after" in r.headers and "no result within" in r.text


# ---- bad input --------------------------------------------------------------------------------------------
PNG = "iVBORw0KGgo="  # a PNG signature and nothing else
BAD = [
    ("non-JSON", b"{task", "application/json", 400, "not valid JSON"),
    ("wrong media type", b'{"task": "caption"}', "text/plain", 415, "application/json"),
    ("not an object", b'["caption"]', "application/json", 422, "expected an object"),
    ("missing task", {"prompt": "a"}, None, 422, "task: missing"),
    ("unknown task", {"task": "video"}, None, 422, "task = 'video'"),
    ("unknown field", {"task": "caption", "image": PNG, "size": 3}, None, 422, "unknown field(s) ['size']"),
    ("field of another task", {"task": "caption", "image": PNG, "prompt": "a"}, None, 422, "['prompt']"),
    ("missing image", {"task": "caption"}, None, 422, "image: missing"),
    ("image not a string", {"task": "caption", "image": 3}, None, 422, "image is int"),
    ("bad base64", {"task": "caption", "image": "@@@"}, None, 400, "image is not valid base64"),
    ("undecodable image", {"task": "caption", "image": PNG}, None, 400, "image is not a decodable image"),
    ("missing question", {"task": "vqa", "image": PNG}, None, 422, "question: missing"),
    ("empty question", {"task": "vqa", "image": PNG, "question": " "}, None, 422, "question is empty"),
    (
        "long question",
        {"task": "vqa", "image": PNG, "question": "a " * 40},
        None,
        422,
        "question is too long",
    ),
    ("missing prompt", {"task": "image"}, None, 422, "prompt: missing"),
    ("empty prompt", {"task": "image", "prompt": ""}, None, 422, "prompt is empty"),
    ("blank prompt", {"task": "image", "prompt": " \n"}, None, 422, "prompt is empty"),
    ("prompt not text", {"task": "image", "prompt": ["a"]}, None, 422, "prompt is list"),
    ("long prompt", {"task": "image", "prompt": "a " * 40}, None, 422, "prompt is too long: 40 tokens"),
    ("huge prompt", {"task": "image", "prompt": "a" * 10_001}, None, 422, "at most 10000"),
    ("n = 0", {"task": "image", "prompt": "a", "n": 0}, None, 422, "n = 0: expected an integer in [1, 8]"),
    ("n = 9", {"task": "image", "prompt": "a", "n": 9}, None, 422, "n = 9"),
    ("n a string", {"task": "image", "prompt": "a", "n": "2"}, None, 422, "n = '2'"),
    ("n a long string", {"task": "image", "prompt": "a", "n": "9" * 5000}, None, 422, "n = '9999"),
    ("n a bool", {"task": "image", "prompt": "a", "n": True}, None, 422, "n = True"),
    ("cfg_scale < 0", {"task": "image", "prompt": "a", "cfg_scale": -1}, None, 422, "cfg_scale = -1"),
    (
        "cfg_scale inf",
        b'{"task": "image", "prompt": "a", "cfg_scale": 1e999}',
        "application/json",
        422,
        "inf",
    ),
    (
        "cfg_scale 400 digits",
        b'{"task": "image", "prompt": "a", "cfg_scale": 1' + b"0" * 400 + b"}",
        "application/json",
        422,
        "cfg_scale = 1000",
    ),
    ("cfg_scale NaN", b'{"task": "image", "prompt": "a", "cfg_scale": NaN}', "application/json", 422, "NaN"),
    ("seed < 0", {"task": "image", "prompt": "a", "seed": -1}, None, 422, "seed = -1"),
    ("seed float", {"task": "image", "prompt": "a", "seed": 1.5}, None, 422, "seed = 1.5"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,body,ctype,status,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_json_error_naming_the_field(client, name, body, ctype, status, needle):
    if isinstance(body, dict):
        r = client.post("/v1/generate", json=body)
    else:
        r = client.post("/v1/generate", content=body, headers={"content-type": ctype})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["status"] == status and needle in err["message"] and len(err["message"]) < 300, err


@pytest.mark.timeout(60)
def test_body_limit_and_api_key_apply_to_generate(bundle, folder):
    app, _ = make_app(bundle, max_body_bytes=200, api_key="s3cret")
    key = {"x-api-key": "s3cret"}
    with TestClient(app) as c:
        r = c.post("/v1/generate", json={"task": "image", "prompt": "a red circle"})
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        r = c.post(
            "/v1/generate", json={"task": "caption", "image": b64file(folder / "im0.png")}, headers=key
        )
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
        assert c.post("/v1/generate", json={"task": "image", "prompt": "a"}, headers=key).status_code == 200
        assert c.get("/healthz").status_code == 200  # liveness stays open


# ---- which routes exist -----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_unified_model_has_only_generate_and_other_models_have_no_generate(client, make_tiny_model):
    health = client.get("/healthz").json()
    assert health["model_type"] == "unified" and health["image_size"] == 16 and health["max_len"] == MAX_LEN
    assert health["tasks"] == ["caption", "vqa", "image"] and health["tokens_per_image"] == 16
    for path in ("/v1/embed", "/v1/search", "/v1/classify"):
        r = client.post(path, json={"text": ["a"]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.get("/").status_code == 404
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {"/v1/generate", "/healthz", "/metrics"}
    schema = paths["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert [s["title"] for s in schema["oneOf"]] == ["caption", "vqa", "image"]
    with TestClient(create_app(make_tiny_model())) as c:
        r = c.post("/v1/generate", json={"task": "image", "prompt": "a"})
        assert r.status_code == 404 and "/v1/generate" not in c.get("/openapi.json").json()["paths"]


@pytest.mark.timeout(60)
def test_mmfusion_serve_detects_a_unified_folder(folder, monkeypatch, capsys):
    from mmfusion.serve import commands

    assert unified_folder(folder / "model") == unified_folder(folder) == folder / "model"  # run dir too
    assert unified_folder(folder / "im0.png") is None
    started = {}
    monkeypatch.setattr(commands, "_run", lambda app, host, port, log: started.update(app=app, port=port))
    assert main(["serve", str(folder / "model"), "--port", "8123", "--max-batch", "2"]) == 0
    assert "/v1/generate (unified model)" in capsys.readouterr().out and started["port"] == 8123
    with TestClient(started["app"]) as c:
        r = c.post("/v1/generate", json={"task": "caption", "image": b64file(folder / "im2.png")})
        assert r.status_code == 200 and isinstance(r.json()["text"], str)
    assert main(["serve", str(folder / "model"), "--split"]) != 0
    err = capsys.readouterr().err
    assert "--split is for embedding models" in err and len(err.strip().splitlines()) == 1
    (folder / "partial").mkdir()
    (folder / "partial" / "vocab.json").write_text(json.dumps({"n_text": 3}))
    assert main(["serve", str(folder / "partial")]) != 0
    assert "missing decoder, image_tokenizer, text" in capsys.readouterr().err


# ---- fuzz -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_schemathesis_fuzz_of_generate_gives_no_5xx(client, fuzz):
    seen = fuzz(client.app, max_examples=15)
    assert "POST /v1/generate" in seen
    assert seen["POST /v1/generate"][200] > 0 and seen["POST /v1/generate"][422] > 0
