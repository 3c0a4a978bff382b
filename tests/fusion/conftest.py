"""Shared fixtures for fusion tests: seeded tiny inputs and the masked-modality invariance check."""

import pytest
import torch

MODALITIES = ["text", "image", "audio"]  # deliberately unsorted: fusions sort them
LENGTHS = {"text": 4, "image": 3, "audio": 2}
# Sample 0: all present; 1: text absent; 2: only text; 3: audio absent.
PRESENT = {
    "text": [True, False, True, True],
    "image": [True, True, False, True],
    "audio": [True, True, False, False],
}


def _make_inputs(seed: int = 0, dim: int = 8, present: dict[str, list[bool]] | None = None):
    g = torch.Generator().manual_seed(seed)
    present = present or PRESENT
    b = len(next(iter(present.values())))
    feats = {m: torch.randn(b, LENGTHS[m], dim, generator=g) for m in MODALITIES}
    masks = {m: torch.tensor(present[m]) for m in MODALITIES}
    return feats, masks


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return torch.equal(a, b)


def _assert_mask_invariant(fusion, feats, masks, seed: int = 1) -> None:
    """Replacing absent modalities' rows with noise (or NaN) must not change any output tensor."""
    torch.manual_seed(0)
    ref = fusion(feats, masks)
    g = torch.Generator().manual_seed(seed)
    for fill in ("noise", "nan"):
        noisy = {}
        for m, x in feats.items():
            junk = (
                torch.randn(x.shape, generator=g) * 100
                if fill == "noise"
                else torch.full_like(x, float("nan"))
            )
            noisy[m] = torch.where(masks[m][:, None, None], x, junk)
        assert any(not torch.equal(noisy[m], feats[m]) for m in feats)
        torch.manual_seed(0)
        out = fusion(noisy, masks)
        assert torch.equal(out.pooled, ref.pooled), fill
        assert _same(out.tokens, ref.tokens), fill
        assert torch.equal(out.aux_loss, ref.aux_loss), fill
        assert ref.info.keys() == out.info.keys()
        for key in ref.info:
            assert torch.equal(out.info[key], ref.info[key]), (fill, key)
        assert torch.isfinite(out.pooled).all()


@pytest.fixture
def make_inputs():
    return _make_inputs


@pytest.fixture
def assert_mask_invariant():
    return _assert_mask_invariant
