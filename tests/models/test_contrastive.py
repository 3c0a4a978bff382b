import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion import load_model
from mmfusion.batch import Batch
from mmfusion.errors import CheckpointError
from mmfusion.models.contrastive import ContrastiveModel

CAPTIONS = ["a small red circle", "a large blue square", "a small green triangle", "a large white cross"] * 4


@pytest.fixture(scope="module")
def model(make_tiny_model):
    return make_tiny_model()


def images(n=3):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8) for _ in range(n)]


def test_embeddings_are_normalised_and_inputs_interchangeable(model):
    txt = model.encode_text(CAPTIONS[:3])
    assert txt.shape == (3, 16)
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(3))
    arrays = images()
    a = model.encode_image(arrays)
    b = model.encode_image([Image.fromarray(x) for x in arrays])
    c = model.encode_image(
        torch.stack([torch.from_numpy(x).permute(2, 0, 1).float() / 127.5 - 1 for x in arrays])
    )
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(3))
    # any size and mode: a 40x24 greyscale image goes through the model's own preprocessing
    assert model.encode_image([Image.new("L", (40, 24), 128)]).shape == (1, 16)


def test_save_load_round_trip_gives_identical_embeddings(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    again = load_model(tmp_path / "m")
    assert torch.equal(again.encode_text(CAPTIONS), model.encode_text(CAPTIONS))
    assert torch.equal(again.encode_image(images()), model.encode_image(images()))


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a saved mmfusion model folder"):
        ContrastiveModel.from_pretrained(tmp_path)


def test_forward_loss_and_gradients(model):
    model.train()
    batch = Batch({"image": torch.randn(4, 3, 16, 16), "text": model.tokenizer.encode(CAPTIONS[:4])}, {})
    out = model(batch)
    out.loss.backward()
    assert out.loss.ndim == 0 and out.loss.item() > 0
    assert model.logit_scale.grad is not None and model.image_encoder.patch_embed.weight.grad is not None
    assert float(out.metrics["temperature"]) == pytest.approx(0.07, rel=1e-5)
    model.zero_grad()
    model.eval()
