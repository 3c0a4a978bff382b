import pytest
import torch

from mmfusion.errors import ConfigError
from mmfusion.fusion import FUSIONS, Fusion, FusionOutput, build_fusion

KWARGS = {"cross_attention": {"query_modality": "text", "heads": 2}, "early": {"depth": 1, "heads": 2}}


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_build_every_fusion(make_inputs, name):
    torch.manual_seed(0)
    fusion = build_fusion(name, ["text", "image", "audio"], 8, **KWARGS.get(name, {}))
    assert isinstance(fusion, Fusion) and type(fusion) is FUSIONS[name]
    feats, masks = make_inputs()
    out = fusion(feats, masks)
    assert isinstance(out, FusionOutput)
    assert out.pooled.shape == (4, 8) and out.aux_loss.ndim == 0
    assert torch.isfinite(out.pooled).all()


def test_table_names():
    assert sorted(FUSIONS) == ["cross_attention", "early", "late", "moe", "router"]


def test_unknown_name_lists_allowed():
    with pytest.raises(
        ConfigError, match="unknown fusion 'concat'; allowed: cross_attention, early, late, moe, router"
    ):
        build_fusion("concat", ["text"], 8)
