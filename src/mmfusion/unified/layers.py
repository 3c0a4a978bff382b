"""`ModalityLinear`: the unified decoder's Linear layer, shared or one per modality (modality-aware weights)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

N_MODALITIES = 3  # == len(model.MODALITY_NAMES) (text, image, audio); repeated to avoid an import cycle


class ModalityLinear(nn.Module):
    """A Linear layer, or one per modality (modality-aware weights): row t goes through modality[t]'s weights."""

    def __init__(self, d_in: int, d_out: int, per_modality: bool, bias: bool = False):
        super().__init__()
        n = N_MODALITIES if per_modality else 1
        self.linears = nn.ModuleList(nn.Linear(d_in, d_out, bias=bias) for _ in range(n))

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        # x: (batch, T, d_in); modality: (batch, T)
        if len(self.linears) == 1:
            return self.linears[0](x)
        out = x.new_zeros(*x.shape[:-1], self.linears[0].out_features)
        for m, linear in enumerate(self.linears):
            sel = modality == m
            if sel.any():
                out[sel] = linear(x[sel])
        return out

    def split(self, x: torch.Tensor, modality: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """`forward(x, modality).chunk(parts, -1)`; with one shared Linear, as `parts` products with row blocks
        of its weight, so each part is contiguous (element-wise ops on chunk views run ~2x slower on CPU)."""
        linear = self.linears[0]
        # anything but a plain, hook-free nn.Linear (a peft LoRA layer, a quantized Linear) runs its own forward
        if (
            len(self.linears) > 1
            or type(linear) is not nn.Linear
            or linear._forward_hooks
            or linear._forward_pre_hooks
        ):
            return self(x, modality).chunk(parts, dim=-1)
        biases = linear.bias.chunk(parts) if linear.bias is not None else (None,) * parts
        return tuple(F.linear(x, w, b) for w, b in zip(linear.weight.chunk(parts), biases, strict=True))


__all__ = ["ModalityLinear"]
