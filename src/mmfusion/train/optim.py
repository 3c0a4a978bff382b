"""The optimizer's side of training: parameter groups (no weight decay on norms, biases, embeddings, scalars),
the warm-up + cosine schedule, gradient clipping (DTensor-aware) and per-modality gradient accumulation (T7)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; biases, norms, embeddings' positions and scalar parameters are not decayed (as CLIP)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fusable(params: list[nn.Parameter]) -> bool:
    """Whether `torch.optim.AdamW(fused=True)` can step these: plain (not DTensor) floating-point tensors on
    CPU or CUDA, all on one device type."""
    devices = {p.device.type for p in params}
    return (
        len(devices) == 1
        and devices <= {"cpu", "cuda"}
        and all(type(p.data) is torch.Tensor and p.is_floating_point() for p in params)
    )


def adamw(
    groups: list[dict[str, Any]],
    lr: float,
    betas: tuple[float, float],
    eps: float = 1e-6,
    fused: bool = True,
) -> torch.optim.AdamW:
    """AdamW over parameter groups; with `fused` (and parameters `fusable`) one fused kernel updates every
    tensor of a group instead of torch's multi-tensor loop (the same update, 2-4 % of a small model's training
    step on CPU: docs/benchmarks.md)."""
    params = [p for g in groups for p in g["params"]]
    use_fused = fused and bool(params) and fusable(params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True if use_fused else None)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine down to `min_lr_ratio` at `steps`."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the gradients' global L2 norm to `max_norm`; returns the norm before clipping.

    Works on plain tensors and on DTensors from several device meshes at once (FSDP2 over "dp" for some
    modules, FSDP2 x tensor parallel over ("dp", "tp") for the Transformer blocks), which
    `torch.nn.utils.clip_grad_norm_` refuses to stack: each mesh's norm is reduced to a full tensor first.
    """
    groups: dict[Any, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    if not groups:
        return 0.0
    norms = []
    for group in groups.values():
        n = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0)
        norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    for group in groups.values():  # one mesh at a time: foreach kernels refuse to mix meshes
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return float(total)


class ModalityAccumulator:
    """Per-modality gradient accumulation (T7, seed 002: "accumulation steps by modality"): the parameters of
    a modality with k > 1 are updated every k-th optimizer step, with the mean of the k steps' gradients.

    Call `hold(step)` after the gradients are final (all-reduced, unscaled) and before clipping and the
    optimizer step. On steps that are not due it moves the group's gradients into a buffer and sets them to
    None, so the optimizer skips those parameters (AdamW leaves parameters without a gradient untouched,
    weight decay included) and clipping measures the rest. On a due step it puts back (buffer + grad) / k.
    The buffers are part of the checkpoint (`state_dict`), so a resumed run continues the same windows.
    """

    def __init__(self, model: nn.Module, accumulation: dict[str, int]):
        self.groups: list[tuple[str, int, list[tuple[str, nn.Parameter]]]] = []
        self.buffers: dict[str, torch.Tensor] = {}
        if not any(k > 1 for k in accumulation.values()):
            return
        prefixes_of = getattr(model, "modality_parameters", None)
        if prefixes_of is None:
            from ..errors import ConfigError

            raise ConfigError(
                f"train.modality_accumulation: {type(model).__name__} does not name its modalities' parameters "
                "(no modality_parameters())"
            )
        prefixes = prefixes_of()
        named = list(model.named_parameters())
        for key, k in sorted(accumulation.items()):
            if key not in prefixes:
                from ..errors import ConfigError

                raise ConfigError(
                    f"train.modality_accumulation[{key!r}]: the model has no modality {key!r}; "
                    f"its modalities are {sorted(prefixes)}"
                )
            if k > 1:
                params = [(n, p) for n, p in named if p.requires_grad and n.startswith(tuple(prefixes[key]))]
                self.groups.append((key, k, params))

    def hold(self, step: int) -> None:
        """`step`: the 1-based number of the optimizer step about to be taken."""
        for _key, k, params in self.groups:
            due = step % k == 0
            for name, p in params:
                if p.grad is None:
                    continue
                held = self.buffers.pop(name, None)
                total = p.grad if held is None else p.grad + held
                if due:
                    p.grad = total / k
                else:
                    self.buffers[name] = total.detach().clone()
                    p.grad = None

    def describe(self) -> str:
        return ", ".join(f"{key} every {k} steps ({len(ps)} tensors)" for key, k, ps in self.groups)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.cpu() for n, t in self.buffers.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        self.buffers = {n: t.to(device) for n, t in state.items()}


__all__ = ["ModalityAccumulator", "clip_grad_norm", "lr_lambda", "param_groups"]
