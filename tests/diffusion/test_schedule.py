"""The noise schedule and the DDIM update: exact values on small schedules, oracle round-trips."""

from __future__ import annotations

import pytest
import torch

from mmfusion.diffusion.schedule import NoiseSchedule, timestep_embedding
from mmfusion.errors import ConfigError


def test_linear_schedule_values():
    s = NoiseSchedule(1000, "linear")
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)
    assert s.alpha_bar[0].item() == pytest.approx(1 - 1e-4)
    assert s.alpha_bar[1].item() == pytest.approx((1 - 1e-4) * (1 - s.betas[1].item()))


def test_cosine_schedule_values_by_hand():
    # f(t) = cos^2(((t / 4) + 0.008) / 1.008 * pi / 2); alpha_bar[t] = f(t + 1) / f(0); last beta clipped at 0.999
    s = NoiseSchedule(4, "cosine")
    expected = [0.8470121613269047, 0.49384359044063775, 0.1442721023857358, 0.1442721023857358 * 0.001]
    assert s.alpha_bar.tolist() == pytest.approx(expected, rel=1e-9)


def test_ddim_timesteps_and_errors():
    s = NoiseSchedule(1000)
    assert s.ddim_timesteps(5) == [999, 749, 500, 250, 0]
    assert s.ddim_timesteps(1) == [999]
    with pytest.raises(ConfigError, match="DDIM steps must be in"):
        s.ddim_timesteps(0)
    with pytest.raises(ConfigError, match="expected 'cosine' or 'linear'"):
        NoiseSchedule(10, "sigmoid")


def test_ddim_one_step_with_oracle_noise_recovers_x0():
    """From x_{T-1} = q_sample(x0, T-1, eps) one deterministic DDIM step with eps itself lands on x0."""
    s = NoiseSchedule(1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 4, 5, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    t = torch.full((3,), 999)
    x = s.q_sample(x0, t, eps)
    torch.testing.assert_close(s.ddim_step(x, eps, 999, -1, eta=0.0), x0, atol=1e-9, rtol=0)


def test_ddim_eta0_oracle_path_stays_on_the_forward_marginals():
    """With the true noise as estimate, every eta-0 DDIM step maps x_t to exactly q_sample(x0, t_prev, eps)."""
    s = NoiseSchedule(50, "linear")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    ts = s.ddim_timesteps(7)
    x = s.q_sample(x0, torch.full((2,), ts[0]), eps)
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        x = s.ddim_step(x, eps, t, prev)
        want = s.q_sample(x0, torch.full((2,), prev), eps)
        torch.testing.assert_close(x, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


def test_ddim_stochastic_step_needs_noise():
    s = NoiseSchedule(10)
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="needs `noise`"):
        s.ddim_step(x, x, 5, 4, eta=1.0)


def test_timestep_embedding_values():
    e = timestep_embedding(torch.tensor([0, 1]), 4)
    # frequencies 1 and 10000^(-1/2) = 0.01: [cos(t), cos(0.01 t), sin(t), sin(0.01 t)]
    want = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.5403023, 0.99995, 0.84147098, 0.00999983]])
    torch.testing.assert_close(e, want, atol=1e-6, rtol=0)
    assert timestep_embedding(torch.tensor([3]), 5).shape == (1, 5)
