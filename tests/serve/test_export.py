import pytest
import torch

from mmfusion.errors import CheckpointError
from mmfusion.serve.export import OnnxEncoders, example_inputs, export_onnx, verify_onnx

CAPTIONS = ["a small red circle", "a large blue square", "a small green triangle", "a large white cross"] * 4
TOL = 1e-4  # fp32 ONNX vs PyTorch, max |diff| of unit-norm embedding entries (measured ~4e-7)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, make_tiny_model):
    model = make_tiny_model()
    folder = model.save_pretrained(tmp_path_factory.mktemp("model"))
    # from a saved folder, as the CLI would
    return model, export_onnx(folder, tmp_path_factory.mktemp("onnx"))


def test_onnx_matches_pytorch_at_several_batch_sizes_and_lengths(exported):
    model, paths = exported
    assert sorted(p.name for p in paths.values()) == ["image_encoder.onnx", "text_encoder.onnx"]
    diffs = verify_onnx(model, paths, batch_sizes=(1, 5), lengths=(3, 16))
    assert set(diffs) == {"text", "image"}
    assert max(diffs.values()) < TOL, diffs


def test_onnx_text_encoder_pools_at_eot_under_padding(exported):
    """The same caption padded to two lengths gives the same embedding (dynamic length, EOT gather)."""
    model, paths = exported
    onnx = OnnxEncoders(model, paths)
    short = model.tokenizer.encode(CAPTIONS[:2])
    long = model.tokenizer.encode(CAPTIONS[:2], pad_to=16)
    assert short.shape[1] < 16
    torch.testing.assert_close(onnx.embed_text_ids(short), onnx.embed_text_ids(long), atol=TOL, rtol=0)
    torch.testing.assert_close(onnx.embed_text_ids(long), model.encode_text(CAPTIONS[:2]), atol=TOL, rtol=0)
    emb = onnx.embed_image_tensor(example_inputs(model, 3, 4)["image"])
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="model folder .*nowhere not found"):
        export_onnx(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json not found"):
        export_onnx(tmp_path / "empty", tmp_path / "out")
