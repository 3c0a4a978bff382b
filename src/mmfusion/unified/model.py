"""One decoder-only Transformer over one vocabulary of text tokens, VQ codes and boundary/task tokens (A7, T11).

Inputs are token ids (batch, T) with a modality id per token (batch, T): TEXT=0, IMAGE=1, AUDIO=2 (special,
boundary and task-prefix tokens count as TEXT). The output is next-token logits (batch, T, vocab).

Each block is pre-norm: x + attn(rmsnorm(x)), then x + mlp(rmsnorm(x)); a final RMSNorm precedes the (tied)
output projection. The MLP is GELU or SwiGLU (`mlp`); with `mlp="swiglu"`, `qk_norm=False` and none of the
options below the decoder is a LLaMA (mmfusion.unified.hf_llama maps its weights onto LlamaForCausalLM).

- Causal self-attention through `torch.nn.functional.scaled_dot_product_attention` (`is_causal` when no mask
  is needed, so the fused / flash kernels run on GPU; an explicit boolean mask, True = may attend, for KV-cache
  chunks and sliding windows).
- Rotary positions on q and k (RoPE, Su et al. 2021); with a KV cache the new tokens continue the positions.
- QK-norm: RMSNorm of q and k per head before RoPE (Dehghani et al. 2023, ViT-22B; Chameleon team 2024;
  OLMo-2), which bounds the attention logits at high learning rates.
- z-loss (PaLM, Chowdhery et al. 2022): `z_loss * mean(log Z)^2` over the trained positions keeps the softmax
  normaliser near 1 (see `unified_loss`).
- `image_window`: a query at an IMAGE token sees only the last `image_window` keys (itself included); text
  and audio queries see their whole causal prefix (seed 003: per-modality context windows). With
  `window_layers="alternate"` only layers 0, 2, 4, ... use the window. Long sequences without a cache use the
  block-sparse `blocked_window_attention`, which skips the work outside the window.
- `modality_aware`: separate q/k/v, output and MLP weights per modality (modality-aware attention, MoMa-lite:
  Lin et al. 2024), each token going through its own modality's weights.
- `sparse_topk`: top-k dynamic sparse attention (Gupta et al. 2021; seed 003 A10); see `attention.py` for what
  it costs.
- `hierarchical_layers=n`: hierarchical attention (seed 003: intra-modal attention first, cross-modal fusion
  after): in layers 0..n-1 a query attends only to keys of its own modality; layers n.. attend across
  modalities.
- `modality_gate`: sparse modality gating (seed 003: learnable gate units that filter out irrelevant modality
  information). Per layer, head and query token, a gate g_m in [0, 1] for every key modality m, from a Linear
  of the query token through the stretched hard sigmoid clamp(1.2 * sigmoid(a) - 0.1, 0, 1) (the deterministic
  hard-concrete gate of Louizos et al. 2018, which reaches exact zeros). Keys of the query's own modality are
  never gated; a key of another modality m gets log g_m added to its score, so its attention weight is scaled
  by g_m before renormalisation, and g_m = 0 removes modality m from that query's view (a sparse gate).
  Gates start near open (g = 0.96); intra-modal layers (`hierarchical_layers`) have none.
  `gate_openness` reports them.

`max_attn_logit` (max |q·k|/sqrt(head_dim) over layers, heads and allowed query-key pairs) costs one extra
score matrix per layer, so it is computed only when asked: by default in training mode (`model.train()`),
or with `forward(..., attn_logit=True)`; otherwise it is NaN.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from ..models.persistence import load_weights, read_config, save_folder
from .attention import (
    apply_rope,
    attention_mask,
    blocked_window_attention,
    max_abs_logit,
    rope_cos_sin,
    topk_attention,
)
from .kv_cache import append_kv
from .layers import ModalityLinear

TEXT, IMAGE, AUDIO = 0, 1, 2
MODALITY_NAMES = ("text", "image", "audio")
MODEL_TYPE = "unified_decoder"
WINDOW_BLOCK = 128  # query block of the block-sparse sliding-window path (used when T >= 2 * WINDOW_BLOCK)
GATE_STRETCH = 0.1  # the hard sigmoid gate clamp((1 + 2s) * sigmoid(a) - s, 0, 1)
GATE_INIT_BIAS = 2.0  # initial gate bias: gates start at 1.2 * sigmoid(2) - 0.1 = 0.957


@dataclass
class UnifiedConfig:
    """Hyper-parameters of `UnifiedDecoder`; validated on construction (`ConfigError` names the field)."""

    vocab_size: int
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    max_len: int = 512
    qk_norm: bool = True
    z_loss: float = 1e-4
    image_window: int | None = None
    window_layers: str = "all"
    modality_aware: bool = False
    sparse_topk: int | None = None
    hierarchical_layers: int = 0
    modality_gate: bool = False
    rope_base: float = 10000.0
    dropout: float = 0.0
    tie_embeddings: bool = True
    mlp: str = "gelu"  # "gelu": fc2(gelu(fc1 x)), biased; "swiglu": fc2(silu(gate x) * up x), no biases

    def __post_init__(self) -> None:
        def bad(field: str, expected: str) -> ConfigError:
            return ConfigError(f"UnifiedConfig.{field} = {getattr(self, field)!r}: expected {expected}")

        for name in ("vocab_size", "dim", "depth", "heads", "max_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "a positive integer")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise bad("dim", f"a multiple of heads ({self.heads}) with an even head dimension")
        if self.mlp_ratio <= 0:
            raise bad("mlp_ratio", "> 0")
        if self.z_loss < 0:
            raise bad("z_loss", ">= 0")
        if self.image_window is not None and (
            not isinstance(self.image_window, int) or self.image_window < 1
        ):
            raise bad("image_window", "None or a positive integer")
        if self.window_layers not in ("all", "alternate"):
            raise bad("window_layers", "'all' or 'alternate'")
        if self.sparse_topk is not None and (not isinstance(self.sparse_topk, int) or self.sparse_topk < 1):
            raise bad("sparse_topk", "None or a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "in [0, 1)")
        if not isinstance(self.hierarchical_layers, int) or not 0 <= self.hierarchical_layers <= self.depth:
            raise bad("hierarchical_layers", f"an integer in [0, depth={self.depth}]")
        if self.rope_base <= 1.0:
            raise bad("rope_base", "> 1")
        if self.mlp not in ("gelu", "swiglu"):
            raise bad("mlp", "'gelu' or 'swiglu'")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def layer_window(self, layer: int) -> int | None:
        """The image sliding window of `layer` (None = full causal)."""
        if self.image_window is None or (self.window_layers == "alternate" and layer % 2):
            return None
        return self.image_window

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnifiedConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown UnifiedConfig keys {unknown}; allowed: {sorted(known)}")
        return cls(**d)


@dataclass
class KVCache:
    """Keys and values of every layer so far: lists of (batch, heads, length, head_dim), positions 0..length-1
    (views of buffers with room for later positions: kv_cache.append_kv), and the modality ids of those
    positions, (batch, length)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    modality: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.keys[0].shape[-2] if self.keys else 0


class UnifiedOutput(NamedTuple):
    """logits (batch, T, vocab); cache (when use_cache); max_attn_logit (float, NaN when not computed)."""

    logits: torch.Tensor
    cache: KVCache | None
    max_attn_logit: float


def hard_sigmoid_gate(a: torch.Tensor) -> torch.Tensor:
    """clamp(1.2 * sigmoid(a) - 0.1, 0, 1): a gate that reaches exactly 0 and 1 (deterministic hard concrete)."""
    return (torch.sigmoid(a) * (1 + 2 * GATE_STRETCH) - GATE_STRETCH).clamp(0.0, 1.0)


class DecoderAttention(nn.Module):
    """Causal multi-head attention with QK-norm, RoPE, a KV cache, an image window, optional top-k sparsity,
    optional intra-modal restriction (hierarchical attention) and an optional sparse modality gate."""

    def __init__(self, cfg: UnifiedConfig, window: int | None, intra_modal: bool = False):
        super().__init__()
        self.cfg, self.window, self.intra_modal = cfg, window, intra_modal
        self.qkv = ModalityLinear(cfg.dim, 3 * cfg.dim, cfg.modality_aware)
        self.out = ModalityLinear(cfg.dim, cfg.dim, cfg.modality_aware)
        self.q_norm = nn.RMSNorm(cfg.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(cfg.head_dim) if cfg.qk_norm else nn.Identity()
        # an intra-modal layer never sees another modality, so it has nothing to gate
        gated = cfg.modality_gate and not intra_modal
        self.gate = nn.Linear(cfg.dim, cfg.heads * len(MODALITY_NAMES)) if gated else None
        self.record_gates = False  # when True, forward keeps the last gate values in self.last_gates
        self.last_gates: torch.Tensor | None = None

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Gate values (batch, heads, T, modalities) in [0, 1] for the query tokens x (batch, T, dim)."""
        b, t, _ = x.shape
        a = self.gate(x).view(b, t, self.cfg.heads, len(MODALITY_NAMES))
        return hard_sigmoid_gate(a.float()).permute(0, 2, 1, 3)

    def forward(
        self,
        x: torch.Tensor,  # (batch, T, dim), the new tokens
        modality: torch.Tensor,  # (batch, T)
        cos: torch.Tensor,  # (T, head_dim) at the new tokens' positions
        sin: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        want_logit: bool,
        k_modality: torch.Tensor | None = None,  # (batch, k_len): modality ids of cache + new tokens
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        cfg = self.cfg
        b, t, _ = x.shape
        # (batch, heads, T, head_dim) each
        q, k, v = (
            p.view(b, t, cfg.heads, cfg.head_dim).transpose(1, 2) for p in self.qkv.split(x, modality, 3)
        )
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        if past is not None:  # a view of a buffer with room for later tokens (kv_cache.py), not a fresh copy
            k, v = append_kv(past[0], k, cfg.max_len), append_kv(past[1], v, cfg.max_len)
        k_len = k.shape[2]
        if k_modality is None:
            if k_len != t:
                raise DataError("DecoderAttention: with a KV cache, k_modality (cache + new) is required")
            k_modality = modality
        dropout_p = cfg.dropout if self.training else 0.0
        by_modality = self.intra_modal or self.gate is not None
        blocked = (
            cfg.sparse_topk is None
            and self.window is not None
            and k_len == t >= 2 * WINDOW_BLOCK
            and not dropout_p
            and not by_modality
        )
        need_mask = (
            cfg.sparse_topk is not None or self.window is not None or (t > 1 and k_len > t) or by_modality
        )
        mask = attention_mask(modality, k_len, self.window) if need_mask and not blocked else None
        if by_modality:
            same = modality[:, None, :, None] == k_modality[:, None, None, :]  # (batch, 1, T, k_len)
        if self.intra_modal:  # hierarchical attention: this layer stays within the query's modality
            mask = mask & same
        if self.gate is not None:
            g = self.gates(x)  # (batch, heads, T, M)
            if self.record_gates:
                self.last_gates = g.detach()
            gk = g.gather(-1, k_modality[:, None, None, :].expand(b, cfg.heads, t, k_len))
            gk = torch.where(same, torch.ones_like(gk), gk)  # the query's own modality is never gated
            mask = mask & (gk > 0)  # a closed gate removes that modality's keys (sparse)
            bias = torch.where(gk > 0, gk.clamp_min(1e-30).log(), torch.zeros_like(gk))
            attn_mask = bias.to(q.dtype).masked_fill(~mask, float("-inf"))
        else:
            attn_mask = mask
        if cfg.sparse_topk is not None:
            y, _ = topk_attention(q, k, v, attn_mask, cfg.sparse_topk, dropout_p)
        elif blocked:  # long sequence, no cache: skip the work outside the image window
            y = blocked_window_attention(q, k, v, modality, self.window, WINDOW_BLOCK)
        elif attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        else:  # no cache chunk and no window: plain causal (t == 1 with a cache attends to everything)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, dropout_p=dropout_p)
        if want_logit:
            logit_mask = attention_mask(modality, k_len, self.window) if blocked else mask
            logit = max_abs_logit(q, k, logit_mask)
        else:
            logit = None
        y = self.out(y.transpose(1, 2).reshape(b, t, cfg.dim), modality)
        return y, (k, v), logit


class DecoderMLP(nn.Module):
    """Feed-forward block, shared or per modality: GELU (fc2(gelu(fc1 x)), biased) or SwiGLU (Shazeer 2020,
    as in LLaMA: fc2(silu(gate x) * up x), no biases; fc1 holds [gate; up] stacked, (2 * hidden, dim))."""

    def __init__(self, cfg: UnifiedConfig):
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.swiglu = cfg.mlp == "swiglu"
        bias = not self.swiglu
        self.fc1 = ModalityLinear(cfg.dim, (2 if self.swiglu else 1) * hidden, cfg.modality_aware, bias=bias)
        self.fc2 = ModalityLinear(hidden, cfg.dim, cfg.modality_aware, bias=bias)

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.fc1.split(x, modality, 2)
            return self.fc2(F.silu(gate) * up, modality)
        return self.fc2(F.gelu(self.fc1(x, modality)), modality)


class DecoderBlock(nn.Module):
    """Pre-norm block: x + attn(rmsnorm(x)), then x + mlp(rmsnorm(x))."""

    def __init__(self, cfg: UnifiedConfig, window: int | None, intra_modal: bool = False):
        super().__init__()
        self.norm_1 = nn.RMSNorm(cfg.dim)
        self.attn = DecoderAttention(cfg, window, intra_modal)
        self.norm_2 = nn.RMSNorm(cfg.dim)
        self.mlp = DecoderMLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, modality, cos, sin, past, want_logit, k_modality=None):
        a, kv, logit = self.attn(self.norm_1(x), modality, cos, sin, past, want_logit, k_modality)
        x = x + self.drop(a)
        return x + self.drop(self.mlp(self.norm_2(x), modality)), kv, logit


class UnifiedDecoder(nn.Module):
    """Decoder-only Transformer over mixed text / image / audio token sequences (see the module docstring)."""

    def __init__(self, cfg: UnifiedConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(
            DecoderBlock(cfg, cfg.layer_window(i), i < cfg.hierarchical_layers) for i in range(cfg.depth)
        )
        self.norm = nn.RMSNorm(cfg.dim)
        # tied: logits use embed.weight directly, so no shared tensor ends up in the safetensors file
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * depth)
        for name, p in self.named_parameters():
            if p.ndim < 2:
                continue
            std = 0.02
            if ".attn.out." in name or ".mlp.fc2." in name:
                std /= math.sqrt(2 * self.cfg.depth)
            nn.init.normal_(p, std=std)
        for mod in self.modules():
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                nn.init.zeros_(mod.bias)
        for block in self.blocks:
            if block.attn.gate is not None:  # gates start near open: 1.2 * sigmoid(2) - 0.1 = 0.957
                nn.init.constant_(block.attn.gate.bias, GATE_INIT_BIAS)

    def forward(
        self,
        ids: torch.Tensor,
        modality: torch.Tensor,
        cache: KVCache | None = None,
        use_cache: bool = False,
        attn_logit: bool | None = None,
    ) -> UnifiedOutput:
        """ids, modality: (batch, T) long — with a cache, the NEW tokens only (positions continue after it).

        Returns logits (batch, T, vocab) for the given tokens, the extended cache when `use_cache`, and
        max_attn_logit (computed when `attn_logit`, default: in training mode).
        """
        if ids.ndim != 2 or modality.shape != ids.shape:
            raise DataError(
                f"ids and modality must both be (batch, T); got {tuple(ids.shape)} and {tuple(modality.shape)}"
            )
        past_len = cache.length if cache is not None else 0
        total = past_len + ids.shape[1]
        if total > self.cfg.max_len:
            raise DataError(
                f"sequence length {total} (cache {past_len} + {ids.shape[1]} new) exceeds "
                f"max_len {self.cfg.max_len}"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise DataError(
                f"token ids must lie in [0, {self.cfg.vocab_size}); got [{int(ids.min())}, {int(ids.max())}]"
            )
        want_logit = self.training if attn_logit is None else attn_logit
        positions = torch.arange(past_len, total, device=ids.device)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_base)
        x = self.embed(ids)
        k_modality = modality
        if cache is not None and past_len:
            if cache.modality is None or cache.modality.shape != (ids.shape[0], past_len):
                raise DataError(
                    "the KV cache has no modality ids for its positions (make it with use_cache=True)"
                )
            k_modality = torch.cat([cache.modality, modality], dim=1)
        keys, values, logits_max = [], [], []
        for i, block in enumerate(self.blocks):
            past = (cache.keys[i], cache.values[i]) if cache is not None else None
            x, (k, v), logit = block(
                x, modality, cos.to(x.dtype), sin.to(x.dtype), past, want_logit, k_modality
            )
            keys.append(k)
            values.append(v)
            if logit is not None:
                logits_max.append(logit)
        x = self.norm(x)
        logits = self.head(x) if self.head is not None else F.linear(x, self.embed.weight)
        max_logit = float(torch.stack(logits_max).max()) if logits_max else float("nan")
        return UnifiedOutput(logits, KVCache(keys, values, k_modality) if use_cache else None, max_logit)

    @torch.no_grad()
    def gate_openness(self, ids: torch.Tensor, modality: torch.Tensor) -> dict[str, float]:
        """Mean modality-gate value and fraction of closed (exactly 0) gates, per "query->key" modality pair
        over all gated (cross-modal) layers, heads and the given tokens (pairs whose modalities both occur in `modality`)."""
        attns = [b.attn for b in self.blocks if b.attn.gate is not None]
        if not attns:
            raise ConfigError(
                "gate_openness needs a model built with UnifiedConfig.modality_gate=True and at least one "
                "cross-modal layer (hierarchical_layers < depth)"
            )
        for a in attns:
            a.record_gates = True
        try:
            self(ids, modality, attn_logit=False)
            gates = [a.last_gates for a in attns]  # each (batch, heads, T, M)
        finally:
            for a in attns:
                a.record_gates, a.last_gates = False, None
        out: dict[str, float] = {}
        for qm, qname in enumerate(MODALITY_NAMES):
            sel = modality == qm
            if not sel.any():
                continue
            for km, kname in enumerate(MODALITY_NAMES):
                if km == qm or not (modality == km).any():  # a gate on absent keys means nothing
                    continue
                vals = torch.cat([g[..., km].permute(0, 2, 1)[sel].flatten() for g in gates])
                out[f"{qname}->{kname}"] = float(vals.mean())
                out[f"{qname}->{kname} closed"] = float((vals == 0).float().mean())
        return out

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json (model_type "unified_decoder") and model.safetensors into `directory`."""
        return save_folder(self, directory, MODEL_TYPE, self.cfg.to_dict())

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device = "cpu"
    ) -> UnifiedDecoder:
        """Load a folder written by `save_pretrained` (JSON + safetensors only); returned in eval mode."""
        model = cls(UnifiedConfig.from_dict(read_config(directory, MODEL_TYPE)))
        return load_weights(model, directory, map_location)


def unified_loss(
    logits: torch.Tensor, ids: torch.Tensor, modality: torch.Tensor, loss_mask: torch.Tensor, z_loss: float
) -> dict[str, torch.Tensor]:
    """Next-token cross-entropy with shifted labels, z-loss and per-modality losses.

    logits (batch, T, vocab); ids, modality (batch, T); loss_mask (batch, T) bool, True = target token ids[t]
    is trained. Position t predicts ids[t+1], so the counted positions are loss_mask[:, 1:] (the same mask
    for ce and the z term; padding and prompt targets count in neither).
    Returns "loss" = ce + z_loss * mean(log Z)^2, "ce", "z_loss" (the unscaled mean (log Z)^2), "log_z_abs"
    (mean |log Z|), and per target modality "ce_text"/"ce_image"/"ce_audio" (0 where a modality has no
    targets) with counts "n_text"/"n_image"/"n_audio"; sum(n_m * ce_m) / sum(n_m) == ce.
    """
    if logits.shape[:2] != ids.shape or ids.shape != modality.shape or ids.shape != loss_mask.shape:
        raise DataError(
            f"unified_loss: logits {tuple(logits.shape)}, ids {tuple(ids.shape)}, modality "
            f"{tuple(modality.shape)} and loss_mask {tuple(loss_mask.shape)} must share (batch, T)"
        )
    pred = logits[:, :-1].float()  # (batch, T-1, vocab)
    target = ids[:, 1:]
    mask = loss_mask[:, 1:].bool()
    target_mod = modality[:, 1:]
    n = mask.sum()
    if int(n) == 0:
        raise DataError("unified_loss: loss_mask selects no target tokens after the first position")
    log_z = pred.logsumexp(dim=-1)  # (batch, T-1)
    ce_tok = log_z - pred.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    w = mask.float()
    ce = (ce_tok * w).sum() / n
    z = (log_z.square() * w).sum() / n
    out = {"loss": ce + z_loss * z, "ce": ce, "z_loss": z, "log_z_abs": (log_z.abs() * w).sum() / n}
    for m, name in enumerate(MODALITY_NAMES):
        sel = mask & (target_mod == m)
        n_m = sel.sum()
        out[f"ce_{name}"] = (ce_tok * sel.float()).sum() / n_m.clamp(min=1)
        out[f"n_{name}"] = n_m
    return out
