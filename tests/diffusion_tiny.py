"""Tiny joint diffusion models shared by tests/diffusion (a module on pytest's pythonpath, like tiny_lm.py)."""

from __future__ import annotations

import torch

from mmfusion.diffusion.config import DiffusionModelConfig
from mmfusion.diffusion.model import JointDiffusion


def tiny_config(**kw) -> DiffusionModelConfig:
    base = dict(image_size=8, patch=4, text_len=8, text_dim=8, width=16, depth=1, heads=2, timesteps=50)
    return DiffusionModelConfig(**{**base, **kw})


def randomised(model: JointDiffusion, seed: int = 0) -> JointDiffusion:
    """The model with every weight (the zero-initialised heads too) drawn at random, EMA copied from it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.ema_net.load_state_dict(model.net.state_dict())
    return model.eval()


def transformer_inputs(nets: dict[str, torch.nn.Module], *args) -> dict[str, torch.Tensor]:
    """name -> the token sequence each denoiser's transformer receives on net(*args) (a forward pre-hook)."""
    seen = {}
    for name, net in nets.items():
        hook = net.transformer.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0]))
        net(*args)
        hook.remove()
    return seen
