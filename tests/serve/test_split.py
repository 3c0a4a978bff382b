"""The split deployment: front/cache, encoder service and fusion service (in process over ASGI, and as real
processes started by `mmfusion serve MODEL --split`)."""

import asyncio
import base64
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from mmfusion.serve.app import create_app  # noqa: E402
from mmfusion.serve.http import ServeSettings, pack  # noqa: E402
from mmfusion.serve.remote import RemoteBackend  # noqa: E402
from mmfusion.serve.split import create_encoder_app, create_fusion_app  # noqa: E402


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{line_start} not in /metrics:\n{text}")


INPUTS = [
    {"text": "a small red circle", "image": b64(png(0))},
    {"image": b64(png(1))},
    {"text": "what colour is the large square"},
    {"text": "a cross", "image": b64(png(2))},
]


def logits(preds: list[dict]) -> torch.Tensor:
    return torch.tensor([p["logits"] for p in preds])


@pytest.fixture(scope="module")
def in_process(multimodal):
    """The single-process answer to INPUTS."""
    with TestClient(create_app(multimodal)) as c:
        r = c.post("/v1/classify", json={"inputs": INPUTS})
        assert r.status_code == 200, r.text
        return r.json()["predictions"]


def split_apps(model, settings: ServeSettings):
    """Encoder service, fusion service and a front whose RemoteBackend reaches them over ASGI (no sockets)."""
    enc, fus = create_encoder_app(model, settings), create_fusion_app(model, settings)
    info = TestClient(enc).get("/healthz").json()
    mounts = {"http://encoder": httpx.ASGITransport(app=enc), "http://fusion": httpx.ASGITransport(app=fus)}
    backend = RemoteBackend("http://encoder", "http://fusion", settings, info=info, mounts=mounts)
    return enc, fus, backend, create_app(backend=backend, settings=settings)


@pytest.mark.timeout(60)
def test_split_classify_equals_in_process_and_a_cached_image_skips_the_encoder(multimodal, in_process):
    enc, fus, backend, front = split_apps(multimodal, ServeSettings())
    enc_batchers = enc.state.backend.batchers

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=front), base_url="http://t") as c:
            first = await c.post("/v1/classify", json={"inputs": INPUTS})
            # the same image with a new question: only the text goes to the encoder service
            again = await c.post(
                "/v1/classify", json={"inputs": [{"text": "is it round", "image": INPUTS[0]["image"]}]}
            )
            metrics = (await c.get("/metrics")).text
            health = (await c.get("/healthz")).json()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fus), base_url="http://f") as c:
            fusion_metrics = (await c.get("/metrics")).text
        return first, again, metrics, health, fusion_metrics

    first, again, metrics, health, fusion_metrics = asyncio.run(main())
    assert first.status_code == 200 and again.status_code == 200, (first.text, again.text)
    got = first.json()["predictions"]
    assert [p["label"] for p in got] == [p["label"] for p in in_process]
    torch.testing.assert_close(logits(got), logits(in_process), atol=1e-5, rtol=0)
    # three distinct images and three texts, one encoder call per modality; then one text only
    assert enc_batchers["image_tokens"].executions == 1 and enc_batchers["image_tokens"].items == 3
    assert enc_batchers["text_tokens"].executions == 2 and enc_batchers["text_tokens"].items == 4
    assert enc_batchers["classify"].executions == 0  # fusion ran on the fusion service, not here
    assert metric(metrics, "mmfusion_cache_hits_total") == 1  # the repeated image
    assert metric(metrics, 'mmfusion_upstream_requests_total{service="encoder"}') == 3
    assert metric(metrics, 'mmfusion_upstream_requests_total{service="fusion"}') == 2
    assert metric(fusion_metrics, 'mmfusion_model_executions_total{encoder="fusion"}') == 2
    assert metric(fusion_metrics, 'mmfusion_batch_size_sum{encoder="fusion"}') == 5  # 4 + 1 samples
    assert metric(fusion_metrics, 'mmfusion_requests_total{endpoint="/v1/fuse",status="200"}') == 2
    assert health["services"] == {"encoder": "http://encoder", "fusion": "http://fusion"}
    # the cached image tokens give the same answer as encoding it again in one process
    with TestClient(create_app(multimodal)) as c:
        alone = c.post(
            "/v1/classify", json={"inputs": [{"text": "is it round", "image": INPUTS[0]["image"]}]}
        )
    torch.testing.assert_close(
        logits(again.json()["predictions"]), logits(alone.json()["predictions"]), atol=1e-5, rtol=0
    )


BINARY = {"content-type": "application/octet-stream"}


@pytest.mark.timeout(60)
def test_fusion_service_batches_concurrent_requests_each_getting_its_own_answer(multimodal):
    from mmfusion.serve.engine import Engine

    fus = create_fusion_app(multimodal, ServeSettings(max_batch=4, max_delay_ms=300))
    n, d = TestClient(fus).get("/healthz").json()["token_shapes"]["text"]
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, n, d)).astype(np.float32) for _ in range(6)]

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fus), base_url="http://f") as c:
            bodies = [pack({"text": x, "text_mask": np.ones(1, dtype=bool)}) for x in xs]
            return await asyncio.gather(*(c.post("/v1/fuse", content=b, headers=BINARY) for b in bodies))

    rs = asyncio.run(main())
    assert [r.status_code for r in rs] == [200] * 6
    batcher = fus.state.backend.batchers["fusion"]
    assert batcher.executions == 2 and dict(batcher.batch_sizes) == {4: 1, 2: 1}
    engine = Engine(multimodal)
    for x, r in zip(xs, rs):
        expected = engine.fuse([{"text": x[0]}])
        torch.testing.assert_close(logits(r.json()["predictions"]), logits(expected), atol=1e-5, rtol=0)


@pytest.mark.timeout(60)
def test_fusion_service_rejects_bad_tensors_with_a_named_error(multimodal):
    fus = create_fusion_app(multimodal)
    n, d = TestClient(fus).get("/healthz").json()["token_shapes"]["text"]
    x = np.zeros((2, n, d), dtype=np.float32)
    ok = np.ones(2, dtype=bool)
    nan = x.copy()
    nan[1, 0, 0] = np.nan
    bad = [
        (b"not safetensors", BINARY, 400, "not a safetensors file"),
        (pack({"text": x, "text_mask": ok}), {"content-type": "application/json"}, 415, "octet-stream"),
        (pack({"text": x}), BINARY, 422, "send both"),
        (pack({"text": x[:, :-1], "text_mask": ok}), BINARY, 422, f"expected float32 (2, {n}, {d})"),
        (pack({"text": x.astype(np.float64), "text_mask": ok}), BINARY, 422, "float64"),
        (pack({"text": nan, "text_mask": ok}), BINARY, 422, "NaN"),
        (pack({"text": x, "text_mask": ok.astype(np.uint8)}), BINARY, 422, "expected (B,) bool"),
        (pack({"text": x, "text_mask": np.array([True, False])}), BINARY, 422, "rows [1] have no modality"),
        (pack({"smell": x}), BINARY, 422, "unknown tensor"),
        (pack({}), BINARY, 422, "no tokens"),
    ]
    with TestClient(fus) as c:
        for body, headers, status, needle in bad:
            r = c.post("/v1/fuse", content=body, headers=headers)
            assert r.status_code == status and needle in r.json()["error"]["message"], (needle, r.text)
        assert (
            c.post("/v1/fuse", content=pack({"text": x, "text_mask": ok}), headers=BINARY).status_code == 200
        )


@pytest.mark.timeout(60)
def test_split_front_passes_service_errors_through_and_a_dead_service_is_503(multimodal):
    _, _, _, front = split_apps(multimodal, ServeSettings())
    with TestClient(front) as c:
        r = c.post("/v1/classify", json={"inputs": [{"image": b64(b"junk")}]})
        assert r.status_code == 400 and "not a decodable image" in r.json()["error"]["message"]
        r = c.post("/v1/classify", json={"inputs": [{"text": " "}]})
        assert r.status_code == 422 and "empty" in r.json()["error"]["message"]
    info = TestClient(create_encoder_app(multimodal)).get("/healthz").json()
    settings = ServeSettings(timeout_s=1)
    down = RemoteBackend("http://127.0.0.1:9", "http://127.0.0.1:9", settings, info=info)  # port 9: nothing
    with TestClient(create_app(backend=down, settings=settings)) as c:
        r = c.post("/v1/classify", json={"inputs": [{"text": "a"}]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "encoder service" in r.json()["error"]["message"]


@pytest.mark.timeout(120)
def test_schemathesis_fuzz_of_the_split_front_and_the_fusion_service_gives_no_5xx(multimodal, fuzz):
    _, fus, _, front = split_apps(multimodal, ServeSettings())
    seen = fuzz(front, max_examples=10)
    assert seen["POST /v1/classify"][200] > 0 and seen["POST /v1/embed"][200] > 0, seen
    seen = fuzz(fus, max_examples=5)
    assert set(seen) == {"POST /v1/fuse", "GET /healthz", "GET /metrics"}
    assert seen["POST /v1/fuse"][400] == 5, seen  # random bytes are not safetensors


# ---- real processes: `mmfusion serve MODEL --split` -------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(150)
def test_cli_split_runs_three_processes_that_answer_like_one(multimodal, in_process, tmp_path):
    folder = multimodal.save_pretrained(tmp_path / "model")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "mmfusion.cli", "serve", str(folder), "--split", "--threads", "1"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)], env=env, stdout=subprocess.DEVNULL, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"mmfusion serve --split exited with {proc.returncode}"
            try:
                health = httpx.get(f"{base}/healthz", timeout=2).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the split front did not come up in 120 s"
                time.sleep(0.3)
        services = health["services"]
        assert set(services) == {"encoder", "fusion"} and health["model_type"] == "multimodal"
        r = httpx.post(f"{base}/v1/classify", json={"inputs": INPUTS}, timeout=30)
        assert r.status_code == 200, r.text
        got = r.json()["predictions"]
        assert [p["label"] for p in got] == [p["label"] for p in in_process]
        torch.testing.assert_close(logits(got), logits(in_process), atol=1e-5, rtol=0)
        r = httpx.post(f"{base}/v1/classify", json={"inputs": [{"text": "new", "image": INPUTS[3]["image"]}]})
        assert r.status_code == 200, r.text
        enc = httpx.get(f"{services['encoder']}/metrics").text
        assert metric(enc, 'mmfusion_model_executions_total{encoder="image_tokens"}') == 1  # not re-encoded
        assert metric(enc, 'mmfusion_batch_size_sum{encoder="text_tokens"}') == 4
        fus = httpx.get(f"{services['fusion']}/metrics").text
        assert metric(fus, 'mmfusion_batch_size_sum{encoder="fusion"}') == 5
        e = [httpx.post(f"{base}/v1/embed", json={"text": ["a red circle"]}).json() for _ in range(2)]
        assert (e[0]["cache_hits"], e[1]["cache_hits"]) == (0, 1) and e[0]["embeddings"] == e[1]["embeddings"]
        # children die with the front, even when it is killed without a chance to clean up
        kids = _children(proc.pid)
        assert len(kids) == 2, kids
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(k) for k in kids), "services outlived the front"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything left in its session
        except ProcessLookupError:
            pass
