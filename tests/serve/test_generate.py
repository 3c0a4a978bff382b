"""POST /v1/generate for a unified model folder, in process (FastAPI TestClient / httpx ASGITransport).

The model is an untrained, seeded tiny unified model (16x16 images, 4x4 = 16 codes, a 1-layer dim-32 decoder)
with an audio tokenizer trained 3 steps (its k-means init; AudioFrontEnd of 0.25 s, 16 mels, hop 320 -> 16 x 16
spectrograms, 4x4 = 16 codes) saved with UnifiedBundle.save and loaded as `mmfusion serve` loads it: the behaviours tested here
(shapes, equality with `mmfusion generate`'s functions, seeds, batching, errors) do not need a trained one.
A second folder without audio_tokenizer/ stands for the models trained without --audio-tokenizer.
"""

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from fastapi.testclient import TestClient
from PIL import Image

from mmfusion.cli import main
from mmfusion.data.synthetic import SyntheticWorld, WorldConfig, make_split
from mmfusion.models.vq import VQVAE, AudioFrontEnd
from mmfusion.serve.app import create_app
from mmfusion.serve.generate import MAX_AUDIO_SECONDS, GenerateEngine, load_unified, unified_folder
from mmfusion.serve.generate_api import GenerateBackend
from mmfusion.serve.http import ServeSettings
from mmfusion.unified.generate_cli import (
    answer_questions,
    caption_audio,
    caption_images,
    generate_images,
)
from mmfusion.unified.generation import SamplingConfig
from mmfusion.unified.model import UnifiedConfig, UnifiedDecoder
from mmfusion.unified.sequences import UnifiedVocab
from mmfusion.unified.tokenize_cli import load_audios, load_images
from mmfusion.unified.train import (
    UnifiedBundle,
    code_count,
    encode_images,
    train_text_tokenizer,
    train_vqvae,
)

MAX_LEN = 48


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Saved unified model folders (untrained, seeded): `model` with an audio tokenizer, `no_audio` without;
    six PNG files of synthetic scenes and four clips of them: c0.wav (float samples), c1.flac, c2.ogg and
    c3.wav (stereo, 44.1 kHz: resampled as the CLI does)."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("unified_serve")
    world = SyntheticWorld(WorldConfig(seed=0, image_size=16))
    samples = make_split(world, "train", 32, ("image", "text", "vqa"))
    tok = train_text_tokenizer(samples, 96)
    torch.manual_seed(0)
    vq = VQVAE(image_size=16, channels=8, codebook_size=16, code_dim=8).eval()
    frontend = AudioFrontEnd(seconds=0.25, n_mels=16, hop=320)
    audio_vq = VQVAE(channels=8, codebook_size=16, code_dim=8, in_channels=1, input_shape=frontend.shape)
    clips = [s["audio"] for s in make_split(world, "train", 32, ("audio",))]
    train_vqvae(audio_vq, frontend(clips, 16000), steps=3)  # k-means init: codes that tell clips apart
    audio_vq.eval()
    vocab = UnifiedVocab(tok.vocab_size, vq.codebook_size, vq.tokens_per_image, 16, code_count(audio_vq))
    decoder = UnifiedDecoder(UnifiedConfig(vocab.size, dim=32, depth=1, heads=2, max_len=MAX_LEN))
    with (
        torch.no_grad()
    ):  # at its init scale, the untrained decoder says the same for every clip; x3 it does not
        for w in decoder.parameters():
            w.mul_(3.0)
    UnifiedBundle(decoder.eval(), vocab, tok, vq, audio_vq, frontend).save(d / "model")
    plain = UnifiedVocab(tok.vocab_size, vq.codebook_size, vq.tokens_per_image)
    decoder = UnifiedDecoder(UnifiedConfig(plain.size, dim=32, depth=1, heads=2, max_len=MAX_LEN))
    UnifiedBundle(decoder.eval(), plain, tok, vq).save(d / "no_audio")
    for i in range(6):
        Image.fromarray(world.sample("test", i)["image"]).save(d / f"im{i}.png")
    clips = [world.sample("test", i, ("audio",))["audio"] for i in range(4)]
    sf.write(d / "c0.wav", clips[0], 16000, subtype="FLOAT")
    sf.write(d / "c1.flac", clips[1], 16000)
    sf.write(d / "c2.ogg", clips[2], 16000)
    stereo = np.stack([clips[3], 0.5 * clips[3]], axis=1)  # (n, 2): the same samples, played faster
    sf.write(d / "c3.wav", stereo, 44100)
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


def wav_b64(wave: np.ndarray, rate: int, subtype: str = "PCM_16") -> str:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="WAV", subtype=subtype)
    return base64.b64encode(buf.getvalue()).decode()


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


AUDIO_FILES = ("c0.wav", "c1.flac", "c2.ogg", "c3.wav")


@pytest.mark.timeout(60)
def test_audio_caption_answers_what_mmfusion_generate_answers(client, bundle, folder, capsys):
    paths = [folder / f for f in AUDIO_FILES]
    spec = load_audios([(p.stem, p) for p in paths], bundle.audio_frontend)
    expected = caption_audio(bundle, encode_images(bundle.audio_vqvae, spec), max_new_tokens=40)
    assert len(set(expected)) >= 3  # the clips tell apart: an answer given to the wrong request would show
    got = []
    for p in paths:
        r = client.post("/v1/generate", json={"task": "audio_caption", "audio": b64file(p)})
        assert r.status_code == 200 and r.json()["task"] == "audio_caption", r.text
        got.append(r.json()["text"])
    assert got == expected
    # a rate with no common factor with the front end's (gcd 1) is resampled like any other
    odd = wav_b64(np.zeros(4410, dtype=np.int16), 44099)
    assert client.post("/v1/generate", json={"task": "audio_caption", "audio": odd}).status_code == 200
    url = "data:audio/wav;base64," + b64file(paths[0])
    assert client.post("/v1/generate", json={"task": "audio_caption", "audio": url}).json()["text"] == got[0]
    # `mmfusion generate --task audio-caption` prints the same captions
    args = ["generate", "--model", str(folder / "model"), "--task", "audio-caption", "--audio"]
    assert main(args + [str(p) for p in paths]) == 0
    assert [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()] == got


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
    audio = [{"task": "audio_caption", "audio": b64file(folder / f)} for f in AUDIO_FILES]
    audio_solo = [client.post("/v1/generate", json=b).json()["text"] for b in audio]
    rs = asyncio.run(gather_posts(app, bodies + images + audio))
    assert [r.status_code for r in rs] == [200] * 15
    assert [r.json()["text"] for r in rs[:6]] == [s["text"] for s in solo]
    assert [r.json()["text"] for r in rs[6:9]] == [s["text"] for s in vqa_solo]
    assert [r.json()["images"] for r in rs[9:11]] == [s["images"] for s in image_solo]  # seeds hold
    assert [r.json()["text"] for r in rs[11:]] == audio_solo
    assert backend.batchers["caption"].executions == 2  # ceil(6 / 4)
    assert backend.batchers["vqa"].executions == 1
    assert backend.batchers["image"].executions == 2  # one request per call
    assert backend.batchers["audio_caption"].executions == 1
    with TestClient(app) as c:
        text = c.get("/metrics").text
    assert 'mmfusion_batch_size_bucket{encoder="caption",le="4"} 2' in text
    assert metric(text, "mmfusion_generated_images_total") == 4
    assert metric(text, "mmfusion_generated_image_tokens_total") == 4 * 16
    tokens = sum(backend.engine.text_tokens(r.json()["text"]) for r in rs[:6])
    assert metric(text, 'mmfusion_generated_text_tokens_total{task="caption"}') == tokens
    tokens = sum(backend.engine.text_tokens(r.json()["text"]) for r in rs[11:])
    assert metric(text, 'mmfusion_generated_text_tokens_total{task="audio_caption"}') == tokens
    assert 'mmfusion_batch_size_bucket{encoder="audio_caption",le="4"} 1' in text
    assert metric(text, 'mmfusion_requests_total{endpoint="/v1/generate",status="200"}') == 15


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
AUDIO = "audio_caption"
SHORT = np.zeros(800, dtype=np.float32)  # 50 ms
_flac = io.BytesIO()
sf.write(_flac, np.sin(np.arange(16000, dtype=np.float32) / 5), 16000, format="FLAC")
HALF_FLAC = base64.b64encode(
    _flac.getvalue()[: len(_flac.getvalue()) // 2]
).decode()  # header reads, data not
BAD += [
    ("missing audio", {"task": AUDIO}, None, 422, "audio: missing; task audio_caption needs a base64 WAV"),
    ("audio not a string", {"task": AUDIO, "audio": [1]}, None, 422, "audio is list"),
    ("audio empty string", {"task": AUDIO, "audio": ""}, None, 422, "audio is empty"),
    ("audio bad base64", {"task": AUDIO, "audio": "@@@"}, None, 400, "audio is not valid base64"),
    ("undecodable audio", {"task": AUDIO, "audio": PNG}, None, 400, "audio is not a decodable audio file"),
    ("audio cut short", {"task": AUDIO, "audio": HALF_FLAC}, None, 400, "a FLAC file whose samples cannot"),
    (
        "audio image field",
        {"task": AUDIO, "audio": PNG, "image": PNG},
        None,
        422,
        "unknown field(s) ['image']",
    ),
    (
        "audio no samples",
        {"task": AUDIO, "audio": wav_b64(SHORT[:0], 16000)},
        None,
        422,
        "audio has no samples",
    ),
    (
        "audio too long",
        {"task": AUDIO, "audio": wav_b64(np.zeros(8000 * 30 + 4000, dtype=np.int16), 8000)},
        None,
        422,
        f"audio is 30.50 s long; at most {MAX_AUDIO_SECONDS:g} s",
    ),
    (
        "audio low rate",
        {"task": AUDIO, "audio": wav_b64(SHORT, 500)},
        None,
        422,
        "sample rate 500 Hz; expected 1000-",
    ),
    (
        "audio NaN samples",
        {"task": AUDIO, "audio": wav_b64(SHORT + np.nan, 16000, "FLOAT")},
        None,
        422,
        "audio contains NaN or infinite samples",
    ),
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
    assert (
        health["tasks"] == ["caption", "vqa", "image", "audio_caption"] and health["tokens_per_image"] == 16
    )
    assert (health["audio_sample_rate"], health["audio_seconds"], health["tokens_per_audio"]) == (
        16000,
        0.25,
        16,
    )
    assert health["max_audio_seconds"] == MAX_AUDIO_SECONDS
    for path in ("/v1/embed", "/v1/search", "/v1/classify"):
        r = client.post(path, json={"text": ["a"]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.get("/").status_code == 404
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {"/v1/generate", "/healthz", "/metrics"}
    schema = paths["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert [s["title"] for s in schema["oneOf"]] == ["caption", "vqa", "image", "audio_caption"]
    with TestClient(create_app(make_tiny_model())) as c:
        r = c.post("/v1/generate", json={"task": "image", "prompt": "a"})
        assert r.status_code == 404 and "/v1/generate" not in c.get("/openapi.json").json()["paths"]


@pytest.mark.timeout(60)
def test_a_model_without_audio_tokenizer_says_so_and_offers_no_audio_task(folder):
    app, backend = make_app(load_unified(folder / "no_audio"))
    with TestClient(app) as c:
        health = c.get("/healthz").json()
        assert health["tasks"] == ["caption", "vqa", "image"] and "max_audio_seconds" not in health
        r = c.post("/v1/generate", json={"task": "audio_caption", "audio": b64file(folder / "c0.wav")})
        assert r.status_code == 422, r.text
        message = r.json()["error"]["message"]
        assert "task = 'audio_caption': this model has no audio tokenizer (audio_tokenizer/" in message
        assert "mmfusion train-unified --audio-tokenizer DIR" in message
        r = c.post("/v1/generate", json={"task": "video"})
        assert "expected one of ['caption', 'vqa', 'image']" in r.json()["error"]["message"]
        r = c.post("/v1/generate", json={"task": "caption", "image": b64file(folder / "im0.png")})
        assert r.status_code == 200, r.text
        paths = c.get("/openapi.json").json()["paths"]
        schema = paths["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert [s["title"] for s in schema["oneOf"]] == ["caption", "vqa", "image"]
        text = c.get("/metrics").text
    assert 'task="caption"' in text and "audio_caption" not in text
    assert set(backend.batchers) == {"caption", "vqa", "image"}


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
