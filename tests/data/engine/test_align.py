"""Cross-modal alignment: pairing loose files by name and CLIP-style pair scores."""

from pathlib import Path

import numpy as np
import pytest

from mmfusion import load_model
from mmfusion.data.engine.align import PairScorer, pair_by_name, pair_scores
from mmfusion.data.engine.build_config import BuildConfig
from mmfusion.errors import ConfigError


def test_pair_by_name_groups_same_folder_same_stem():
    root = Path("/data")
    files = [root / p for p in ("b/cat.txt", "a.wav", "b/cat.jpg", "cat.txt", "b/cat.en.txt", "a.png")]
    assert pair_by_name(files, root) == [
        ("a", [root / "a.png", root / "a.wav"]),
        ("b/cat", [root / "b/cat.en.txt", root / "b/cat.jpg", root / "b/cat.txt"]),
        ("cat", [root / "cat.txt"]),  # another folder: another sample
    ]


def test_pair_scores_is_rowwise_cosine():
    img = np.array([[1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    txt = np.array([[0.6, 0.8], [0.6, 0.8]], dtype=np.float32)
    np.testing.assert_allclose(pair_scores(img, txt), [0.6, 1.0], rtol=1e-6)


def test_scorer_matches_the_models_own_embeddings(make_tiny_model, tmp_path):
    model = make_tiny_model()
    folder = model.save_pretrained(tmp_path / "m")
    loads = []

    def counting_loader(path):
        loads.append(path)
        return load_model(path)

    scorer = PairScorer.cached(folder, counting_loader)
    assert PairScorer.cached(folder, counting_loader) is scorer and loads == [folder]  # once per process
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2)]
    np.testing.assert_allclose(scorer.embed_images(images), model.encode_image(images).numpy(), atol=1e-6)
    np.testing.assert_allclose(
        scorer.embed_texts(["a small red circle"]),
        model.encode_text(["a small red circle"]).numpy(),
        atol=1e-6,
    )
    assert scorer.embed_texts([]).shape == (0, 16)


def test_scorer_refuses_a_missing_model(tmp_path):
    with pytest.raises(Exception, match="config.json"):
        PairScorer.cached(tmp_path, load_model)
    with pytest.raises(ConfigError, match=r"--model .*: not a model folder \(no config.json\)"):
        BuildConfig(model=str(tmp_path))


class SeparateSpaces:
    """Encodes images and texts but has no learned temperature: its embeddings are not one space."""

    def encode_image(self, images):
        raise AssertionError("never called")

    def encode_text(self, texts):
        raise AssertionError("never called")


def test_scorer_refuses_a_model_without_a_shared_space():
    with pytest.raises(ConfigError) as e:
        PairScorer(SeparateSpaces(), "runs/fusion")
    assert str(e.value) == (
        "--model runs/fusion: a SeparateSpaces cannot score image-caption pairs (its modality embeddings are "
        "separate spaces); expected a contrastive model folder"
    )
