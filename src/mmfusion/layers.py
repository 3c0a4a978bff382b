"""Transformer building blocks shared by every encoder (pre-LN, fused QKV, SDPA attention)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# On CPU, attention over at most this many keys runs as softmax(q k^T / sqrt(d) + mask) v with plain matmuls:
# for short sequences the batched GEMMs beat SDPA's flash kernel, which is tuned for long ones (6-9 % of a
# two-tower training step at 65 / 32 tokens, docs/benchmarks.md). CUDA and longer sequences use SDPA.
MATMUL_ATTENTION_MAX_TOKENS = 128


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal)` (no dropout), computed with plain matmuls
    on CPU when there are at most MATMUL_ATTENTION_MAX_TOKENS keys. Same function: a bool mask is True where a
    query may attend, a float mask is added to the scores, and a query that may attend to nothing gets 0 (as
    SDPA's CPU kernels give)."""
    n, m = q.shape[-2], k.shape[-2]
    if q.device.type != "cpu" or m > MATMUL_ATTENTION_MAX_TOKENS:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if attn_mask is None:
        # the encoders' hot path: one batched GEMM with the scale (and causal bias) folded in
        lead = q.shape[:-2]
        q3, k3, v3 = (
            q.reshape(-1, n, q.shape[-1]),
            k.reshape(-1, m, k.shape[-1]),
            v.reshape(-1, m, v.shape[-1]),
        )
        if is_causal:
            bias = torch.full((n, m), -math.inf, dtype=q.dtype, device=q.device).triu(1)
            s = torch.baddbmm(bias, q3, k3.transpose(1, 2), alpha=scale)
        else:
            s = torch.baddbmm(q3.new_zeros(1, 1, 1), q3, k3.transpose(1, 2), beta=0.0, alpha=scale)
        return torch.bmm(s.softmax(-1), v3).view(*lead, n, v.shape[-1])
    s = (q * scale) @ k.transpose(-2, -1)
    if is_causal:
        s = s.masked_fill(torch.ones(n, m, dtype=torch.bool, device=s.device).triu(1), -math.inf)
    if attn_mask.dtype != torch.bool:
        return (s + attn_mask).softmax(-1) @ v
    p = s.masked_fill(~attn_mask, -math.inf).softmax(-1)
    return p.masked_fill(~attn_mask.any(-1, keepdim=True), 0.0) @ v


class Attention(nn.Module):
    """Multi-head self-attention through `attention` (SDPA, or plain matmuls for short sequences on CPU)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        # x: (batch, tokens, width); attn_mask: bool (batch|1, 1, tokens, tokens), True = may attend
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the activation of OpenAI's CLIP checkpoints (Radford et al. 2021)."""
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# MLP activations by config name: "gelu" (exact, erf) is mmfusion's own; the others reproduce CLIP checkpoints.
ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu, "gelu_tanh": gelu_tanh}


class MLP(nn.Module):
    """Two-layer feed-forward block with GELU (or another of ACTIVATIONS)."""

    def __init__(self, width: int, hidden: int, act: str = "gelu"):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}")
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), act)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of pre-LN blocks; `grad_checkpointing` recomputes each block in backward (T8)."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu"):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, act) for _ in range(depth))
        self.grad_checkpointing = False

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask, is_causal, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        return x


def set_grad_checkpointing(model: nn.Module, on: bool = True) -> int:
    """Turn activation checkpointing (T8) on or off for every Transformer stack in `model`; returns how many."""
    stacks = [m for m in model.modules() if isinstance(m, Transformer)]
    for m in stacks:
        m.grad_checkpointing = on
    return len(stacks)


def init_transformer_(module: nn.Module, width: int, depth: int) -> None:
    """CLIP-style initialisation: small normal weights, output projections scaled by depth."""
    proj_std = (width**-0.5) * ((2 * depth) ** -0.5)
    attn_std = width**-0.5
    fc_std = (2 * width) ** -0.5
    for name, p in module.named_parameters():
        if p.ndim < 2:
            continue
        if name.endswith("attn.qkv.weight"):
            nn.init.normal_(p, std=attn_std)
        elif name.endswith("attn.out.weight") or name.endswith("mlp.fc2.weight"):
            nn.init.normal_(p, std=proj_std)
        elif name.endswith("mlp.fc1.weight"):
            nn.init.normal_(p, std=fc_std)


def scalar_parameter(value: float) -> nn.Parameter:
    """A learnable scalar stored with shape (1,): FSDP2's fully_shard cannot shard 0-d parameters. Modules
    holding one register `load_scalar_compat(module, name)` so checkpoints with the old 0-d shape still load."""
    return nn.Parameter(torch.full((1,), float(value)))


def load_scalar_compat(module: nn.Module, name: str) -> None:
    """Let `module.load_state_dict` accept a 0-d tensor for the (1,)-shaped scalar parameter `name`."""

    def hook(state_dict, prefix, *args):
        key = prefix + name
        if key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)

    module._register_load_state_dict_pre_hook(hook)
