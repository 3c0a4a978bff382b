"""MultiModalModel: composable API = seed spelling = config, persistence, every fusion, masks, modality dropout."""

import pytest
import torch
from torch import nn

from mmfusion.batch import Batch
from mmfusion.errors import CheckpointError, ConfigError
from mmfusion.eval.missing import missing_modality_eval
from mmfusion.eval.pruning import calibrate_pruning, predict_pruned
from mmfusion.fusion import FUSIONS
from mmfusion.modalities.text import TextTokenizer
from mmfusion.models.multimodal import (
    MultiModalConfig,
    MultiModalModel,
    MultiModalTransformer,
    modality_dropout,
)

TEXTS = [
    "a small red circle",
    "what colour is the square?",
    "is there a blue cross?",
    "a large green triangle",
]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(TEXTS, vocab_size=64, context_length=16)


def make_batch(tok: TextTokenizer, b: int = 4, seed: int = 0, modalities=("image", "text", "audio")) -> Batch:
    g = torch.Generator().manual_seed(seed)
    data = {
        "image": torch.rand(b, 3, 32, 32, generator=g) * 2 - 1,
        "text": tok.encode([TEXTS[i % len(TEXTS)] for i in range(b)]),
        "audio": torch.randn(b, 64, 51, generator=g),
        "video": torch.rand(b, 4, 3, 32, 32, generator=g) * 2 - 1,
    }
    data = {m: data[m] for m in modalities}
    data["label"] = torch.arange(b) % 2
    return Batch(data, {m: torch.ones(b, dtype=torch.bool) for m in modalities})


def build(tok, seed: int = 0, **kw) -> MultiModalModel:
    torch.manual_seed(seed)
    kw.setdefault("encoders", {"image": "tiny", "text": "tiny"})
    return MultiModalModel(tokenizer=tok, dim=32, **kw)


def assert_same_modules(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_composable_api_and_seed_spelling_build_the_same_model(tok):
    a = build(tok, encoders={"text": "tiny", "image": "tiny"}, fusion="cross_attention", n_classes=5)
    torch.manual_seed(0)
    b = MultiModalTransformer(
        text_encoder="tiny",
        image_encoder="tiny",
        fusion_method="cross_attention",
        n_classes=5,
        dim=32,
        tokenizer=tok,
    )
    assert_same_modules(a, b)
    assert a.config == b.config
    batch = make_batch(tok, modalities=("image", "text"))
    a.eval(), b.eval()
    assert torch.equal(a.logits(batch)[0], b.logits(batch)[0])


def test_seed_names_that_we_do_not_ship_are_config_errors(tok):
    with pytest.raises(ConfigError, match="bert-base.*tiny, small, base"):
        MultiModalTransformer(text_encoder="bert-base", image_encoder="resnet50", tokenizer=tok)


def test_config_builds_the_same_model_as_the_constructor(tok):
    kwargs = dict(
        encoders={"image": {"size": "small", "stem": "conv"}, "text": "tiny", "audio": "tiny"},
        fusion="moe",
        fusion_kwargs={"num_experts": 2, "top_k": 1},
        head="match",
        modality_dropout=0.25,
    )
    model = build(tok, **kwargs)
    cfg = MultiModalConfig.model_validate(
        {
            "encoders": {
                "image": {"size": "small", "stem": "conv"},
                "text": {"vocab_size": tok.vocab_size, "context_length": 16},
                "audio": "tiny",
            },
            "dim": 32,
            "fusion": "moe",
            "fusion_kwargs": {"num_experts": 2, "top_k": 1},
            "head": "match",
            "modality_dropout": 0.25,
        }
    )
    assert cfg == model.config
    torch.manual_seed(0)
    from_cfg = MultiModalModel.from_config(cfg, tok)
    assert [(k, v.shape) for k, v in from_cfg.state_dict().items()] == [
        (k, v.shape) for k, v in model.state_dict().items()
    ]
    assert_same_modules(model, from_cfg)
    # the dumped config validates back to itself (what save_pretrained relies on)
    assert MultiModalConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    assert model.config.encoders["image"].width == 64 and model.config.encoders["image"].depth == 2


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"encoders": {"image": "tiny"}, "colour": 1}, "colour"),
        ({"encoders": {"image": "tiny"}, "fusion": "concat"}, "unknown fusion 'concat'"),
        ({"encoders": {"image": {"size": "tiny", "heads": 0}}}, "heads"),
        ({"encoders": {"depth_map": "tiny"}}, "give its kind"),
        ({"encoders": {}}, "at least one encoder"),
    ],
)
def test_config_errors_name_the_key(bad, match):
    with pytest.raises(ConfigError, match=match):
        MultiModalModel.from_config(bad)


def test_text_encoder_without_vocabulary_is_a_config_error():
    with pytest.raises(ConfigError, match="vocab_size"):
        MultiModalModel(encoders={"text": "tiny", "image": "tiny"})


def test_save_pretrained_round_trip(tok, tmp_path):
    model = build(
        tok, encoders={"image": "tiny", "text": "tiny", "audio": "tiny"}, fusion="router", n_classes=3
    )
    model.eval()
    batch = make_batch(tok)
    batch.mask["audio"][1] = False
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    loaded = MultiModalModel.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert_same_modules(model, loaded)
    assert torch.equal(model.logits(batch)[0], loaded.logits(batch)[0])
    assert loaded.tokenizer.encode(TEXTS).tolist() == tok.encode(TEXTS).tolist()


def test_from_pretrained_rejects_other_folders(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        MultiModalModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "contrastive", "model": {}}')
    with pytest.raises(CheckpointError, match="expected 'multimodal'"):
        MultiModalModel.from_pretrained(tmp_path)


class TinyEncoder(nn.Module):
    """A user encoder: (B, 5) features -> (B, 2, 12) tokens."""

    width = 12

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 24)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).view(x.shape[0], 2, 12)


def test_encoders_can_be_modules(tok, tmp_path):
    model = build(tok, encoders={"image": "tiny", "sensor": TinyEncoder()}, fusion="late")
    assert model.encoders["sensor"].lin.weight.shape == (24, 5)
    batch = make_batch(tok, modalities=("image",))
    batch.data["sensor"] = torch.randn(4, 5)
    batch.mask["sensor"] = torch.tensor([True, False, True, True])
    out = model(batch)
    out.loss.backward()
    assert model.encoders["sensor"].lin.weight.grad is not None
    with pytest.raises(CheckpointError, match="sensor"):
        model.save_pretrained(tmp_path)


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_every_fusion_trains_and_ignores_masked_modalities(tok, fusion):
    model = build(
        tok, encoders={"image": "tiny", "text": "tiny", "audio": "tiny"}, fusion=fusion, n_classes=3
    )
    batch = make_batch(tok)
    batch.mask["image"][1] = False
    batch.mask["audio"][1:3] = False
    out = model(batch)
    assert torch.isfinite(out.loss) and 0.0 <= float(out.metrics["accuracy"]) <= 1.0
    assert torch.allclose(out.loss, out.metrics["task_loss"] + out.metrics["aux_loss"])
    out.loss.backward()
    assert model.encoders["image"].patch_embed.weight.grad is not None

    # a masked modality cannot change predictions: garbage (NaN images, random ids / mels) in absent rows
    model.eval()
    ref = model.logits(batch)[0]
    junk = Batch({k: v.clone() for k, v in batch.data.items()}, batch.mask, batch.meta)
    junk.data["image"][1] = float("nan")
    junk.data["audio"][1:3] = torch.randn(2, 64, 51) * 100
    assert torch.equal(model.logits(junk)[0], ref)
    assert torch.equal(model.predict(junk), ref.argmax(dim=-1))
    if fusion == "moe":  # expert capacity couples the rows of a batch; the rest holds for every strategy
        return
    # a row's prediction depends only on its own present inputs: removing other rows does not change it
    alone = Batch({k: v[1:2] for k, v in junk.data.items()}, {k: v[1:2] for k, v in batch.mask.items()})
    assert torch.allclose(model.logits(alone)[0], ref[1:2], atol=1e-5)


def test_a_modality_absent_from_the_whole_batch(tok):
    model = build(tok, encoders={"image": "tiny", "text": "tiny"}, fusion="late").eval()
    batch = make_batch(tok, modalities=("image", "text"))
    batch.mask["image"][:] = False
    batch.data["image"][:] = float("nan")
    logits, _ = model.logits(batch)
    assert torch.isfinite(logits).all()


def test_modality_dropout_never_drops_every_modality():
    g = torch.Generator().manual_seed(0)
    b = 4000
    masks = {m: torch.rand(b, generator=g) < 0.7 for m in ("image", "text", "audio")}
    present = torch.stack(list(masks.values()), dim=1)
    for p in (0.3, 0.9, 0.99):
        kept = torch.stack(list(modality_dropout(masks, p, generator=g).values()), dim=1)
        assert not (kept & ~present).any()  # never adds a modality
        assert torch.equal(kept.any(dim=1), present.any(dim=1))  # never empties a sample
    kept = torch.stack(list(modality_dropout(masks, 0.3, generator=g).values()), dim=1)
    several = present.sum(dim=1) == 3  # with all three present the rescue almost never triggers at p=0.3
    rate = 1 - kept[several].float().mean().item()
    assert 0.27 < rate < 0.33


def test_modality_dropout_only_in_training(tok):
    model = build(tok, encoders={"image": "tiny", "text": "tiny"}, fusion="early", modality_dropout=0.5)
    batch = make_batch(tok, b=16, modalities=("image", "text"))
    model.eval()
    a, b = model.logits(batch)[0], model.logits(batch)[0]
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(1)
    c = model.logits(batch)[0]
    assert not torch.allclose(a, c)  # dropout changed some rows in training mode


def test_missing_modality_eval_reports_each_removal(tok):
    model = build(tok, encoders={"image": "tiny", "text": "tiny"}, fusion="late", n_classes=2)
    model.train()
    batches = [make_batch(tok, modalities=("image", "text"), seed=s) for s in range(2)]
    report = missing_modality_eval(model, batches)
    assert set(report) == {"all", "without_image", "without_text"}
    assert all(0.0 <= v <= 1.0 for v in report.values())
    assert model.training  # mode restored
    # removing the text must equal predicting with its mask off
    model.eval()
    b = batches[0]
    off = Batch(b.data, {"image": b.mask["image"], "text": torch.zeros(4, dtype=torch.bool)})
    acc = (model.predict(off) == b.data["label"]).float().mean().item()
    single = missing_modality_eval(model, [b])
    assert single["without_text"] == pytest.approx(acc)


def test_cross_attention_query_defaults(tok):
    def query(encoders):
        return MultiModalConfig(encoders=encoders).fusion_kwargs["query_modality"]

    assert query({"audio": "tiny", "image": "tiny"}) == "image"
    assert query({"video": "tiny", "text": {"vocab_size": 64}}) == "text"
    assert query({"audio": "tiny", "video": "tiny"}) == "video"
    cfg = MultiModalConfig(
        encoders={"audio": "tiny", "image": "tiny"}, fusion_kwargs={"query_modality": "audio"}
    )
    assert cfg.fusion_kwargs["query_modality"] == "audio"


def test_align_loss_is_infonce_over_positive_pairs(tok):
    model = build(tok, head="match", align_loss=0.5)
    batch = make_batch(tok, b=6, modalities=("image", "text"))  # labels 0,1,0,1,0,1
    fused, feats, masks = model.encode_with_tokens(batch)
    rows = batch.data["label"] == 1
    za = nn.functional.normalize(model.align_proj["image"](feats["image"][rows].mean(1)), dim=-1)
    zb = nn.functional.normalize(model.align_proj["text"](feats["text"][rows].mean(1)), dim=-1)
    sim = model.align_scale.exp() * za @ zb.t()
    t = torch.arange(3)
    expected = (nn.functional.cross_entropy(sim, t) + nn.functional.cross_entropy(sim.t(), t)) / 2
    got = model.alignment_loss(feats, masks, batch.data["label"])
    torch.testing.assert_close(got, expected)
    out = model(batch)
    assert out.metrics["align_loss"] > 0
    model.eval()
    assert "align_loss" not in model(batch).metrics  # a training-only loss
    one_positive = torch.tensor([1, 0, 0, 0, 0, 0])
    assert model.alignment_loss(feats, masks, one_positive).item() == 0.0


def test_align_loss_needs_a_two_modality_match_head(tok):
    with pytest.raises(ConfigError, match="align_loss"):
        build(tok, head="classify", align_loss=1.0)
    with pytest.raises(ConfigError, match="exactly two encoders"):
        build(tok, head="match", align_loss=1.0, encoders={"image": "tiny", "text": "tiny", "audio": "tiny"})


def test_router_pruning_skips_encoders_under_the_threshold(tok):
    model = build(tok, fusion="router", n_classes=3).eval()
    batch = make_batch(tok, b=6, modalities=("image", "text"))
    means = calibrate_pruning(model, [batch])
    assert set(means) == {"image", "text"} and means["image"].shape == (32,)
    calls = []
    model.encoders["text"].transformer.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    pred, skipped = predict_pruned(model, means, batch, 0.0, candidates=["text"])  # a gate is never < 0
    assert torch.equal(pred, model.predict(batch)) and not skipped["text"].any()
    calls.clear()
    pred, skipped = predict_pruned(model, means, batch, 1.01, candidates=["text"])  # every gate is < 1.01
    assert skipped["text"].all()
    assert calls == [1]  # only the 1-row shape probe for the all-absent modality; no real text encoding
    no_text = Batch(batch.data, {"image": batch.mask["image"], "text": torch.zeros(6, dtype=torch.bool)})
    assert torch.equal(pred, model.predict(no_text))
    # a row whose only modality is the candidate is never skipped
    only_text = Batch(batch.data, {"image": torch.tensor([False] + [True] * 5), "text": batch.mask["text"]})
    _, skipped = predict_pruned(model, means, only_text, 1.01, candidates=["text"])
    assert skipped["text"].tolist() == [False] + [True] * 5
    with pytest.raises(ConfigError, match="strict subset"):
        predict_pruned(model, means, batch, 0.5, candidates=["image", "text"])
    with pytest.raises(ConfigError, match="router"):
        calibrate_pruning(build(tok, fusion="late"), [batch])


def test_encode_each_modality_from_raw_inputs(tok):
    import numpy as np

    model = build(tok, encoders={"image": "tiny", "text": "tiny", "audio": "tiny", "video": "tiny"})
    rng = np.random.default_rng(0)
    text = model.encode_text(["a small red circle", "is there a blue cross?"])
    image = model.encode_image([rng.integers(0, 255, (40, 24, 3), dtype=np.uint8)] * 2)
    # the same tone at 8 kHz and at 16 kHz: resampled to the model's rate, nearly the same embedding
    t8, t16 = np.arange(8000) / 8000, np.arange(16000) / 16000
    audio = model.encode_audio(
        [np.sin(2 * np.pi * 440 * t8).astype(np.float32), np.sin(2 * np.pi * 440 * t16).astype(np.float32)],
        [8000, 16000],
    )
    video = model.encode_video([rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)])
    for emb, n in ((text, 2), (image, 2), (audio, 2), (video, 1)):
        assert emb.shape == (n, 32)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(n))
    assert torch.equal(image[0], image[1])
    assert torch.nn.functional.cosine_similarity(audio[0], audio[1], dim=0) > 0.99
    # the embedding is the mean of the projected tokens that the fusion sees
    ids = tok.encode(["a small red circle"])
    tokens = model.projections["text"](model.encoders["text"].forward_tokens(ids))
    torch.testing.assert_close(text[:1], torch.nn.functional.normalize(tokens.mean(1), dim=-1))
    with pytest.raises(ConfigError, match="no audio encoder"):
        build(tok).encode_audio([np.zeros(100, np.float32)], 16000)
