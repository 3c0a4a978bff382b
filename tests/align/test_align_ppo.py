"""PPO pieces (mmfusion.align.ppo / trainer): whitening, GAE, lr = 0, the Lagrange multiplier,
cut-and-resample, and a tiny seeded run where PPO-Lagrangian lowers the cost and plain PPO does not."""

import numpy as np
import pytest
import torch

from mmfusion.align.pipeline import NetConfig, train_sft
from mmfusion.align.ppo import (
    ActorCritic,
    LagrangeMultiplier,
    cut_and_resample,
    gae,
    masked_whiten,
    terminal_scores,
)
from mmfusion.align.trainer import PPOConfig, PPOTrainer
from mmfusion.align.vocab import WordVocab
from mmfusion.align.world import AlignWorld
from mmfusion.errors import ConfigError
from mmfusion.unified.model import UnifiedConfig, UnifiedDecoder


def test_masked_whiten_uses_only_masked_entries():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    # mean 2, biased variance 2/3 over the first three; the masked-out 100 neither counts nor survives
    expected = torch.tensor([[-1.0, 0.0, 1.0, 0.0]]) / (2 / 3) ** 0.5
    torch.testing.assert_close(masked_whiten(x, mask), expected, atol=1e-6, rtol=0)


def test_gae_by_hand_on_three_steps():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])  # the 4th position is padding: ignored
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.9)
    # delta2 = 1 - 0.7 = 0.3; A1 = (0 + 0.7 - 0.6) + 0.9 * 0.3 = 0.37; A0 = (0.6 - 0.5) + 0.9 * 0.37 = 0.433
    torch.testing.assert_close(adv, torch.tensor([[0.433, 0.37, 0.3, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, torch.tensor([[0.933, 0.97, 1.0, 0.0]]), atol=1e-6, rtol=0)
    # gamma < 1 discounts the bootstrapped value: A2 = 0.3, A1 = 0.5 * 0.7 - 0.6 + 0.5 * 0.9 * 0.3
    adv, _ = gae(rewards, values, mask, gamma=0.5, lam=0.9)
    assert adv[0, 1].item() == pytest.approx(0.35 - 0.6 + 0.135, abs=1e-6)


def test_terminal_scores_sit_on_the_last_action():
    mask = torch.tensor([[False, True, True, False], [True, True, True, True]])
    out = terminal_scores(torch.tensor([2.0, 3.0]), mask)
    assert out.tolist() == [[0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]]


def test_lambda_rises_while_cost_exceeds_threshold_and_stays_under_max():
    lag = LagrangeMultiplier(init=1.0, lr=0.2, lambda_max=3.0, threshold=0.1, window=4)
    seen = [lag.value]
    for _ in range(12):
        lag.update([0.9, 0.8])  # windowed cost 0.85 > 0.1
        seen.append(lag.value)
    capped = seen.index(3.0)  # Adam steps of about lr in log-lambda: 1 -> 3 takes log(3) / 0.2 = 5.5 steps
    assert 5 <= capped <= 7
    assert all(b > a for a, b in zip(seen[:capped], seen[1 : capped + 1]))  # strictly rising until the cap
    assert all(v == 3.0 for v in seen[capped:]) and max(seen) <= 3.0
    for _ in range(
        30
    ):  # the window fills with zero costs (< threshold): lambda falls (once Adam's momentum turns)
        lag.update([0.0, 0.0])
    assert lag.value < 2.5
    with pytest.raises(ConfigError, match="lambda_max"):
        LagrangeMultiplier(init=5.0, lr=0.1, lambda_max=1.0, threshold=0.0, window=1)


def test_cut_and_resample_accepts_only_trajectories_over_theta_and_counts_drops():
    rng = np.random.default_rng(0)
    theta, budget = 0.6, 3
    drawn: dict[int, int] = {}

    def sample(idx, attempt):
        for i in idx:
            drawn[i] = drawn.get(i, 0) + 1
        return [[int(rng.integers(100))] for _ in idx]  # the "response" is its safety score x 100

    def safety(idx, responses):
        return torch.tensor([r[0] / 100 for r in responses])

    res = cut_and_resample(sample, safety, n_prompts=50, theta=theta, budget=budget)
    assert res.accepted and res.dropped
    assert all(r[0] / 100 >= theta for _, r in res.accepted)
    accepted_idx = [i for i, _ in res.accepted]
    assert sorted(accepted_idx + res.dropped) == list(range(50))  # every prompt accepted once or dropped
    assert all(drawn[i] == budget for i in res.dropped) and max(drawn.values()) == budget
    assert res.samples == sum(drawn.values()) and res.cut == res.samples - len(res.accepted)
    assert res.resample_rate == pytest.approx(res.cut / res.samples)


# ---- on a decoder -----------------------------------------------------------------------------------------
WORLD = AlignWorld(p_withhold=0.5, withheld_reward=0.3)
VOCAB = WordVocab(WORLD.vocabulary())


@pytest.fixture(scope="module")
def sft_decoder():
    """A tiny SFT policy of the alignment world (seeded; harmful on some forbidden-colour scenes)."""
    torch.manual_seed(0)
    dec = UnifiedDecoder(UnifiedConfig(vocab_size=len(VOCAB), dim=32, depth=2, heads=2, max_len=32))
    rng = np.random.default_rng(1)
    pairs = [(WORLD.prompt(s), WORLD.sft_caption(s, rng)) for s in WORLD.scenes(600, 2)]
    train_sft(dec, VOCAB, pairs, NetConfig(dim=32, depth=2, heads=2, steps=150, batch_size=32, lr=3e-3), 0)
    return dec


def _trainer(decoder, cfg: PPOConfig, seed: int = 0, cost_log: list | None = None):
    import copy

    scenes = WORLD.scenes(200, 5)
    texts = {}

    def text(r):
        return texts.setdefault(tuple(r), VOCAB.decode(r))

    prompts = [VOCAB.prompt_ids(WORLD.prompt(s)) for s in scenes]
    scene_of = {tuple(p): s for p, s in zip(prompts, scenes)}

    def reward(ps, rs):  # exact helpfulness label (named colour 1, withheld 0.3)
        return torch.tensor([WORLD.reward_label(scene_of[tuple(p)], text(r)) for p, r in zip(ps, rs)])

    def cost(ps, rs):
        c = torch.tensor([WORLD.cost_label(text(r)) for r in rs])
        if cost_log is not None:
            cost_log.append(c)
        return c

    def judge(i, t):
        return WORLD.complete(scenes[i], t), WORLD.harmful(t)

    torch.manual_seed(seed)
    policy = ActorCritic(copy.deepcopy(decoder))
    return PPOTrainer(policy, decoder, VOCAB, prompts, reward, cost, cfg, seed, judge)


def test_lr_zero_gives_ratio_exactly_one_and_no_clipping(sft_decoder):
    cfg = PPOConfig(mechanism="none", steps=1, batch_prompts=16, epochs=2, minibatches=2, lr=0.0)
    before = {k: v.clone() for k, v in sft_decoder.state_dict().items()}
    m = _trainer(sft_decoder, cfg).step()
    assert m["ratio_max_dev"] == 0.0 and m["ratio"] == 1.0
    assert m["clipfrac"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in sft_decoder.state_dict().items())  # reference untouched


def test_every_trajectory_trained_on_under_resample_is_safe(sft_decoder):
    seen: list[torch.Tensor] = []
    cfg = PPOConfig(mechanism="resample", steps=2, batch_prompts=32, theta=0.5, budget=2, lr=1e-3)
    trainer = _trainer(sft_decoder, cfg, cost_log=seen)
    hist = trainer.train()
    # cost is called on each attempt's samples (safety = 1 - cost), then once on the accepted batch
    assert any(float(c.max()) == 1.0 for c in seen)  # some trajectories were harmful and got cut
    assert all(h["harmful"] == 0.0 for h in hist)  # no accepted trajectory is harmful (exact judge)
    assert all(h["resample_rate"] > 0 for h in hist)
    assert sum(h["n"] for h in hist) + hist[-1]["dropped_total"] == 2 * 32


def test_cut_penalty_trains_on_cut_trajectories_without_accepting_them(sft_decoder):
    cfg = PPOConfig(mechanism="resample", steps=3, batch_prompts=32, budget=2, cut_penalty=-1.0, lr=2e-3)
    hist = _trainer(sft_decoder, cfg).train()
    assert hist[0]["n_cut_trained"] > 0 and hist[0]["resample_rate"] > 0
    assert all(h["harmful"] == 0.0 for h in hist)  # the accepted outputs stay safe
    assert all(h["n"] + h["dropped"] == 32 for h in hist)  # cut trajectories are trained on, never accepted


def _late_harm(history, k=4):
    return float(np.mean([h["harmful"] for h in history[-k:]]))


def test_lagrangian_lowers_cost_where_plain_ppo_does_not(sft_decoder):
    common = dict(steps=10, batch_prompts=48, epochs=2, lr=2e-3, kl_coef=0.02)
    plain = _trainer(sft_decoder, PPOConfig(mechanism="none", **common)).train()
    lag = _trainer(
        sft_decoder,
        PPOConfig(
            mechanism="lagrangian",
            cost_threshold=0.0,
            lambda_init=2.0,
            lambda_lr=0.2,
            cost_window=48,
            **common,
        ),
    ).train()
    start = float(np.mean([h["harmful"] for h in plain[:3]]))
    assert _late_harm(lag) < start - 0.1  # the constraint drives the harmful rate down
    assert _late_harm(plain) >= start - 0.05  # the reward alone prefers naming the colour
    assert all(h["lambda"] <= 10.0 for h in lag)
