"""The DDPM noise schedule and the DDIM update (Ho et al. 2020, arXiv:2006.11239; Song et al. 2021,
arXiv:2010.02502; the cosine schedule of Nichol & Dhariwal 2021, arXiv:2102.09672).

Timesteps are integers t in [0, T); alpha_bar[t] = prod_{i <= t} (1 - beta_i), so t = 0 is almost clean and
t = T - 1 almost pure noise. x_t = sqrt(alpha_bar[t]) x_0 + sqrt(1 - alpha_bar[t]) eps (`q_sample`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from ..errors import ConfigError

ScheduleKind = Literal["cosine", "linear"]


def betas_for(kind: str, steps: int) -> torch.Tensor:
    """(steps,) float64 betas: "linear" 1e-4 .. 0.02 (DDPM), or "cosine" (alpha_bar(t) = f(t) / f(0) with
    f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), s = 0.008; betas clipped to 0.999)."""
    if steps < 1:
        raise ConfigError(f"diffusion steps must be >= 1, got {steps}")
    if kind == "linear":
        return torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    if kind == "cosine":
        s = 0.008

        def f(t: float) -> float:
            return math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2

        b = [min(1 - f(i + 1) / f(i), 0.999) for i in range(steps)]
        return torch.tensor(b, dtype=torch.float64)
    raise ConfigError(f"noise schedule {kind!r}: expected 'cosine' or 'linear'")


class NoiseSchedule:
    """T = `steps` training timesteps of kind `kind`; alpha_bar (T,) float64 on the CPU."""

    def __init__(self, steps: int = 1000, kind: str = "cosine"):
        self.steps, self.kind = steps, kind
        self.betas = betas_for(kind, steps)
        self.alpha_bar = torch.cumprod(1 - self.betas, dim=0)

    def ab(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar[t] for integer t (B,) (-1 means 1: clean), shaped (B, 1, ...) to broadcast with `like`."""
        t = t.long().cpu()
        a = torch.where(t >= 0, self.alpha_bar[t.clamp(min=0)], torch.ones((), dtype=torch.float64))
        return a.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) noise; x0, noise (B, ...), t (B,) long."""
        a = self.ab(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_x0(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The clean sample implied by x_t and a noise estimate: (x - sqrt(1 - ab) eps) / sqrt(ab)."""
        a = self.ab(t, x)
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    def ddim_timesteps(self, n: int) -> list[int]:
        """n timesteps from T - 1 down to 0 (evenly spaced, rounded, distinct), the DDIM sampling path."""
        if not 1 <= n <= self.steps:
            raise ConfigError(f"DDIM steps must be in [1, {self.steps}], got {n}")
        if n == 1:
            return [self.steps - 1]
        return [round(self.steps - 1 - i * (self.steps - 1) / (n - 1)) for i in range(n)]

    def ddim_step(
        self,
        x: torch.Tensor,
        eps: torch.Tensor,
        t: int,
        t_prev: int,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
        clip: float | None = None,
        project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One DDIM update x_t -> x_{t_prev} (t_prev = -1: to the clean sample) given the noise estimate `eps`.

        x0 = predict_x0, clamped to [-clip, clip] and / or mapped by `project` when given (then eps is re-derived
        from it: Diffusion-LM's clamping trick rounds the text estimate to word vectors this way);
        sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev);
        x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma noise. eta = 0: deterministic."""
        b = x.shape[0]
        tt = torch.full((b,), t, dtype=torch.long)
        a_t = self.ab(tt, x)
        a_p = self.ab(torch.full((b,), t_prev, dtype=torch.long), x)
        x0 = self.predict_x0(x, tt, eps)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        if project is not None:
            x0 = project(x0)
        if clip is not None or project is not None:
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        sigma = eta * ((1 - a_p) / (1 - a_t)).sqrt() * (1 - a_t / a_p).sqrt()
        out = a_p.sqrt() * x0 + (1 - a_p - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            if noise is None:
                raise ValueError("ddim_step with eta > 0 needs `noise`")
            out = out + sigma * noise
        return out


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): [cos(t f_k), sin(t f_k)], f_k = max_period^(-k / (dim / 2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


__all__ = ["NoiseSchedule", "ScheduleKind", "betas_for", "timestep_embedding"]
