"""Token-level mixture-of-experts fusion over all present tokens, flat or hierarchical (seed 002 ModalSelector)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmfusion.fusion.base import Fusion, FusionOutput, concat_tokens, masked_mean
from mmfusion.layers import MLP


class MoEFusion(Fusion):
    """Residual top-k MoE layer on the concatenated present tokens: x + sum_k w_k * expert_k(ln(x)).

    Router: linear, computed in fp32; combine weights = top-k probabilities renormalised to sum to 1.
    aux_loss = load_balance_coef * E * sum_e f_e * P_e (Switch / GShard; f_e = share of the T*k top-k
    assignments sent to expert e, P_e = mean FULL softmax probability) + z_loss_coef * mean(logsumexp(logits)^2)
    (ST-MoE router z-loss).
    capacity_factor: each expert takes at most ceil(cf * T_group * k / E_group) assignments, first choices
    first, then token order; overflow assignments are dropped and a token with none left passes through the
    residual unchanged. capacity_factor=None is dropless.
    aux_free_bias: per-expert bias added to the routing scores for top-k selection only (never to the combine
    weights); the training loop calls `update_expert_bias(out.info["tokens_per_expert"])` after the optimizer
    step (DeepSeek-V3 auxiliary-loss-free balancing, as in torchtitan). Forward itself never mutates state.
    hierarchical: a shared base layer (residual MLP) on every token, then one group of `num_experts` experts per
    modality combination (2^M - 1 groups); a token routes only within its sample's combination group
    (seed 002 层次化MoE: 基础层处理通用模态, 专家层处理特定模态组合).
    router_bias: give the router a learnable per-expert logit bias (default off: a bias-free linear router). It is
    trained like any parameter; benchmarks/moe_balance.py sets it large on one expert to force a collapse.
    pooled (B, D) = mean over present tokens; tokens (B, N, D), absent positions zeroed.
    info: tokens_per_expert (E,) (assignments before capacity), load_cv, dropped, kept (T, k), expert_index (T, k),
    combine_weights (T, k), lb_loss, z_loss; T = present tokens in row-major order of info["token_mask"].
    All modalities absent: raises AllModalitiesAbsentError (a ValueError naming the samples).
    """

    def __init__(
        self,
        modalities: list[str],
        dim: int,
        num_experts: int = 4,
        top_k: int = 2,
        hidden: int | None = None,
        capacity_factor: float | None = 1.25,
        load_balance_coef: float = 1e-2,
        z_loss_coef: float = 1e-3,
        aux_free_bias: bool = False,
        bias_update_rate: float = 1e-3,
        hierarchical: bool = False,
        router_bias: bool = False,
    ):
        super().__init__(modalities, dim)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}]; got {top_k}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless); got {capacity_factor}")
        hidden = hidden or 4 * dim
        self.groups = 2 ** len(self.modalities) - 1 if hierarchical else 1
        self.experts_per_group = num_experts
        self.num_experts = num_experts * self.groups
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.load_balance_coef = load_balance_coef
        self.z_loss_coef = z_loss_coef
        self.aux_free_bias = aux_free_bias
        self.bias_update_rate = bias_update_rate
        self.base = nn.Sequential(nn.LayerNorm(dim), MLP(dim, hidden)) if hierarchical else None
        self.norm = nn.LayerNorm(dim)
        self.router = nn.Linear(dim, self.num_experts, bias=router_bias)
        self.experts = nn.ModuleList(MLP(dim, hidden) for _ in range(self.num_experts))
        self.register_buffer("expert_bias", torch.zeros(self.num_experts))  # (E,), aux-loss-free balancing

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """Aux-loss-free balancing step, outside autograd: delta = rate * sign(mean load of the group - load),
        centred per group (as torchtitan does) so the biases cannot drift together; bias += delta."""
        load = tokens_per_expert.float().view(self.groups, self.experts_per_group)
        delta = self.bias_update_rate * (load.mean(dim=1, keepdim=True) - load).sign()
        self.expert_bias += (delta - delta.mean(dim=1, keepdim=True)).flatten()

    def fuse(self, features: dict[str, torch.Tensor], present: torch.Tensor) -> FusionOutput:
        self._raise_if_all_absent(present)
        tokens, valid = concat_tokens(features, present, self.modalities)  # (B, N, D), (B, N)
        if self.base is not None:
            tokens = tokens + self.base(tokens)
        x = tokens[valid]  # (T, D): present tokens only, so absent ones neither route nor use capacity
        h = self.norm(x)
        e, k = self.num_experts, self.top_k

        bias = None if self.router.bias is None else self.router.bias.float()
        logits = F.linear(h.float(), self.router.weight.float(), bias)  # (T, E), fp32
        group = self._token_groups(present, valid)  # (T,)
        allowed = torch.arange(e, device=x.device) // self.experts_per_group == group[:, None]  # (T, E)
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = logits.softmax(dim=-1)  # full softmax: used for the balance loss
        scores = probs + self.expert_bias if self.aux_free_bias else probs
        index = scores.masked_fill(~allowed, float("-inf")).topk(k, dim=-1).indices  # (T, k)
        top_p = probs.gather(1, index)
        weights = top_p / top_p.sum(dim=-1, keepdim=True)  # (T, k), rows sum to 1

        t = x.shape[0]
        counts = torch.bincount(index.flatten(), minlength=e).float()  # (E,) assignments before capacity
        lb_loss = e * (counts / (t * k) * probs.mean(dim=0)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        keep = self._within_capacity(index, group)  # (T, k)

        y = torch.zeros_like(h)
        for i, expert in enumerate(self.experts):
            tok, slot = ((index == i) & keep).nonzero(as_tuple=True)
            if tok.numel():
                y = y.index_add(0, tok, expert(h[tok]) * weights[tok, slot, None].to(h.dtype))
        out = tokens.new_zeros(tokens.shape)
        out[valid] = x + y
        info = {
            "tokens_per_expert": counts,
            "load_cv": counts.std(unbiased=False) / counts.mean().clamp(min=1e-9),
            "dropped": (~keep).sum(),
            "kept": keep,
            "expert_index": index,
            "combine_weights": weights,
            "lb_loss": lb_loss.detach(),
            "z_loss": z_loss.detach(),
            "token_mask": valid,
        }
        aux = self.load_balance_coef * lb_loss + self.z_loss_coef * z_loss
        return FusionOutput(masked_mean(out, valid), out, aux, info)

    def _token_groups(self, present: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Expert group of each present token: 0, or (hierarchical) its sample's modality-combination id."""
        if self.groups == 1:
            return torch.zeros(int(valid.sum()), dtype=torch.long, device=valid.device)
        bits = 2 ** torch.arange(present.shape[1], device=present.device)
        combo = (present.long() * bits).sum(dim=1) - 1  # (B,) in [0, 2^M - 2]
        return combo[:, None].expand_as(valid)[valid]

    def _within_capacity(self, index: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """bool (T, k): which assignments fit their expert's capacity (first choices first, then token order)."""
        if self.capacity_factor is None:
            return torch.ones_like(index, dtype=torch.bool)
        group_tokens = torch.bincount(group, minlength=self.groups).float()  # (G,)
        cap = torch.ceil(self.capacity_factor * group_tokens * self.top_k / self.experts_per_group)
        cap = cap.repeat_interleave(self.experts_per_group)  # (E,)
        flat = index.t().reshape(-1)  # (k*T,), slot-major: every first choice before any second choice
        onehot = F.one_hot(flat, self.num_experts)
        position = (onehot.cumsum(dim=0) * onehot).sum(dim=1) - 1  # rank of the assignment within its expert
        return (position < cap[flat]).view(self.top_k, -1).t()
