"""The joint image + text diffusion model (A9), UniDiffuser-style (Bao et al. 2023, arXiv:2303.06555): one
transformer denoises the image latent and the text latent together, each at its own timestep, so one model
samples text -> image (text clean), image -> text (image clean) and joint pairs (both noised together).

Timesteps run over [-1, T): -1 is "clean" (a condition, x = x0), T - 1 the maximum noise (the other modality
"absent": the branch classifier-free guidance subtracts). The denoiser predicts the noise eps of both.

`JointDiffusion` is the Trainer's model (forward(Batch) -> ModelOutput): the DDPM loss, EMA weights of the
denoiser (`update_ema`, called by `EMACallback` after every optimizer step, kept in the state dict so a
resumed run continues them), and the consistency constraint of seed 001 (T10), both off by default:
- align_weight: the symmetric InfoNCE (`mmfusion.losses.clip_loss`) between the denoiser's pooled image and
  text states projected into a shared latent space, on the samples where both modalities are legible
  (t < T / 2);
- adv_weight: a discriminator on (image latent, text latent) pairs learns real pairs = 1 against the
  denoiser's clean-sample estimates and mismatched real pairs = 0; the estimates reach it through a
  gradient-reversal layer scaled by adv_weight, so one optimizer trains the minimax game (Ganin & Lempitsky
  2015, arXiv:1409.7495).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import Batch
from ..layers import Transformer, init_transformer_
from ..losses import clip_loss
from ..models.contrastive import ModelOutput
from .config import DiffusionModelConfig
from .latents import ImageAutoencoder, patchify, unpatchify
from .schedule import NoiseSchedule, timestep_embedding
from .unet import ConvDecoder, ConvEncoder


class DenoiserOutput(NamedTuple):
    """eps_image (B, N_img, 3 p^2), eps_text (B, text_len, text_dim), hidden (B, N_img + text_len, width),
    x0_text / x0_image: a head's clean-latent estimate when its target is "x0" (its eps is derived from it;
    0 for clean rows), else None."""

    eps_image: torch.Tensor
    eps_text: torch.Tensor
    hidden: torch.Tensor
    x0_text: torch.Tensor | None = None
    x0_image: torch.Tensor | None = None


class TimeEmbed(nn.Module):
    """Timestep t in [-1, T) -> (B, width): sinusoidal(t + 1) then a two-layer MLP (one per modality)."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t + 1, self.width))


def _zero_(layer: nn.Linear) -> None:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)


def _summary(n_in: int, width: int) -> nn.Sequential:
    """Linear(n_in, width), SiLU, Linear(width, width) with the last layer at 0 (the path starts as a no-op)."""
    mlp = nn.Sequential(nn.Linear(n_in, width), nn.SiLU(), nn.Linear(width, width))
    _zero_(mlp[2])
    return mlp


class JointDenoiser(nn.Module):
    """Image patches and text word vectors as one token sequence (learned positions per modality), each
    modality's tokens plus its own timestep embedding, a pre-LN transformer, one linear head each. With
    cfg.text_summary, an MLP of the whole (flattened) text latent and its timestep embedding is also added to
    every image token (as DiT's adaLN adds the class to every token): the prompt reaches each image token
    before the first attention layer, instead of only through attention to the text tokens. The image
    head predicts eps; the text head predicts eps, or with text_target "x0" the clean text latent, from which
    eps is derived (Diffusion-LM's parameterisation: an eps loss hardly weighs the text's content at the high
    noise levels where only the image can tell it, so image -> text would learn slowly).

    With cfg.image_net "unet" the linear patch embedding and head are replaced by a conv U-Net
    (`mmfusion.diffusion.unet`) whose bottleneck tokens are the image tokens; its levels are FiLM-conditioned
    on the image timestep embedding plus the text summary. With cfg.image_summary, an MLP of the mean image
    token and the image timestep embedding is added to every text token (the text summary's mirror)."""

    def __init__(self, cfg: DiffusionModelConfig):
        super().__init__()
        self.cfg = cfg
        self.schedule = NoiseSchedule(cfg.timesteps, cfg.schedule)
        w, p = cfg.width, cfg.image_token_dim
        # parameters are created in round 2's order, so a seed gives round 2's initial weights
        self.encoder = self.decoder = self.image_in = self.image_out = None
        if cfg.image_net == "unet":  # conv encoder / decoder around the transformer's image tokens
            self.encoder = ConvEncoder(cfg.patch, cfg.conv_channels, w, w)
        else:
            self.image_in = nn.Linear(p, w)
        self.text_in = nn.Linear(cfg.text_dim, w)
        self.image_pos = nn.Parameter(torch.randn(cfg.image_tokens, w) * 0.02)
        self.text_pos = nn.Parameter(torch.randn(cfg.text_len, w) * 0.02)
        self.time_image, self.time_text = TimeEmbed(w), TimeEmbed(w)
        # the whole text latent and its timestep, added to every image token (starts as a no-op)
        self.text_summary = _summary(cfg.text_len * cfg.text_dim + w, w) if cfg.text_summary else None
        self.transformer = Transformer(w, cfg.depth, cfg.heads, cfg.mlp_ratio)
        init_transformer_(self.transformer, w, cfg.depth)
        self.norm = nn.LayerNorm(w)
        if self.encoder is not None:
            self.decoder = ConvDecoder(self.encoder.chs, w, w)
        else:
            self.image_out = nn.Linear(w, p)
            _zero_(self.image_out)  # start at 0 (DiT's zero-initialised output)
        self.text_out = nn.Linear(w, cfg.text_dim)
        _zero_(self.text_out)
        # the mean image token and the image timestep, added to every text token (starts as a no-op)
        self.image_summary = _summary(2 * w, w) if cfg.image_summary else None

    def forward(
        self, x_image: torch.Tensor, x_text: torch.Tensor, t_image: torch.Tensor, t_text: torch.Tensor
    ) -> DenoiserOutput:
        """x_image (B, N_img, 3 p^2), x_text (B, text_len, text_dim), t_image / t_text (B,) long in [-1, T)."""
        n = x_image.shape[1]
        temb_image, temb_text = self.time_image(t_image), self.time_text(t_text)
        cond = temb_image  # what every image token (and, with image_net unet, every conv level) is told
        if self.text_summary is not None:
            cond = cond + self.text_summary(torch.cat([x_text.flatten(1), temb_text], dim=1))
        if self.encoder is not None:
            tokens, skips = self.encoder(unpatchify(x_image, self.cfg.patch), cond)
        else:
            tokens = self.image_in(x_image)
        hi = tokens + self.image_pos + cond[:, None]
        ht = self.text_in(x_text) + self.text_pos + temb_text[:, None]
        if self.image_summary is not None:
            ht = ht + self.image_summary(torch.cat([tokens.mean(dim=1), temb_image], dim=1))[:, None]
        h = self.norm(self.transformer(torch.cat([hi, ht], dim=1)))
        if self.decoder is not None:
            image = patchify(self.decoder(h[:, :n], skips, cond), self.cfg.patch)
        else:
            image = self.image_out(h[:, :n])
        text = self.text_out(h[:, n:])
        x0_image = x0_text = None
        if self.cfg.image_target == "x0":
            x0_image, image = image, self._eps_from_x0(x_image, t_image, image)
        if self.cfg.text_target == "x0":
            x0_text, text = text, self._eps_from_x0(x_text, t_text, text)
        return DenoiserOutput(image, text, h, x0_text, x0_image)

    def _eps_from_x0(self, x: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """(x - sqrt(ab) x0) / sqrt(1 - ab); 0 for clean rows (t = -1), which have no noise."""
        a = self.schedule.ab(t, x)
        noisy = (t >= 0).to(x.dtype).reshape(-1, 1, 1)
        return noisy * (x - a.sqrt() * x0) / (1 - a).clamp(min=1e-12).sqrt()


class PairDiscriminator(nn.Module):
    """(image (B, 3, S, S), text latent (B, L, d)) -> (B,) logit that the pair is a real, matching pair.
    The image enters 4x average-pooled, the text flattened; an MLP sees both (so it can judge the match)."""

    def __init__(self, cfg: DiffusionModelConfig, hidden: int = 128):
        super().__init__()
        side = max(1, cfg.image_size // 4)
        self.pool = cfg.image_size // side
        self.mlp = nn.Sequential(
            nn.Linear(3 * side * side + cfg.text_len * cfg.text_dim, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = torch.cat([F.avg_pool2d(image, self.pool).flatten(1), text.flatten(1)], dim=1)
        return self.mlp(x)[:, 0]


class _Reverse(torch.autograd.Function):
    """Identity forward; gradient times -scale backward (the gradient-reversal layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x, whose gradient is multiplied by -scale on the way back."""
    return _Reverse.apply(x, scale)


def snr_weight(schedule: NoiseSchedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B,) weight max(1, min(SNR(t), gamma)) of an x0 loss, SNR = ab / (1 - ab); 0 for clean rows (t = -1).

    An unweighted x0 loss is the eps loss divided by SNR: it hardly weighs the low noise levels where the
    shape's edges are drawn. Raising the weight to SNR there (truncated-SNR weighting, Salimans & Ho 2022,
    arXiv:2202.00512), capped at gamma (Min-SNR, Hang et al. 2023, arXiv:2303.09556), keeps the high noise
    levels, where only the prompt sets the object, at weight 1."""
    ab = schedule.alpha_bar[t.long().cpu().clamp(min=0)]
    w = (ab / (1 - ab).clamp(min=1e-12)).clamp(min=1.0, max=gamma).float()
    return torch.where(t.cpu() >= 0, w, torch.zeros_like(w)).to(t.device)


def draw_timesteps(
    cfg: DiffusionModelConfig, b: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_image, t_text) (B,) long for one training batch: independent uniform in [0, T) (joint), except a
    share cond_prob where one modality is clean (-1: text -> image or image -> text training) and a share
    uncond_prob where one sits at T - 1 (the unconditional branch); the modality is a fair coin each time."""
    T = cfg.timesteps
    t_image = torch.randint(0, T, (b,), generator=generator)
    t_text = torch.randint(0, T, (b,), generator=generator)
    u = torch.rand(b, generator=generator)
    image_side = torch.rand(b, generator=generator) < 0.5
    cond = u < cfg.cond_prob
    uncond = (u >= cfg.cond_prob) & (u < cfg.cond_prob + cfg.uncond_prob)
    t_text = torch.where(cond & ~image_side, -1, t_text)  # text clean: learn text -> image
    t_image = torch.where(cond & image_side, -1, t_image)  # image clean: learn image -> text
    t_text = torch.where(uncond & ~image_side, T - 1, t_text)
    t_image = torch.where(uncond & image_side, T - 1, t_image)
    return t_image, t_text


class JointDiffusion(nn.Module):
    """The Trainer's model: `net` (trained), `ema_net` (EMA of net; sampling uses it), with image_latent
    "autoencoder" the frozen `image_codec`, and, when their weights are > 0, the alignment projections and the
    pair discriminator. Batch: "image" (B, 3, S, S) in [-1, 1],
    "text" (B, text_len, text_dim) text latents."""

    def __init__(self, cfg: DiffusionModelConfig):
        super().__init__()
        self.cfg = cfg
        self.schedule = NoiseSchedule(cfg.timesteps, cfg.schedule)
        self.net = JointDenoiser(cfg)
        self.ema_net = JointDenoiser(cfg)
        self.ema_net.load_state_dict(self.net.state_dict())
        self.ema_net.requires_grad_(False)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.image_codec = None
        if (
            cfg.image_latent == "autoencoder"
        ):  # trained before the denoiser (recipe.fit_diffusion), then frozen
            self.image_codec = ImageAutoencoder(
                cfg.image_size, cfg.ae_latent_dim, cfg.ae_tokens, cfg.ae_channels
            )
            self.image_codec.requires_grad_(False)
        if cfg.align_weight > 0:
            self.align_image = nn.Linear(cfg.width, cfg.align_dim)
            self.align_text = nn.Linear(cfg.width, cfg.align_dim)
        if cfg.adv_weight > 0:
            self.discriminator = PairDiscriminator(cfg)

    @torch.no_grad()
    def update_ema(self) -> float:
        """ema = d * ema + (1 - d) * net with d = min(ema_decay, (1 + n) / (10 + n)), n = updates so far
        (the warm-up keeps early EMA weights from lagging at the initialisation); buffers are copied.
        Returns d."""
        n = int(self.ema_updates)
        d = min(self.cfg.ema_decay, (1 + n) / (10 + n))
        for pe, p in zip(self.ema_net.parameters(), self.net.parameters()):
            pe.lerp_(p.detach(), 1 - d)
        for be, b in zip(self.ema_net.buffers(), self.net.buffers()):
            be.copy_(b)
        self.ema_updates += 1
        return d

    def image_to_latent(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> image latent (B, image_tokens, image_token_dim)."""
        if self.image_codec is None:
            return patchify(images, self.cfg.patch)
        with torch.no_grad():
            return self.image_codec.eval().encode(images)

    def latent_to_image(self, latent: torch.Tensor) -> torch.Tensor:
        """Image latent (B, image_tokens, image_token_dim) -> (B, 3, S, S), not clamped."""
        if self.image_codec is None:
            return unpatchify(latent, self.cfg.patch)
        return self.image_codec.decode(latent)

    def forward(self, batch: Batch) -> ModelOutput:
        cfg, s = self.cfg, self.schedule
        x0_image = batch["image"]
        xi0 = self.image_to_latent(x0_image)
        xt0 = batch["text"]
        b = xi0.shape[0]
        t_image, t_text = draw_timesteps(cfg, b)
        t_image, t_text = t_image.to(xi0.device), t_text.to(xi0.device)
        ni, nt = torch.randn_like(xi0), torch.randn_like(xt0)
        xi, xt = s.q_sample(xi0, t_image, ni), s.q_sample(xt0, t_text, nt)
        out = self.net(xi, xt, t_image, t_text)
        # a clean (conditioning) modality has nothing to denoise: it carries no loss
        wi, wt = (t_image >= 0).float(), (t_text >= 0).float()
        if out.x0_image is not None:
            mse_i = ((out.x0_image - xi0) ** 2).mean(dim=(1, 2))
            if cfg.image_snr_weight > 0:
                wi = wi * snr_weight(s, t_image, cfg.image_snr_weight)
        else:
            mse_i = ((out.eps_image - ni) ** 2).mean(dim=(1, 2))
        if out.x0_text is not None:
            mse_t = ((out.x0_text - xt0) ** 2).mean(dim=(1, 2))
        else:
            mse_t = ((out.eps_text - nt) ** 2).mean(dim=(1, 2))
        loss_i = (mse_i * wi).sum() / wi.sum().clamp(min=1)  # a weighted mean (snr weights are >= 1)
        loss_t = (mse_t * wt).sum() / wt.sum().clamp(min=1)
        loss = loss_i + cfg.text_weight * loss_t
        metrics: dict[str, Any] = {"mse_image": loss_i.detach(), "mse_text": loss_t.detach()}
        legible = (t_image < cfg.timesteps // 2) & (t_text < cfg.timesteps // 2)
        if cfg.align_weight > 0:
            align = self._align(out.hidden, xi0.shape[1], legible)
            loss = loss + cfg.align_weight * align
            metrics["align"] = align.detach()
        if cfg.adv_weight > 0:
            adv = self._adversarial(x0_image, xt0, xi, xt, out, t_image, t_text, legible)
            loss = loss + adv
            metrics["disc"] = adv.detach()
        return ModelOutput(loss, metrics)

    def _align(self, hidden: torch.Tensor, n_image: int, keep: torch.Tensor) -> torch.Tensor:
        """InfoNCE between the projected mean image and mean text states of the `keep` samples (0 if < 2)."""
        if int(keep.sum()) < 2:
            return hidden.sum() * 0
        h = hidden[keep]
        zi = F.normalize(self.align_image(h[:, :n_image].mean(dim=1)), dim=-1)
        zt = F.normalize(self.align_text(h[:, n_image:].mean(dim=1)), dim=-1)
        return clip_loss(zi, zt, 1.0 / self.cfg.align_temperature)

    def _adversarial(self, x0_image, xt0, xi, xt, out, t_image, t_text, keep) -> torch.Tensor:
        """The discriminator's BCE: real pairs 1; the denoiser's x0 estimates (through the reversed gradient)
        and mismatched real pairs (text rolled by one) 0. Estimates only from `keep` samples."""
        cfg, s = self.cfg, self.schedule
        d = self.discriminator
        real = d(x0_image, xt0)
        ones = torch.ones_like(real)
        loss = F.binary_cross_entropy_with_logits(real, ones)
        if x0_image.shape[0] > 1:
            wrong = d(x0_image, xt0.roll(1, dims=0))
            loss = loss + F.binary_cross_entropy_with_logits(wrong, torch.zeros_like(wrong))
        if int(keep.sum()) > 0:
            est_i = self.latent_to_image(s.predict_x0(xi[keep], t_image[keep], out.eps_image[keep]))
            if out.x0_text is not None:
                est_t = out.x0_text[keep]
            else:
                est_t = s.predict_x0(xt[keep], t_text[keep], out.eps_text[keep])
            est_i = reverse_gradient(est_i.clamp(-1, 1), cfg.adv_weight)
            est_t = reverse_gradient(est_t, cfg.adv_weight)
            fake = d(est_i, est_t)
            loss = loss + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        return loss


class EMACallback:
    """Trainer callback: `update_ema()` of the (unwrapped) JointDiffusion after every optimizer step."""

    def on_step_end(self, trainer: Any) -> None:
        trainer.module.update_ema()


__all__ = [
    "DenoiserOutput",
    "EMACallback",
    "JointDenoiser",
    "JointDiffusion",
    "PairDiscriminator",
    "TimeEmbed",
    "draw_timesteps",
    "reverse_gradient",
    "snr_weight",
]
