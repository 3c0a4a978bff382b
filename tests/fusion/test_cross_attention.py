import pytest
import torch

from mmfusion.fusion.base import AllModalitiesAbsentError
from mmfusion.fusion.cross_attention import (
    CrossAttention,
    CrossAttentionFusion,
    CrossModalAttentionUnit,
    GatedCrossAttentionBlock,
)


def _fusion(gated: bool, alpha: float = 0.0):
    torch.manual_seed(0)
    fusion = CrossAttentionFusion(
        ["text", "image", "audio"], 8, query_modality="text", gated=gated, depth=2, heads=2
    )
    if gated:
        with torch.no_grad():
            for block in fusion.blocks:
                block.alpha_attn.fill_(alpha)
                block.alpha_ff.fill_(alpha)
    return fusion


@pytest.mark.parametrize("gated", [False, True])
def test_shapes(make_inputs, gated):
    feats, masks = make_inputs()
    out = _fusion(gated)(feats, masks)
    assert out.pooled.shape == (4, 8)
    assert out.tokens.shape == (4, 4, 8)  # the text (query) stream
    assert out.aux_loss.item() == 0.0
    assert out.info["query_present"].tolist() == [True, False, True, True]
    assert _fusion(gated).context_modalities == (["audio", "image"] if gated else ["audio", "image", "text"])


@pytest.mark.parametrize("gated", [False, True])
def test_masked_modality_cannot_change_output(make_inputs, assert_mask_invariant, gated):
    feats, masks = make_inputs()
    assert_mask_invariant(_fusion(gated, alpha=0.7), feats, masks)


def test_context_modalities_change_query_stream(make_inputs):
    feats, masks = make_inputs()
    fusion = _fusion(gated=False)
    ref = fusion(feats, masks)
    out = fusion({**feats, "image": feats["image"].flip(-1)}, masks)
    assert not torch.allclose(out.pooled[0], ref.pooled[0])


def test_gated_block_is_identity_at_init():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(8, heads=2)
    x, ctx = torch.randn(3, 5, 8), torch.randn(3, 6, 8)
    valid = torch.tensor([[True] * 6, [True, False] * 3, [False] * 6])
    assert torch.equal(block(x, ctx, valid), x)
    with torch.no_grad():
        block.alpha_attn.fill_(0.5)
    y = block(x, ctx, valid)
    assert not torch.equal(y[0], x[0])
    assert torch.equal(y[2], x[2])  # no valid key: attention adds exactly 0, alpha_ff is still 0


def test_cross_attention_without_keys_gives_zero_not_nan():
    torch.manual_seed(0)
    attn = CrossAttention(8, heads=2)
    y = attn(
        torch.randn(2, 3, 8), torch.randn(2, 4, 8), torch.tensor([[True, False, True, False], [False] * 4])
    )
    assert torch.isfinite(y).all()
    assert torch.equal(y[1], torch.zeros(3, 8))


def test_cmau_shapes():
    torch.manual_seed(0)
    unit = CrossModalAttentionUnit(8, heads=2)
    assert unit(torch.randn(2, 3, 8), torch.randn(2, 7, 8), torch.ones(2, 7, dtype=torch.bool)).shape == (
        2,
        3,
        8,
    )


def test_all_absent_raises_naming_samples(make_inputs):
    feats, masks = make_inputs(present={m: [True, False, True, False] for m in ("text", "image", "audio")})
    with pytest.raises(AllModalitiesAbsentError, match=r"sample\(s\) \[1, 3\]") as err:
        _fusion(gated=False)(feats, masks)
    assert isinstance(err.value, ValueError)


def test_bad_query_modality():
    with pytest.raises(ValueError, match="query_modality 'video' is not one of"):
        CrossAttentionFusion(["text", "image"], 8, query_modality="video")
    with pytest.raises(ValueError, match="besides the query modality"):
        CrossAttentionFusion(["text"], 8, query_modality="text", gated=True)
