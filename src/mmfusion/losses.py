"""Contrastive losses (T1): symmetric InfoNCE and the dual (intra- + inter-modal) variant of seed 001."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised embeddings a (N, D) and b (N, D); pair i is a[i] <-> b[i].

    loss = (CE(scale * a @ b.T, arange) + CE(scale * b @ a.T, arange)) / 2   (CLIP, Radford et al. 2021)
    """
    logits = logit_scale * a @ b.t()
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def intra_modal_loss(x: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Seed 001's intra-modal term: CE(scale * x @ x.T, arange) — each embedding is told apart from the
    other in-batch embeddings of its own modality (a uniformity pressure)."""
    logits = logit_scale * x @ x.t()
    return F.cross_entropy(logits, torch.arange(x.shape[0], device=x.device))


def dual_contrastive_loss(
    text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor | float, intra_weight: float = 0.5
) -> torch.Tensor:
    """Inter-modal symmetric InfoNCE + intra_weight * mean of the text and image intra-modal terms (seed 001)."""
    intra = 0.5 * (intra_modal_loss(text, logit_scale) + intra_modal_loss(image, logit_scale))
    return clip_loss(image, text, logit_scale) + intra_weight * intra


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (local_batch, ...) from every rank in rank order, keeping gradients to each rank's slice.

    Used by contrastive losses so every rank sees the global batch (OpenCLIP's gather_with_grad).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)
