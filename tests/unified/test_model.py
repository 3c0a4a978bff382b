import math

import pytest
import torch

from mmfusion.errors import CheckpointError, ConfigError, DataError
from mmfusion.unified import model as model_mod
from mmfusion.unified.model import (
    AUDIO,
    IMAGE,
    TEXT,
    UnifiedConfig,
    UnifiedDecoder,
    unified_loss,
)

V = 40
VARIANTS = {
    "plain": {},
    "window": {"image_window": 3},
    "window_alternate": {"image_window": 2, "window_layers": "alternate"},
    "modality_aware": {"modality_aware": True},
    "sparse_topk": {"sparse_topk": 4},
    "hierarchical": {"hierarchical_layers": 1},
    "modality_gate": {"modality_gate": True},
    "swiglu": {"mlp": "swiglu", "qk_norm": False},
    "all": {
        "image_window": 3,
        "modality_aware": True,
        "sparse_topk": 5,
        "tie_embeddings": False,
        "hierarchical_layers": 1,
        "modality_gate": True,
    },
}


def tiny(**kw) -> UnifiedDecoder:
    torch.manual_seed(0)
    return UnifiedDecoder(UnifiedConfig(vocab_size=V, dim=16, depth=2, heads=2, max_len=400, **kw)).eval()


def mixed(batch: int = 2, t: int = 18, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mod = torch.tensor([TEXT] * 4 + [IMAGE] * 9 + [TEXT] * 2 + [AUDIO] * (t - 15)).repeat(batch, 1)
    return torch.randint(0, V, (batch, t), generator=g), mod


def test_config_validation_and_round_trip():
    cfg = UnifiedConfig(vocab_size=100, image_window=8, modality_aware=True)
    assert UnifiedConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"unknown UnifiedConfig keys \['widht'\]"):
        UnifiedConfig.from_dict({"vocab_size": 10, "widht": 3})
    with pytest.raises(ConfigError, match="UnifiedConfig.dim = 30: expected a multiple of heads"):
        UnifiedConfig(vocab_size=10, dim=30, heads=4)
    with pytest.raises(ConfigError, match="window_layers = 'odd'"):
        UnifiedConfig(vocab_size=10, window_layers="odd")
    with pytest.raises(ConfigError, match="sparse_topk = 0"):
        UnifiedConfig(vocab_size=10, sparse_topk=0)
    with pytest.raises(ConfigError, match=r"hierarchical_layers = 5: expected an integer in \[0, depth=4\]"):
        UnifiedConfig(vocab_size=10, hierarchical_layers=5)
    with pytest.raises(ConfigError, match="gate_openness needs a model built with"):
        tiny().gate_openness(*mixed())
    with pytest.raises(ConfigError, match="at least one cross-modal layer"):
        tiny(modality_gate=True, hierarchical_layers=2).gate_openness(*mixed())
    alt = UnifiedConfig(vocab_size=10, image_window=4, window_layers="alternate")
    assert [alt.layer_window(i) for i in range(4)] == [4, None, 4, None]


@pytest.mark.parametrize("variant", VARIANTS)
def test_changing_token_j_leaves_earlier_logits_unchanged(variant):
    m = tiny(**VARIANTS[variant])
    ids, mod = mixed()
    j = 9
    changed = ids.clone()
    changed[:, j] = (changed[:, j] + 7) % V
    with torch.no_grad():
        a, b = m(ids, mod).logits, m(changed, mod).logits
    assert (a[:, :j] - b[:, :j]).abs().max().item() < 1e-5
    assert (a[:, j] - b[:, j]).abs().max().item() > 1e-4  # the change is seen from position j on


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_decoding_equals_full_recomputation(variant):
    m = tiny(**VARIANTS[variant])
    ids, mod = mixed()
    with torch.no_grad():
        full = m(ids, mod).logits
        parts, cache = [], None
        for s, e in [(0, 5), (5, 6), (6, 11), (11, 12), (12, 13), (13, 18)]:  # prompt, single tokens, chunks
            out = m(ids[:, s:e], mod[:, s:e], cache=cache, use_cache=True)
            parts.append(out.logits)
            cache = out.cache
    assert cache.length == 18 and cache.keys[0].shape == (2, 2, 18, 8)
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-4


def test_top_k_covering_every_key_equals_dense_attention():
    ids, mod = mixed()
    with torch.no_grad():
        dense = tiny()(ids, mod).logits
        assert (tiny(sparse_topk=18)(ids, mod).logits - dense).abs().max().item() < 1e-5
        assert (tiny(sparse_topk=4)(ids, mod).logits - dense).abs().max().item() > 1e-4


def test_image_window_limits_what_image_queries_see():
    torch.manual_seed(0)
    m = UnifiedDecoder(UnifiedConfig(vocab_size=V, dim=16, depth=1, heads=2, image_window=3)).eval()
    ids, mod = mixed(batch=1)
    changed = ids.clone()
    changed[0, 5] = (changed[0, 5] + 1) % V  # an image token
    with torch.no_grad():
        d = (m(ids, mod).logits - m(changed, mod).logits)[0].abs().amax(-1)
    # one layer, window 3: image queries 6 and 7 still see key 5, image query 8 (keys 6..8) does not;
    # text query 13 sees its whole prefix
    assert d[6] > 1e-4 and d[7] > 1e-4
    assert d[8] == 0 and d[12] == 0
    assert d[13] > 1e-4


def test_block_sparse_window_path_equals_masked_path(monkeypatch):
    torch.manual_seed(0)
    m = UnifiedDecoder(
        UnifiedConfig(vocab_size=V, dim=16, depth=2, heads=2, max_len=400, image_window=20)
    ).eval()
    mod = torch.tensor([[TEXT] * 10 + [IMAGE] * 256 + [TEXT] * 8 + [IMAGE] * 26])
    ids = torch.randint(0, V, mod.shape)
    with torch.no_grad():
        blocked = m(ids, mod, attn_logit=True)
        monkeypatch.setattr(model_mod, "WINDOW_BLOCK", 10_000)  # forces the masked-SDPA path
        masked = m(ids, mod, attn_logit=True)
    assert (blocked.logits - masked.logits).abs().max().item() < 1e-5
    assert blocked.max_attn_logit == pytest.approx(masked.max_attn_logit, rel=1e-6)


def _change(ids: torch.Tensor, pos: int) -> torch.Tensor:
    changed = ids.clone()
    changed[:, pos] = (changed[:, pos] + 1) % V
    return changed


def test_hierarchical_layers_attend_within_the_modality_first():
    ids, mod = mixed(batch=1)  # text 0-3, image 4-12, text 13-14, audio 15-17
    changed = _change(ids, 5)  # an image token
    with torch.no_grad():
        intra = tiny(hierarchical_layers=2)  # both layers intra-modal
        d = (intra(ids, mod).logits - intra(changed, mod).logits)[0].abs().amax(-1)
        assert d[5:13].min() > 1e-4  # image queries see the image token
        assert d[13:].max() == 0.0  # text and audio queries never do: exactly unchanged
        fused = tiny(hierarchical_layers=1)  # layer 0 intra-modal, layer 1 cross-modal
        d = (fused(ids, mod).logits - fused(changed, mod).logits)[0].abs().amax(-1)
        assert d[13:].min() > 1e-4  # the cross-modal layer brings the image into text and audio


def _set_gates(model: UnifiedDecoder, bias: float, key_modality: int | None = None) -> None:
    """Gate pre-activations = bias for every head (for one key modality, or all) and every query token."""
    for block in model.blocks:
        gate = block.attn.gate
        if gate is None:  # an intra-modal layer
            continue
        torch.nn.init.zeros_(gate.weight)
        view = gate.bias.data.view(model.cfg.heads, 3)
        if key_modality is None:
            view.fill_(bias)
        else:
            view[:, key_modality] = bias


def test_modality_gate_limits_and_sparsity():
    ids, mod = mixed()
    gated = tiny(modality_gate=True)
    state = {k: v for k, v in gated.state_dict().items() if ".gate." not in k}
    plain, intra = tiny(), tiny(hierarchical_layers=2)
    plain.load_state_dict(state)
    intra.load_state_dict(state)
    with torch.no_grad():
        _set_gates(gated, 10.0)  # every gate exactly 1: plain attention
        assert (gated(ids, mod).logits - plain(ids, mod).logits).abs().max().item() < 1e-5
        _set_gates(gated, -10.0)  # every gate exactly 0: each query sees only its own modality
        assert (gated(ids, mod).logits - intra(ids, mod).logits).abs().max().item() < 1e-5
        stats = gated.gate_openness(ids, mod)
    assert stats["text->image"] == 0.0 and stats["text->image closed"] == 1.0
    assert set(stats) == {f"{q}->{k}{c}" for q in ("text", "image", "audio") for k in ("text", "image", "audio")
                          if q != k for c in ("", " closed")}  # fmt: skip


def test_closing_one_gate_removes_that_modality_only():
    ids, mod = mixed(batch=1)  # text 0-3, image 4-12, text 13-14, audio 15-17
    m = tiny(modality_gate=True)
    with torch.no_grad():
        assert m.gate_openness(ids, mod)["text->image"] == pytest.approx(
            1.2 * torch.sigmoid(torch.tensor(2.0)).item() - 0.1, abs=0.05
        )
        _set_gates(m, -10.0, key_modality=IMAGE)  # nobody attends to image keys (image queries still do: own)
        assert m.gate_openness(ids, mod)["text->image closed"] == 1.0
        assert m.gate_openness(ids, mod)["text->audio closed"] == 0.0
        d = (m(ids, mod).logits - m(_change(ids, 5), mod).logits)[0].abs().amax(-1)
    assert d[5:13].min() > 1e-4 and d[13:].max() == 0.0  # text and audio no longer see the image


def test_gates_get_gradients_and_stay_finite_when_closed():
    ids, mod = mixed()
    m = tiny(modality_gate=True, hierarchical_layers=1).train()
    with torch.no_grad():
        m.blocks[1].attn.gate.bias.data.view(2, 3)[0, IMAGE] = -10.0  # head 0 of layer 1: image keys closed
    out = m(ids, mod)
    loss = unified_loss(out.logits, ids, mod, torch.ones_like(ids, dtype=torch.bool), 1e-4)["loss"]
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    assert m.blocks[1].attn.gate.weight.grad.abs().sum() > 0
    assert m.blocks[0].attn.gate is None  # layer 0 is intra-modal: nothing to gate


def test_modality_ids_matter_only_with_modality_aware_weights():
    ids, mod = mixed(batch=1)
    relabelled = mod.clone()
    relabelled[0, 2] = IMAGE
    for aware in (False, True):
        m = tiny(modality_aware=aware)
        with torch.no_grad():
            d = (m(ids, mod).logits - m(ids, relabelled).logits).abs()
        assert d[:, :2].max().item() == 0.0
        if aware:
            assert d[:, 2].max().item() > 1e-4
            assert len(m.blocks[0].attn.qkv.linears) == 3
        else:
            assert d.max().item() == 0.0


def test_qk_norm_bounds_the_attention_logit():
    # with RMSNorm'd q and k (unit gains) |q.k| / sqrt(d) <= sqrt(d), however large the weights get
    ids, mod = mixed()
    for qk_norm in (True, False):
        m = tiny(qk_norm=qk_norm)
        with torch.no_grad():
            for block in m.blocks:
                block.attn.qkv.linears[0].weight.mul_(100.0)
        assert math.isnan(m(ids, mod).max_attn_logit)  # eval mode: not computed unless asked
        logit = m(ids, mod, attn_logit=True).max_attn_logit
        if qk_norm:
            assert 1.0 < logit <= math.sqrt(8) + 1e-4
        else:
            assert logit > 100
    assert not math.isnan(tiny().train()(ids, mod).max_attn_logit)  # training mode: computed


def test_tied_head_uses_the_embedding():
    m = tiny()
    ids, mod = mixed()
    assert m.head is None
    final = []
    m.norm.register_forward_hook(lambda mod_, inp, out: final.append(out))
    logits = m(ids, mod).logits
    assert torch.allclose(logits, final[0] @ m.embed.weight.T, atol=1e-6)
    assert not any("head" in k for k in m.state_dict())


@pytest.mark.parametrize("variant", ["plain", "all", "swiglu"])
def test_save_and_load_round_trip(tmp_path, variant):
    m = tiny(**VARIANTS[variant])
    ids, mod = mixed()
    m.save_pretrained(tmp_path / "m")
    loaded = UnifiedDecoder.from_pretrained(tmp_path / "m")
    assert loaded.cfg == m.cfg
    assert torch.equal(loaded(ids, mod).logits, m(ids, mod).logits)
    (tmp_path / "m" / "config.json").write_text('{"model_type": "contrastive", "model": {}}')
    with pytest.raises(CheckpointError, match="model_type is 'contrastive'; expected 'unified_decoder'"):
        UnifiedDecoder.from_pretrained(tmp_path / "m")


def test_input_errors_name_the_problem():
    m = tiny()
    ids, mod = mixed()
    with pytest.raises(DataError, match=r"token ids must lie in \[0, 40\); got \[-1, 40\]"):
        m(torch.tensor([[3, -1, 40]]), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(DataError, match="exceeds max_len 400"):
        m(torch.zeros(1, 401, dtype=torch.long), torch.zeros(1, 401, dtype=torch.long))
    with pytest.raises(DataError, match=r"ids and modality must both be \(batch, T\)"):
        m(ids, mod[:, :3])


def test_unified_loss_hand_checked_values():
    # uniform logits over 4 ids: ce = log Z = log 4 at every counted position
    ids = torch.tensor([[1, 2, 3, 0, 0]])
    mod = torch.tensor([[TEXT, IMAGE, IMAGE, TEXT, TEXT]])
    mask = torch.tensor([[False, True, True, True, False]])  # the last target is padding
    logits = torch.zeros(1, 5, 4)
    out = unified_loss(logits, ids, mod, mask, z_loss=0.1)
    assert out["ce"].item() == pytest.approx(math.log(4))
    assert out["z_loss"].item() == pytest.approx(math.log(4) ** 2)
    assert out["loss"].item() == pytest.approx(math.log(4) + 0.1 * math.log(4) ** 2)
    assert out["log_z_abs"].item() == pytest.approx(math.log(4))
    assert (out["n_text"].item(), out["n_image"].item(), out["n_audio"].item()) == (1, 2, 0)
    # shifted labels: position t predicts ids[t+1]; a confident right guess at t=0 (target ids[1]=2)
    logits[0, 0, 2] = 20.0
    out = unified_loss(logits, ids, mod, mask, z_loss=0.0)
    expected_0 = math.log(math.exp(20) + 3) - 20
    assert out["ce"].item() == pytest.approx((expected_0 + 2 * math.log(4)) / 3, abs=1e-5)
    assert out["ce_image"].item() == pytest.approx((expected_0 + math.log(4)) / 2, abs=1e-5)
    assert out["ce_text"].item() == pytest.approx(math.log(4), abs=1e-6)
    # positions whose target is masked count in neither ce nor the z term
    before = unified_loss(logits, ids, mod, mask, z_loss=1.0)
    logits[0, 3] = torch.tensor([50.0, -9.0, 3.0, 7.0])  # predicts ids[4], which is padding
    logits[0, 4] = 99.0  # the last position predicts nothing
    after = unified_loss(logits, ids, mod, mask, z_loss=1.0)
    for key in ("loss", "ce", "z_loss", "log_z_abs"):
        assert after[key].item() == pytest.approx(before[key].item())
    with pytest.raises(DataError, match="selects no target tokens"):
        unified_loss(logits, ids, mod, torch.tensor([[True, False, False, False, False]]), 0.0)


def test_per_modality_losses_token_weighted_mean_equals_ce():
    m = tiny()
    ids, mod = mixed(batch=3, t=20)
    mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) > 0.3
    out = unified_loss(m(ids, mod).logits, ids, mod, mask, z_loss=1e-4)
    n = [out[f"n_{k}"] for k in ("text", "image", "audio")]
    assert sum(n).item() == mask[:, 1:].sum().item() and all(x > 0 for x in n)
    weighted = sum(out[f"ce_{k}"] * out[f"n_{k}"] for k in ("text", "image", "audio")) / sum(n)
    assert weighted.item() == pytest.approx(out["ce"].item(), abs=1e-6)


def test_training_learns_a_sequence_and_z_loss_lowers_log_z():
    # a fixed 3-token cycle per row; 80 AdamW steps at lr 3e-3 (budget in steps)
    base = torch.tensor([[5, 9, 13] * 6, [20, 25, 30] * 6])
    mod = torch.tensor([[TEXT] * 6 + [IMAGE] * 12] * 2)
    mask = torch.ones_like(base, dtype=torch.bool)
    results = {}
    for z in (0.0, 0.1):
        torch.manual_seed(0)
        m = UnifiedDecoder(UnifiedConfig(vocab_size=V, dim=16, depth=1, heads=2, z_loss=z)).train()
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        for _ in range(80):
            out = unified_loss(m(base, mod).logits, base, mod, mask, z_loss=m.cfg.z_loss)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        results[z] = {k: v.item() for k, v in out.items()}
    assert results[0.0]["ce"] < 0.5 * math.log(V)
    assert results[0.1]["ce"] < 0.5 * math.log(V)
    assert results[0.1]["log_z_abs"] <= 0.8 * results[0.0]["log_z_abs"]
