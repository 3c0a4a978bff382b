"""CLIP checkpoints <-> mmfusion (issue 16, item 2): tiny random HF CLIPModels built here, saved with
save_pretrained, imported, compared with transformers' own features to 1e-5, exported back and reloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer  # noqa: E402

from mmfusion import load_model  # noqa: E402
from mmfusion.cli import main  # noqa: E402
from mmfusion.errors import ConfigError  # noqa: E402
from mmfusion.models.clip_interop import hf_to_openclip, openclip_to_hf  # noqa: E402
from mmfusion.models.clip_io import (  # noqa: E402
    export_hf_clip,
    export_openclip,
    import_clip,
    import_hf_clip,
    import_openclip,
)

CAPTIONS = [
    "a red square",
    "two small blue circles on the left",
    "green",
    "a large white cross above a square",
    "two small blue circles on the left below a large white cross above a red square",  # cut at 12 tokens
]
WORDS = sorted({w for c in CAPTIONS for w in c.split()} | {"triangle", "below"})
MEAN, STD = (0.45, 0.5, 0.4), (0.25, 0.3, 0.2)
ATOL = 1e-5


def write_clip_vocab(folder: Path) -> int:
    """A tiny CLIP BPE (vocab.json + merges.txt) covering WORDS: letters, letter</w>, one merge chain per word,
    then <|startoftext|> and <|endoftext|> as the last two ids (as in OpenAI's vocabulary). Returns its size."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = letters + [c + "</w>" for c in letters]
    merges: list[str] = []
    for word in WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merged = symbols[0] + symbols[1]
            if f"{symbols[0]} {symbols[1]}" not in merges:
                merges.append(f"{symbols[0]} {symbols[1]}")
                vocab.append(merged)
            symbols = [merged] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory) -> tuple[Path, int]:
    folder = tmp_path_factory.mktemp("clip_vocab")
    return folder, write_clip_vocab(folder)


# (text act, vision act, projection_dim, eos_token_id legacy 2?)
CASES = {
    "quick_gelu_proj24": ("quick_gelu", "quick_gelu", 24, False),
    "gelu_proj32_legacy_eos": ("gelu", "gelu", 32, True),
}


def make_hf_folder(folder: Path, vocab: tuple[Path, int], case: str, seed: int = 0) -> Path:
    """A random tiny CLIPModel (text width 32, vision width 40, 2 layers each, 32 px images, patch 8) with its
    tokenizer and a preprocessor_config.json (non-default mean / std), saved with save_pretrained."""
    text_act, vision_act, proj, legacy = CASES[case]
    vocab_folder, n = vocab
    tok = CLIPTokenizer.from_pretrained(str(vocab_folder))
    text = dict(
        vocab_size=n,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=12,
        hidden_act=text_act,
        bos_token_id=tok.bos_token_id,
        eos_token_id=2 if legacy else tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        hidden_size=40,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=5,
        image_size=32,
        patch_size=8,
        hidden_act=vision_act,
    )
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj))
    with torch.no_grad():  # HF initialises LayerNorms to 1 / 0 and logit_scale to 2.6592: make them count
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        model.logit_scale.fill_(3.1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    pre = {"image_processor_type": "CLIPImageProcessor", "image_mean": list(MEAN), "image_std": list(STD)}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    return folder


@pytest.fixture(scope="session", params=list(CASES))
def hf_folder(request, tmp_path_factory, vocab_dir) -> Path:
    return make_hf_folder(tmp_path_factory.mktemp(f"hf_{request.param}"), vocab_dir, request.param)


def hf_features(folder: Path, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(normalised text features of CAPTIONS, normalised image features, logit_scale) from transformers."""
    model = CLIPModel.from_pretrained(str(folder)).eval()
    tok = CLIPTokenizer.from_pretrained(str(folder))
    inputs = tok(CAPTIONS, padding=True, truncation=True, max_length=12, return_tensors="pt")
    with torch.no_grad():
        text = model.get_text_features(**inputs).pooler_output
        image = model.get_image_features(pixel_values=pixel_values).pooler_output
    return F.normalize(text, dim=-1), F.normalize(image, dim=-1), model.logit_scale.item()


def pixels(seed: int = 0) -> torch.Tensor:
    """CLIP-normalised pixel values (4, 3, 32, 32), as CLIPImageProcessor makes them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 32, 32, generator=g)


def to_mmfusion_pixels(p: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised pixels -> mmfusion's [-1, 1] scale (the imported tower normalises itself)."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (p * std + mean) * 2 - 1


def assert_same_embeddings(model, folder: Path) -> None:
    """Max |difference| of the normalised embeddings vs transformers' < ATOL (printed: `pytest -s` shows them)."""
    text, image, scale = hf_features(folder, pixels())
    d_text = (model.encode_text(CAPTIONS) - text).abs().max().item()
    d_image = (model.encode_image(to_mmfusion_pixels(pixels())) - image).abs().max().item()
    print(f"\n{folder.name}: max abs diff text {d_text:.2e}, image {d_image:.2e}")
    assert d_text < ATOL and d_image < ATOL
    assert model.logit_scale.item() == pytest.approx(scale, abs=1e-6)


def test_hf_import_gives_transformers_ids_and_embeddings(hf_folder):
    model = import_hf_clip(hf_folder)
    assert model.config.text.arch == "clip"
    tok = CLIPTokenizer.from_pretrained(str(hf_folder))
    ids = tok(CAPTIONS, padding=True, truncation=True, max_length=12, return_tensors="pt")["input_ids"]
    assert ids.shape[1] == 12 and torch.equal(model.tokenizer.encode(CAPTIONS), ids)
    assert_same_embeddings(model, hf_folder)


def test_uint8_images_get_the_checkpoint_normalisation(hf_folder):
    """encode_image on (H, W, 3) uint8 images at the tower's size = HF on CLIPImageProcessor's pixel_values."""
    from PIL import Image

    try:
        from transformers import CLIPImageProcessorPil as Processor  # transformers 5: no torchvision needed
    except ImportError:
        from transformers import CLIPImageProcessor as Processor

    model = import_hf_clip(hf_folder)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 32, 32, 3), generator=g, dtype=torch.uint8)
    square = {"height": 32, "width": 32}
    processor = Processor(image_mean=MEAN, image_std=STD, size={"shortest_edge": 32}, crop_size=square)
    hf_pixels = processor(images=[Image.fromarray(im.numpy()) for im in images], return_tensors="pt")
    _, expected, _ = hf_features(hf_folder, hf_pixels["pixel_values"])
    got = model.encode_image([im.numpy() for im in images])
    assert (got - expected).abs().max().item() < ATOL


def test_save_load_and_hf_export_round_trip(hf_folder, tmp_path):
    model = import_hf_clip(hf_folder)
    model.save_pretrained(tmp_path / "mm")
    reloaded = load_model(tmp_path / "mm")
    assert torch.equal(reloaded.encode_text(CAPTIONS), model.encode_text(CAPTIONS))
    out = export_hf_clip(reloaded, tmp_path / "hf")
    _, info = CLIPModel.from_pretrained(str(out), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert_same_embeddings(model, out)  # the exported folder gives the original's embeddings
    ids = CLIPTokenizer.from_pretrained(str(out))(CAPTIONS, padding=True, truncation=True, max_length=12)
    ids = torch.tensor(ids["input_ids"])
    assert torch.equal(ids, model.tokenizer.encode(CAPTIONS))
    assert json.loads((out / "preprocessor_config.json").read_text())["image_mean"] == pytest.approx(MEAN)


def test_openclip_state_dict_round_trip(hf_folder, tmp_path):
    """HF -> OpenCLIP keys (safetensors and a torch.save'd .bin) -> mmfusion -> the HF embeddings again."""
    from safetensors.torch import load_file, save_file

    text_act = json.loads((hf_folder / "config.json").read_text())["text_config"]["hidden_act"]
    hf_state = load_file(str(hf_folder / "model.safetensors"))
    oc_state = hf_to_openclip(hf_state)
    assert {k: v.shape for k, v in openclip_to_hf(oc_state).items()} == {
        k: v.shape for k, v in hf_state.items()
    }
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in oc_state
    assert oc_state["text_projection"].shape[0] == 32  # (width, embed_dim), OpenCLIP's layout
    oc_config = {
        "model_cfg": {
            "embed_dim": oc_state["text_projection"].shape[1],
            "quick_gelu": text_act == "quick_gelu",
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 40, "layers": 2, "head_width": 8},
            "text_cfg": {"context_length": 12, "width": 32, "heads": 4, "layers": 2},
        },
        "preprocess_cfg": {"mean": list(MEAN), "std": list(STD)},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps(oc_config))
    save_file(oc_state, str(tmp_path / "open_clip_model.safetensors"))
    torch.save(oc_state, tmp_path / "weights.bin")
    for path in (tmp_path / "open_clip_model.safetensors", tmp_path / "weights.bin"):
        model, assumed = import_openclip(path, tmp_path / "open_clip_config.json", tokenizer=hf_folder)
        assert assumed == []
        assert_same_embeddings(model, hf_folder)
    out = export_openclip(model, tmp_path / "oc_export")
    again, _ = import_clip(out)  # an OpenCLIP folder: its config and tokenizer.json travel with it
    assert torch.equal(again.encode_text(CAPTIONS), model.encode_text(CAPTIONS))
    exported = load_file(str(out / "open_clip_model.safetensors"))
    assert (
        all(torch.equal(exported[k], v) for k, v in oc_state.items()) and exported.keys() == oc_state.keys()
    )


def test_trained_clip_arch_model_exports_and_reimports_identically(hf_folder, tmp_path):
    """Train a few steps (the quickstart loss), then HF and OpenCLIP exports re-import to the same weights."""
    from mmfusion.batch import Batch

    model = import_hf_clip(hf_folder).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(3):
        images = torch.rand(len(CAPTIONS), 3, 32, 32) * 2 - 1
        loss = model(Batch({"image": images, "text": model.tokenizer.encode(CAPTIONS)}, {})).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    state = model.state_dict()
    for exported in (export_hf_clip(model, tmp_path / "hf"), export_openclip(model, tmp_path / "oc")):
        again, _ = import_clip(exported)
        assert again.state_dict().keys() == state.keys()
        assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
        assert torch.equal(again.encode_text(CAPTIONS), model.encode_text(CAPTIONS))


def test_cli_import_and_export(hf_folder, tmp_path, capsys):
    assert main(["import-clip", str(hf_folder), "--out", str(tmp_path / "mm")]) == 0
    assert main(["export", str(tmp_path / "mm"), "--format", "hf-clip", "--out", str(tmp_path / "hf")]) == 0
    assert main(["export", str(tmp_path / "mm"), "--format", "openclip", "--out", str(tmp_path / "oc")]) == 0
    assert_same_embeddings(load_model(tmp_path / "mm"), tmp_path / "hf")
    out = str(tmp_path / "mm2")
    assert main(["import-clip", str(tmp_path / "oc"), "--format", "openclip", "--out", out]) == 0
    assert_same_embeddings(load_model(out), hf_folder)


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, vocab_dir):
    assert main(["import-clip", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere not found" in err and "HF CLIPModel folder" in err
    (tmp_path / "siglip").mkdir()
    (tmp_path / "siglip" / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    assert main(["import-clip", str(tmp_path / "siglip"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'siglip'" in err and "supported: CLIP ViT" in err
    # mmfusion's own text tower cannot become a CLIPModel
    from conftest import tiny_contrastive_model

    tiny_contrastive_model().save_pretrained(tmp_path / "native")
    assert (
        main(["export", str(tmp_path / "native"), "--format", "hf-clip", "--out", str(tmp_path / "x")]) == 2
    )
    assert "text.arch clip" in capsys.readouterr().err


def test_unsupported_openclip_weights_and_pickles_are_refused(hf_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    oc_state = hf_to_openclip(load_file(str(hf_folder / "model.safetensors")))
    save_file(oc_state, str(tmp_path / "clip.safetensors"))
    with pytest.raises(ConfigError, match="unsupported OpenCLIP architecture .*attentional_pool"):
        import_openclip(tmp_path / "clip.safetensors", {"vision_cfg": {"attentional_pool": True}}, hf_folder)
    oc_state["logit_bias"] = torch.zeros(())  # SigLIP
    save_file(oc_state, str(tmp_path / "siglip.safetensors"))
    with pytest.raises(ConfigError, match="no mmfusion counterpart for logit_bias"):
        import_openclip(tmp_path / "siglip.safetensors", tokenizer=hf_folder)
    torch.save({"model": Path("x")}, tmp_path / "pickle.pt")  # an object weights_only refuses
    with pytest.raises(ConfigError, match="weights_only"):
        import_openclip(tmp_path / "pickle.pt", tokenizer=hf_folder)


def test_clip_arch_run_trains_exports_and_reimports_identically(tmp_path, vocab_dir, tiny_run):
    """A two-tower run from scratch with model.text.arch clip (a CLIP tokenizer folder, quick_gelu) through the
    Trainer; its model exports to HF (CLIPModel gives its embeddings) and OpenCLIP and re-imports bitwise."""
    from mmfusion.config import config_from_dict
    from mmfusion.run import train

    tok_dir = tmp_path / "tok"
    CLIPTokenizer.from_pretrained(str(vocab_dir[0])).save_pretrained(tok_dir)
    act = {"act": "quick_gelu"}
    cfg = tiny_run(
        tmp_path,
        "clip_arch",
        "two_tower",
        model={
            "embed_dim": 16,
            "text": {"arch": "clip", "tokenizer": str(tok_dir), "vocab_size": vocab_dir[1], "context_length": 12,
                     "width": 16, "depth": 1, "heads": 2, **act},
            "image": {"image_size": 16, "patch_size": 8, "width": 16, "depth": 1, "heads": 2, **act},
        },
    )  # fmt: skip
    train(config_from_dict(cfg), log=lambda m: None)
    model = load_model(tmp_path / "clip_arch")
    assert model.config.text.arch == "clip" and model.tokenizer.vocab_size == vocab_dir[1]
    state = model.state_dict()
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for exported in (export_hf_clip(model, tmp_path / "hf"), export_openclip(model, tmp_path / "oc")):
        again, _ = import_clip(exported)
        assert again.state_dict().keys() == state.keys()
        assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
        assert torch.equal(again.encode_text(CAPTIONS), model.encode_text(CAPTIONS))
        assert torch.equal(again.encode_image(images), model.encode_image(images))
    hf = CLIPModel.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():  # mmfusion's [-1, 1] pixels are CLIP pixels with mean = std = 0.5
        hf_image = F.normalize(hf.get_image_features(pixel_values=images).pooler_output, dim=-1)
    assert (hf_image - model.encode_image(images)).abs().max().item() < ATOL


def test_eot_pooling_takes_the_first_endoftext_else_the_last_position():
    from mmfusion.modalities.text import TextEncoder

    torch.manual_seed(0)
    enc = TextEncoder(10, 6, 8, 1, 2, 4, act="quick_gelu", eot_id=9).eval()
    ids = torch.tensor([[8, 5, 9, 9, 9, 9], [8, 5, 6, 7, 1, 2], [9, 0, 0, 0, 0, 0]])
    tokens = enc.forward_tokens(ids)
    expected = enc.proj(tokens[torch.arange(3), torch.tensor([2, 5, 0])])
    assert torch.equal(enc(ids), expected)


def test_activations_match_transformers():
    from transformers.activations import ACT2FN

    from mmfusion.layers import ACTIVATIONS
    from mmfusion.models.clip_interop import HF_ACTS

    x = torch.linspace(-6, 6, 101)
    for hf_name, ours in HF_ACTS.items():
        assert (ACTIVATIONS[ours](x) - ACT2FN[hf_name](x)).abs().max().item() < 1e-6, hf_name
