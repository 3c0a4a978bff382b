"""DDIM sampling from a JointDiffusion model: text -> image, image -> text and joint (image, text) pairs.

Classifier-free guidance uses UniDiffuser's trick: the unconditional branch is the same denoiser with the
condition replaced by pure noise at the maximum timestep T - 1 ("the other modality absent"), so no
separate null-condition training is needed: eps = eps_uncond + scale * (eps_cond - eps_uncond); scale 1 is
plain conditional sampling. Joint sampling noises both modalities at the same timestep and is unguided.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from ..errors import ConfigError
from .model import JointDenoiser, JointDiffusion

Task = Literal["image", "caption", "joint"]
TASKS = ("image", "caption", "joint")


class Samples(NamedTuple):
    """image (N, 3, S, S) in [-1, 1] (the condition for "caption"), text (N, text_len, text_dim) latents
    (the condition for "image")."""

    image: torch.Tensor
    text: torch.Tensor


def guided_eps(
    net: JointDenoiser,
    task: str,
    x: torch.Tensor,
    cond: torch.Tensor,
    t: int,
    guidance: float,
    null: torch.Tensor,
) -> torch.Tensor:
    """The noise estimate of the generated modality at timestep t, guided by `guidance`.

    task "image": x (B, N_img, 3p^2) noisy patches, cond (B, L, d) the clean text latent;
    task "caption": x (B, L, d) the noisy text latent, cond (B, N_img, 3p^2) the clean image patches.
    null: pure noise shaped like cond (the condition at max noise, T - 1: the unconditional branch)."""
    b = x.shape[0]
    T = net.cfg.timesteps
    tt = torch.full((b,), t, dtype=torch.long, device=x.device)
    clean = torch.full((b,), -1, dtype=torch.long, device=x.device)
    if guidance == 1.0:
        xs, cs, tc = x, cond, clean
    else:  # both branches in one forward: rows [:b] conditional, [b:] unconditional
        xs, cs = torch.cat([x, x]), torch.cat([cond, null])
        tt, tc = torch.cat([tt, tt]), torch.cat([clean, torch.full_like(clean, T - 1)])
    if task == "image":
        eps = net(xs, cs, tt, tc).eps_image
    else:
        eps = net(cs, xs, tc, tt).eps_text
    if guidance == 1.0:
        return eps
    eps_c, eps_u = eps[:b], eps[b:]
    return eps_u + guidance * (eps_c - eps_u)


@torch.no_grad()
def sample(
    model: JointDiffusion,
    task: str,
    *,
    image: torch.Tensor | None = None,
    text: torch.Tensor | None = None,
    n: int | None = None,
    steps: int = 25,
    eta: float = 0.0,
    guidance: float = 1.0,
    seed: int = 0,
    use_ema: bool = True,
    clip: float | None = 1.0,
    round_text: bool = True,
) -> Samples:
    """DDIM with `steps` steps (eta 0: deterministic given the seed) from the EMA denoiser (`use_ema`).

    "image": needs text (N, L, d); "caption": needs image (N, 3, S, S) in [-1, 1]; "joint": needs n.
    Generated pixel estimates are clamped to [-clip, clip] at every step (None: no clamp; an autoencoder
    latent is never clamped, its decoded image is); generated text
    estimates are rounded to the nearest word vectors at every step when `round_text` (Diffusion-LM's
    clamping trick: without it the blurry early estimates round to unrelated words)."""
    if task not in TASKS:
        raise ConfigError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    cfg = model.cfg
    net = model.ema_net if use_ema else model.net
    net.eval()
    dev = next(net.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    if cfg.image_latent != "pixels":
        clip = None

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dev)

    if task == "image" and text is None or task == "caption" and image is None:
        raise ConfigError(f"task {task!r} needs its condition ({'text' if task == 'image' else 'image'})")
    if task == "joint" and (n is None or n < 1):
        raise ConfigError("task 'joint' needs n >= 1 (how many pairs)")
    b = n if task == "joint" else (text.shape[0] if task == "image" else image.shape[0])
    xi_shape, xt_shape = (b, cfg.image_tokens, cfg.image_token_dim), (b, cfg.text_len, cfg.text_dim)
    sched = model.schedule
    project = None
    if round_text:
        from .recipe import text_codec

        project = text_codec(cfg).round
    ts = sched.ddim_timesteps(steps)
    if task == "image":
        cond, x, null = text.to(dev).float(), randn(*xi_shape), randn(*xt_shape)
    elif task == "caption":
        cond, x, null = model.image_to_latent(image.to(dev).float()), randn(*xt_shape), randn(*xi_shape)
    else:
        xi, xt = randn(*xi_shape), randn(*xt_shape)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        if task == "joint":
            tt = torch.full((b,), t, dtype=torch.long, device=dev)
            out = net(xi, xt, tt, tt)
            zi, zt = (randn(*xi_shape), randn(*xt_shape)) if eta > 0 else (None, None)
            xi = sched.ddim_step(xi, out.eps_image, t, t_prev, eta, zi, clip)
            xt = sched.ddim_step(xt, out.eps_text, t, t_prev, eta, zt, None, project)
        else:
            eps = guided_eps(net, task, x, cond, t, guidance, null)
            z = randn(*x.shape) if eta > 0 else None
            if task == "image":
                x = sched.ddim_step(x, eps, t, t_prev, eta, z, clip)
            else:
                x = sched.ddim_step(x, eps, t, t_prev, eta, z, None, project)
    if task == "image":
        return Samples(model.latent_to_image(x).clamp(-1, 1), cond)
    if task == "caption":
        return Samples(image.to(dev).float(), x)
    return Samples(model.latent_to_image(xi).clamp(-1, 1), xt)


__all__ = ["TASKS", "Samples", "Task", "guided_eps", "sample"]
