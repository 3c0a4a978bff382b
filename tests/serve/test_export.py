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


@pytest.mark.parametrize("fusion", ["early", "late", "cross_attention", "router"])
def test_fusion_model_exports_to_one_onnx_graph_that_honours_masks(fusion, tmp_path):
    from mmfusion.modalities.text import TextTokenizer
    from mmfusion.models.multimodal import MultiModalModel
    from mmfusion.serve.export import export_fusion_onnx, verify_fusion_onnx

    tok = TextTokenizer.train(CAPTIONS, 64, 16)
    torch.manual_seed(0)
    model = MultiModalModel(
        {"image": "tiny", "text": "tiny"}, fusion=fusion, n_classes=3, dim=16, tokenizer=tok
    )
    path = export_fusion_onnx(model, tmp_path)
    # batch 5 (exported at 2: the batch axis is dynamic), every modality absent from some rows
    assert verify_fusion_onnx(model, path, batch=5) < TOL


def test_moe_fusion_export_is_refused_with_the_reason(tmp_path):
    from mmfusion.errors import ConfigError
    from mmfusion.models.multimodal import MultiModalModel
    from mmfusion.serve.export import export_fusion_onnx

    model = MultiModalModel({"image": "tiny", "audio": "tiny"}, fusion="moe", dim=16)
    with pytest.raises(ConfigError, match="data-dependent"):
        export_fusion_onnx(model, tmp_path)
