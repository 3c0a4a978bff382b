"""ModalityLinear.split: the row-block products equal forward(...).chunk(...), and wrapped layers keep their forward."""

import torch

from mmfusion.unified.layers import ModalityLinear


def test_split_equals_chunk_of_forward():
    torch.manual_seed(0)
    x, mod = torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.long)
    for per_modality, bias in ((False, False), (False, True), (True, True)):
        layer = ModalityLinear(8, 12, per_modality, bias=bias)
        parts = layer.split(x, mod, 3)
        assert all(p.is_contiguous() for p in parts) or per_modality
        for got, want in zip(parts, layer(x, mod).chunk(3, dim=-1), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_split_runs_the_layer_forward_when_it_is_hooked():
    torch.manual_seed(0)
    layer = ModalityLinear(8, 12, per_modality=False)
    x, mod = torch.randn(1, 3, 8), torch.zeros(1, 3, dtype=torch.long)
    layer.linears[0].register_forward_hook(lambda m, inp, out: out + 1.0)  # e.g. an adapter's delta
    q, _, _ = layer.split(x, mod, 3)
    torch.testing.assert_close(q, (x @ layer.linears[0].weight[:4].T) + 1.0, rtol=0, atol=1e-6)
