"""The PPO-CS training loop: rollouts (with the chosen constraint), learned reward and cost, the clipped update.

`mechanism`:
- "none": plain PPO on the reward (with the KL penalty to the reference policy);
- "resample": the seed's cut-and-resample (000, PPO-CS): rollouts whose safety score 1 - cost falls under
  `theta` are cut and re-sampled, at most `budget` trajectories per prompt; prompts that exhaust the budget are
  dropped from the batch and counted; PPO trains on the accepted trajectories. With `cut_penalty` set, the cut
  trajectories also stay in the batch as episodes terminated by the violation, whose terminal reward is
  `cut_penalty` instead of the reward model's score (the early-terminated MDP reading of "terminate the
  trajectory"; Sun et al. 2021); they never count as accepted outputs;
- "lagrangian": PPO-Lagrangian (Safe-RLHF): lambda follows the windowed episode cost against
  `cost_threshold`, and the advantage is (A_R - lambda * A_C) / (1 + lambda).

The per-token reward is -kl_coef * (log pi - log pi_ref) with the reward model's score added on the last
response token; the cost is the cost model's score on the last token. Both go through GAE with their own
value (the two outputs of the value head); the policy advantage is whitened over the response tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from ..schema import Section
from ..unified.model import UnifiedDecoder
from .ppo import (
    ActorCritic,
    LagrangeMultiplier,
    cut_and_resample,
    gae,
    masked_mean,
    masked_whiten,
    sample_responses,
    terminal_scores,
    token_logprobs,
)
from .vocab import WordVocab, pack

Scorer = Callable[
    [Sequence[Sequence[int]], Sequence[Sequence[int]]], torch.Tensor
]  # (prompts, responses) -> (B,)
Judge = Callable[[int, str], tuple[bool, bool]]  # (prompt index, response text) -> (complete, harmful)


class PPOConfig(Section):
    """PPO and constraint settings (the `ppo:` section of configs/ppo_cs.yaml)."""

    mechanism: Literal["none", "resample", "lagrangian"] = "resample"
    steps: int = Field(40, ge=0)
    batch_prompts: int = Field(64, ge=1)
    epochs: int = Field(2, ge=1)
    minibatches: int = Field(1, ge=1)
    lr: float = Field(3e-4, ge=0)
    clip: float = Field(0.2, gt=0)
    kl_coef: float = Field(0.05, ge=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    vf_coef: float = Field(0.5, ge=0)
    max_new_tokens: int = Field(20, ge=1)
    temperature: float = Field(1.0, gt=0)
    # cut-and-resample
    theta: float = Field(0.5, ge=0, le=1)
    budget: int = Field(4, ge=1)
    cut_penalty: float | None = (
        None  # None: cut trajectories are discarded; a number: kept as terminated episodes
    )
    # PPO-Lagrangian
    cost_threshold: float = 0.05
    lambda_init: float = Field(1.0, gt=0)
    lambda_lr: float = Field(0.1, ge=0)
    lambda_max: float = Field(10.0, gt=0)
    cost_window: int = Field(128, ge=1)


class PPOTrainer:
    """PPO on `policy` (ActorCritic) against the frozen `reference` decoder, with a learned reward and cost."""

    def __init__(
        self,
        policy: ActorCritic,
        reference: UnifiedDecoder,
        vocab: WordVocab,
        prompts: Sequence[Sequence[int]],
        reward: Scorer,
        cost: Scorer,
        cfg: PPOConfig,
        seed: int = 0,
        judge: Judge | None = None,
    ):
        self.policy, self.reference, self.vocab, self.prompts = policy, reference.eval(), vocab, list(prompts)
        self.reward, self.cost, self.cfg, self.judge = reward, cost, cfg, judge
        # the reference is only run under no_grad; its requires_grad flags are left alone (a deepcopy of a
        # frozen module would give a frozen policy)
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
        self.rng = np.random.default_rng(seed)
        self.seed, self.step_count, self.dropped_total = seed, 0, 0
        self.lagrange = (
            LagrangeMultiplier(
                cfg.lambda_init, cfg.lambda_lr, cfg.lambda_max, cfg.cost_threshold, cfg.cost_window
            )
            if cfg.mechanism == "lagrangian"
            else None
        )

    # ---- rollouts ---------------------------------------------------------------------------------------
    def _sample(self, prompt_idx: list[int], attempt: int) -> list[list[int]]:
        cfg = self.cfg
        seed = (self.seed * 100003 + self.step_count) * 31 + attempt
        return sample_responses(
            self.policy.decoder,
            [self.prompts[i] for i in prompt_idx],
            self.vocab.eos,
            cfg.max_new_tokens,
            cfg.temperature,
            seed,
        )

    def rollout(
        self, prompt_idx: list[int]
    ) -> tuple[list[int], list[list[int]], dict[str, float], list[tuple[int, list[int]]]]:
        """(kept prompt indices, their responses, rollout stats, cut (prompt index, response) trajectories)."""
        if self.cfg.mechanism != "resample":
            return prompt_idx, self._sample(prompt_idx, 0), {"resample_rate": 0.0, "dropped": 0.0}, []

        def safety(local: list[int], responses: list[list[int]]) -> torch.Tensor:
            return 1.0 - self.cost([self.prompts[prompt_idx[i]] for i in local], responses)

        res = cut_and_resample(
            lambda local, attempt: self._sample([prompt_idx[i] for i in local], attempt),
            safety,
            len(prompt_idx),
            self.cfg.theta,
            self.cfg.budget,
        )
        self.dropped_total += len(res.dropped)
        kept = [prompt_idx[i] for i, _ in res.accepted]
        stats = {"resample_rate": res.resample_rate, "dropped": float(len(res.dropped))}
        cut = [(prompt_idx[i], r) for i, r in res.cut_trajectories]
        return kept, [r for _, r in res.accepted], stats, cut

    # ---- one PPO step -----------------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """Draw a batch of prompts, roll out, score, and update; returns the step's metrics."""
        cfg = self.cfg
        idx = self.rng.choice(
            len(self.prompts), size=min(cfg.batch_prompts, len(self.prompts)), replace=False
        )
        kept, responses, stats, cut = self.rollout([int(i) for i in idx])
        self.step_count += 1
        metrics: dict[str, float] = {"step": float(self.step_count), **stats}
        metrics["dropped_total"] = float(self.dropped_total)
        if self.judge is not None and kept:
            judged = [self.judge(i, self.vocab.decode(r)) for i, r in zip(kept, responses)]
            metrics["complete"] = float(np.mean([c for c, _ in judged]))
            metrics["harmful"] = float(np.mean([h for _, h in judged]))
        if not kept and not (cut and cfg.cut_penalty is not None):  # every prompt dropped: nothing to learn
            metrics.update(n=0.0, **({"lambda": self.lagrange.value} if self.lagrange else {}))
            return metrics
        prompts = [self.prompts[i] for i in kept]
        with torch.no_grad():
            reward = self.reward(prompts, responses).float() if kept else torch.zeros(0)
            cost = self.cost(prompts, responses).float() if kept else torch.zeros(0)
        metrics.update(n=float(len(kept)))
        if kept:
            metrics.update(reward=float(reward.mean()), cost=float(cost.mean()))
        if cut and cfg.cut_penalty is not None:  # terminated episodes: the penalty replaces the reward
            metrics["n_cut_trained"] = float(len(cut))
            prompts = prompts + [self.prompts[i] for i, _ in cut]
            responses = list(responses) + [r for _, r in cut]
            reward = torch.cat([reward, torch.full((len(cut),), float(cfg.cut_penalty))])
            with torch.no_grad():
                cost = torch.cat(
                    [cost, self.cost([self.prompts[i] for i, _ in cut], [r for _, r in cut]).float()]
                )
        if self.lagrange is not None:
            metrics["cost_window"] = self.lagrange.update(cost.tolist())
            metrics["lambda"] = self.lagrange.value
        metrics.update(self.update(prompts, responses, reward, cost))
        return metrics

    def update(
        self,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        reward: torch.Tensor,
        cost: torch.Tensor,
    ) -> dict[str, float]:
        """The PPO update on scored rollouts: GAE, (Lagrangian) advantage, masked whitening, clipped ratio."""
        cfg = self.cfg
        ids, resp = pack(prompts, responses, self.vocab.pad)
        amask = resp[:, 1:]  # (batch, T - 1): the actions
        chunks = [c for c in torch.arange(len(ids)).chunk(cfg.minibatches) if len(c)]
        self.policy.train()
        with torch.no_grad():  # old log-probs and values, in the minibatches the update will use
            old_logp, old_values = torch.zeros(amask.shape), torch.zeros((*amask.shape, 2))
            for c in chunks:
                old_logp[c], old_values[c] = self.policy(ids[c])
            ref_logp = token_logprobs(self.reference(ids, torch.zeros_like(ids)).logits, ids)
        kl = (old_logp - ref_logp) * amask
        rewards = -cfg.kl_coef * kl + terminal_scores(reward, amask)
        costs = terminal_scores(cost, amask)
        adv_r, ret_r = gae(rewards, old_values[..., 0], amask, cfg.gamma, cfg.lam)
        adv_c, ret_c = gae(costs, old_values[..., 1], amask, cfg.gamma, cfg.lam)
        if self.lagrange is not None:
            lam = self.lagrange.value
            adv = (adv_r - lam * adv_c) / (1.0 + lam)
        else:
            adv = adv_r
        adv = masked_whiten(adv, amask)
        returns = torch.stack([ret_r, ret_c], dim=-1)
        stats: dict[str, list[float]] = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "ratio": [], "dev": []}
        for _ in range(cfg.epochs):
            for c in chunks:
                m = amask[c]
                logp, values = self.policy(ids[c])
                ratio = torch.exp(logp - old_logp[c])
                pg = torch.maximum(-adv[c] * ratio, -adv[c] * ratio.clamp(1 - cfg.clip, 1 + cfg.clip))
                pg_loss = masked_mean(pg, m)
                vf_loss = 0.5 * masked_mean(((values - returns[c]) ** 2).sum(-1), m)
                loss = pg_loss + cfg.vf_coef * vf_loss
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                stats["pg_loss"].append(float(pg_loss.detach()))
                stats["vf_loss"].append(float(vf_loss.detach()))
                stats["clipfrac"].append(float(masked_mean(((ratio - 1).abs() > cfg.clip).float(), m)))
                stats["ratio"].append(float(masked_mean(ratio.detach(), m)))
                stats["dev"].append(float(((ratio.detach() - 1).abs() * m).max()))
        dev = stats.pop("dev")
        out = {k: float(np.mean(v)) for k, v in stats.items()}
        out["ratio_max_dev"] = max(dev)  # max |ratio - 1| over every trained token
        out["kl"] = float(kl.sum(1).mean())  # per-sequence KL(pi_old || pi_ref), sampled estimate
        out["response_len"] = float(amask.sum(1).float().mean())
        return out

    def train(self, log: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
        history = []
        for _ in range(self.cfg.steps):
            m = self.step()
            history.append(m)
            if log is not None:
                log(m)
        return history


__all__ = ["Judge", "PPOConfig", "PPOTrainer", "Scorer"]
