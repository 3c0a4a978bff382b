"""POST /v1/generate for a joint diffusion model folder, in process (FastAPI TestClient).

The model is the diffusion tests' tiny randomised JointDiffusion (8 px images, 4 px patches, text_len 8;
tests/diffusion_tiny.py) saved with save_diffusion and loaded as `mmfusion serve` loads it: shapes, seeds,
equality with `sampling.sample` and errors do not need a trained one.
"""

import base64
import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from diffusion_tiny import randomised, tiny_config
from mmfusion.cli import main
from mmfusion.diffusion.latents import images_to_unit
from mmfusion.diffusion.model import JointDiffusion
from mmfusion.diffusion.recipe import save_diffusion, text_codec
from mmfusion.diffusion.sampling import sample
from mmfusion.serve.app import create_app
from mmfusion.serve.generate_api import GenerateBackend
from mmfusion.serve.generate_diffusion import DiffusionEngine, load_diffusion_model
from mmfusion.serve.http import ServeSettings

PROMPT = "a small red circle"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("diffusion_serve")
    save_diffusion(randomised(JointDiffusion(tiny_config())), d / "model")
    return d


@pytest.fixture(scope="module")
def model(folder):
    return load_diffusion_model(folder / "model")


@pytest.fixture(scope="module")
def client(model):
    settings = ServeSettings()
    app = create_app(backend=GenerateBackend(DiffusionEngine(model, steps=5), settings), settings=settings)
    with TestClient(app) as c:
        yield c


def decode_png(s: str) -> np.ndarray:
    im = Image.open(io.BytesIO(base64.b64decode(s)))
    assert im.format == "PNG" and im.mode == "RGB"
    return np.asarray(im)


def png_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_healthz_lists_the_diffusion_tasks_and_the_schema_only_those(client):
    h = client.get("/healthz").json()
    assert h["model_type"] == "joint_diffusion" and h["tasks"] == ["caption", "image", "joint"]
    assert h["image_size"] == 8 and h["text_len"] == 8 and h["ddim_steps"] == 5
    body = client.get("/openapi.json").json()["paths"]["/v1/generate"]["post"]["requestBody"]
    titles = [b["title"] for b in body["content"]["application/json"]["schema"]["oneOf"]]
    assert titles == ["caption", "image", "joint"]


def test_image_task_returns_n_pngs_equal_to_sample_and_seeded(client, model):
    req = {"task": "image", "prompt": PROMPT, "n": 3, "cfg_scale": 2.0, "seed": 7}
    r = client.post("/v1/generate", json=req)
    assert r.status_code == 200, r.text
    images = [decode_png(s) for s in r.json()["images"]]
    assert len(images) == 3 and all(im.shape == (8, 8, 3) for im in images)
    text = text_codec(model.cfg).encode([PROMPT] * 3)
    want = images_to_unit(sample(model, "image", text=text, steps=5, guidance=2.0, seed=7).image).numpy()
    np.testing.assert_array_equal(np.stack(images), want)  # what `mmfusion generate` samples
    again = client.post("/v1/generate", json=req).json()["images"]
    assert again == r.json()["images"]
    other = client.post("/v1/generate", json={**req, "seed": 8}).json()["images"]
    assert len(other) == 3 and all(not np.array_equal(decode_png(a), b) for a, b in zip(other, images))


def test_caption_and_joint_tasks(client, model):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    r = client.post("/v1/generate", json={"task": "caption", "image": png_b64(arr)})
    assert r.status_code == 200, r.text
    image = torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0)[None]
    want = text_codec(model.cfg).decode(sample(model, "caption", image=image, steps=5).text)[0]
    assert r.json()["text"] == want
    r = client.post("/v1/generate", json={"task": "joint", "n": 2, "seed": 3})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [decode_png(s).shape for s in out["images"]] == [(8, 8, 3)] * 2
    s = sample(model, "joint", n=2, steps=5, seed=3)
    assert out["texts"] == text_codec(model.cfg).decode(s.text)
    np.testing.assert_array_equal(np.stack([decode_png(p) for p in out["images"]]), images_to_unit(s.image))


BAD = [  # body, status, in the message (422: a field the model refuses, 400: bytes that do not decode)
    ({"task": "vqa", "image": "x"}, 422, "task = 'vqa': expected one of ['caption', 'image', 'joint']"),
    (
        {"task": "image", "prompt": "a small purple unicorn"},
        422,
        "prompt: caption 'a small purple unicorn': words ['unicorn']",
    ),
    ({"task": "image", "prompt": PROMPT, "n": 9}, 422, "n = 9: expected an integer in [1, 8]"),
    ({"task": "image", "prompt": PROMPT, "seed": -1}, 422, "seed = -1"),
    ({"task": "joint", "cfg_scale": 2.0}, 422, "unknown field(s) ['cfg_scale'] for task joint"),
    ({"task": "joint", "n": 0}, 422, "n = 0"),
    (
        {"task": "caption", "image": base64.b64encode(b"not an image").decode()},
        400,
        "image is not a decodable image",
    ),
]


@pytest.mark.parametrize("body,status,needle", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_gets_an_error_naming_the_field(client, body, status, needle):
    r = client.post("/v1/generate", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["status"] == status and needle in err["message"], err


def test_serve_detects_a_diffusion_folder(folder, capsys):
    """`mmfusion serve` takes the run directory for a diffusion model (refused flags name it; exit 2)."""
    assert main(["serve", str(folder), "--index", "idx"]) == 2
    assert "is a joint diffusion model folder (POST /v1/generate)" in capsys.readouterr().err
