"""The tiny randomised joint diffusion model the diffusion tests share."""

from __future__ import annotations

import pytest
import torch

from diffusion_tiny import randomised, tiny_config
from mmfusion.diffusion.model import JointDiffusion


@pytest.fixture
def tiny_model() -> JointDiffusion:
    torch.manual_seed(0)
    return randomised(JointDiffusion(tiny_config()))
