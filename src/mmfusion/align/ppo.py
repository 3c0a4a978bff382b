"""PPO pieces for a unified decoder policy: value heads, masked whitening, GAE, the clipped update, the
Lagrange multiplier of PPO-Lagrangian and the seed's cut-and-resample constraint (requirement Z1, seed 000).

Shapes: a packed batch is ids (batch, T) with a response mask (batch, T), True at response tokens (see
`vocab.pack`). Per-action tensors live in the shifted frame (batch, T - 1): position t scores the token
ids[:, t + 1] from the logits at t, and the value at t is the value of the state before that token; the action
mask is response_mask[:, 1:].

References: PPO (Schulman et al. 2017); GAE (Schulman et al. 2016); the per-token KL penalty to a frozen
reference policy (Ziegler et al. 2019, Ouyang et al. 2022); PPO-Lagrangian as in Safe-RLHF (Dai et al. 2023:
log-lambda trained by Adam on -(windowed cost - threshold) * lambda, clamped at lambda_max, advantage
(A_R - lambda * A_C) / (1 + lambda)).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..unified.generation import SamplingConfig, generate
from ..unified.model import TEXT, UnifiedConfig, UnifiedDecoder


def decoder_hidden(decoder: UnifiedDecoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (batch, T, vocab), final hidden states (batch, T, dim)) of a text-only sequence; the hidden
    state is the output of the decoder's final RMSNorm, taken by a forward hook (the model is unchanged)."""
    seen: list[torch.Tensor] = []
    handle = decoder.norm.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        logits = decoder(ids, torch.full_like(ids, TEXT), attn_logit=False).logits
    finally:
        handle.remove()
    return logits, seen[-1]


class ActorCritic(nn.Module):
    """A unified decoder policy with a value head of two outputs: the reward value and the cost value."""

    def __init__(self, decoder: UnifiedDecoder):
        super().__init__()
        self.decoder = decoder
        self.value_head = nn.Linear(decoder.cfg.dim, 2)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (batch, T) -> (log-probs of the taken tokens (batch, T - 1), values (batch, T - 1, 2))."""
        logits, hidden = decoder_hidden(self.decoder, ids)
        return token_logprobs(logits, ids), self.value_head(hidden[:, :-1]).float()


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t + 1] | ids[:, :t + 1]) for t < T - 1: (batch, T - 1)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the True entries of mask."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and (biased) variance over the True entries of mask; masked-out
    entries become 0, so padding and prompt positions neither count nor carry advantage."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return torch.where(mask, (x - mean) * torch.rsqrt(var + eps), torch.zeros_like(x))


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (batch, L) per-action tensors; mask True at actions.

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t and A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}: the
    first masked-out position after a response ends the episode (its value counts as 0). Returns (advantages,
    returns = advantages + values), both 0 outside the mask."""
    m = mask.to(values.dtype)
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    length = values.shape[1]
    for t in reversed(range(length)):
        m_next = m[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        v_next = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * v_next * m_next - values[:, t]
        last = delta + gamma * lam * m_next * last
        adv[:, t] = last
    adv = adv * m
    return adv, (adv + values) * m


def terminal_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put each row's scalar score (batch,) on its last action (mask True) -> (batch, L), 0 elsewhere."""
    out = torch.zeros(mask.shape, dtype=torch.float32)
    last = mask.long().cumsum(1).argmax(1)  # the first position holding the row's full count
    out[torch.arange(mask.shape[0]), last] = scores.float()
    return out * mask


class LagrangeMultiplier:
    """lambda = exp(log_lambda) of PPO-Lagrangian (Safe-RLHF): `update(costs)` adds the episode costs to a
    window of the last `window` episodes and takes one Adam step on -(mean window cost - threshold) * lambda,
    so lambda rises while the windowed cost exceeds the threshold and falls below it; log_lambda is clamped at
    log(lambda_max), and `value` never exceeds lambda_max."""

    def __init__(self, init: float, lr: float, lambda_max: float, threshold: float, window: int):
        if init <= 0 or lambda_max < init or lr < 0 or window < 1:
            raise ConfigError(
                f"Lagrangian: lambda_init {init} must be > 0 and <= lambda_max {lambda_max}, "
                f"lambda_lr {lr} >= 0, cost_window {window} >= 1"
            )
        self.log_lambda = nn.Parameter(torch.tensor(math.log(init)))
        self.optimizer = torch.optim.Adam([self.log_lambda], lr=lr)
        self.lambda_max, self.threshold = lambda_max, threshold
        self.costs: deque[float] = deque(maxlen=window)

    @property
    def value(self) -> float:
        return min(math.exp(float(self.log_lambda.detach())), self.lambda_max)

    def update(self, costs: Sequence[float]) -> float:
        """Add episode costs, step log-lambda once; returns the windowed mean cost."""
        self.costs.extend(float(c) for c in costs)
        mean = sum(self.costs) / max(len(self.costs), 1)
        loss = -(mean - self.threshold) * self.log_lambda.exp()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.log_lambda.clamp_(max=math.log(self.lambda_max))
        return mean


# ---- rollouts -------------------------------------------------------------------------------------------
def sample_responses(
    decoder: UnifiedDecoder,
    prompts: Sequence[Sequence[int]],
    eos: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> list[list[int]]:
    """One sampled response per prompt (prompt ids as `vocab.prompt_ids` gives them), cut after its first
    `eos` (kept); prompts are batched by length (generate shares positions across a batch)."""
    out: list[list[int]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for k, (_, idx) in enumerate(sorted(by_len.items())):
        ids = torch.tensor([list(prompts[i]) for i in idx], dtype=torch.long)
        sampling = SamplingConfig(strategy="sample", temperature=temperature, seed=seed * 1009 + k)
        new = generate(decoder, ids, torch.full_like(ids, TEXT), max_new_tokens, sampling, stop_ids=[eos])
        for row, i in zip(new.tolist(), idx):
            out[i] = row[: row.index(eos) + 1] if eos in row else row
    return out


class Resampled:
    """Outcome of cut-and-resample: accepted (prompt index, response) pairs, the cut ones, samples drawn, cut
    count, dropped prompt indices."""

    def __init__(self) -> None:
        self.accepted: list[tuple[int, list[int]]] = []
        self.cut_trajectories: list[tuple[int, list[int]]] = []
        self.samples = 0
        self.cut = 0
        self.dropped: list[int] = []

    @property
    def resample_rate(self) -> float:
        """Fraction of drawn trajectories that were cut (each cut one is re-sampled or its prompt dropped)."""
        return self.cut / max(self.samples, 1)


def cut_and_resample(
    sample: Callable[[list[int], int], list[list[int]]],
    safety: Callable[[list[int], list[list[int]]], torch.Tensor],
    n_prompts: int,
    theta: float,
    budget: int,
) -> Resampled:
    """The seed's constraint (000, PPO-CS): a trajectory whose safety score falls under `theta` is cut and
    re-sampled; each prompt gets at most `budget` trajectories, and a prompt whose every trajectory was cut is
    dropped (listed in `dropped`), never accepted. `sample(prompt_indices, attempt)` draws one response per
    prompt; `safety(prompt_indices, responses)` scores them (batch,)."""
    if budget < 1:
        raise ConfigError(f"ppo.budget = {budget}: expected >= 1 trajectories per prompt")
    out = Resampled()
    pending = list(range(n_prompts))
    for attempt in range(budget):
        if not pending:
            break
        responses = sample(pending, attempt)
        scores = safety(pending, responses)
        out.samples += len(pending)
        still = []
        for i, r, s in zip(pending, responses, scores.tolist()):
            if s >= theta:
                out.accepted.append((i, r))
            else:
                out.cut += 1
                out.cut_trajectories.append((i, r))
                still.append(i)
        pending = still
    out.dropped = pending
    out.accepted.sort(key=lambda x: x[0])
    return out


def new_policy(vocab_size: int, dim: int, depth: int, heads: int, max_len: int) -> UnifiedDecoder:
    """A small text-only unified decoder."""
    return UnifiedDecoder(
        UnifiedConfig(vocab_size=vocab_size, dim=dim, depth=depth, heads=heads, max_len=max_len)
    )


__all__ = [
    "ActorCritic",
    "LagrangeMultiplier",
    "Resampled",
    "cut_and_resample",
    "decoder_hidden",
    "gae",
    "masked_mean",
    "masked_whiten",
    "new_policy",
    "sample_responses",
    "terminal_scores",
    "token_logprobs",
]
