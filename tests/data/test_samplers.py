import io
import math

import numpy as np
import pytest
import torch

from mmfusion.data.samplers import (
    CurriculumSchedule,
    DDWASampler,
    MixtureSampler,
    logit_grad_norm,
    mas_weights,
    plot_mixture,
    sample_complexity,
    source_complexity,
    temperature_weights,
)
from mmfusion.errors import ConfigError, DataError

# empirical shares over N draws: the std of one share is sqrt(p (1 - p) / N) <= 0.0029 at N = 30k, so a
# tolerance of 0.015 is over 5 standard deviations (the draws are seeded, so the test is deterministic anyway)
N_DRAWS = 30_000
TOL = 0.015


def shares(sampler, n):
    counts = np.zeros(len(sampler.sizes))
    for _ in range(n):
        s, _ = next(sampler)
        counts[s] += 1
    return counts / n


# ---- formulas ---------------------------------------------------------------------------------------------
def test_temperature_formula():
    assert temperature_weights([100, 400, 900], 2.0) == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=1e-12)
    assert temperature_weights([100, 400, 900], 1.0) == pytest.approx([100 / 1400, 400 / 1400, 900 / 1400])
    assert temperature_weights([100, 400, 900], math.inf) == pytest.approx([1 / 3] * 3)
    # large T approaches uniform
    assert max(temperature_weights([100, 400, 900], 1e6)) < 1 / 3 + 1e-5


def test_temperature_sampler_empirical_shares():
    sampler = MixtureSampler.with_temperature([100, 400, 900], 2.0, seed=0)
    assert sampler.target() == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    got = shares(sampler, N_DRAWS)
    assert got == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=TOL)
    assert sampler.counts == pytest.approx(list(got * N_DRAWS))


def test_mas_weights_on_hand_made_complexities():
    assert mas_weights([1.0, 4.0, 16.0], 0.5) == pytest.approx([1 / 7, 2 / 7, 4 / 7], abs=1e-12)
    assert mas_weights([1.0, 4.0, 16.0], 1.0) == pytest.approx([1 / 21, 4 / 21, 16 / 21])
    assert mas_weights([1.0, 4.0, 16.0], 0.0) == pytest.approx([1 / 3] * 3)
    sampler = MixtureSampler.with_mas([range(10)] * 3, 0.5, complexities=[1.0, 4.0, 16.0], seed=3)
    assert shares(sampler, N_DRAWS) == pytest.approx([1 / 7, 2 / 7, 4 / 7], abs=TOL)


def test_complexity_measured_from_data():
    text = {"text": "a small red circle"}  # 4 tokens
    video = {"video": np.zeros((8, 4, 4, 3), np.uint8), "text": "a b"}  # 8 frames + 2 tokens
    audio = {"audio": np.zeros(8000, np.float32), "audio_sr": 16000}  # 0.5 s
    image = {"image": np.zeros((4, 4, 3), np.uint8), "text": None}  # one frame; a None text is absent
    assert sample_complexity(text) == 4
    assert sample_complexity(video) == 10
    assert sample_complexity(audio) == 0.5
    assert sample_complexity(image) == 1
    assert sample_complexity(audio, units={"audio": 16.0}) == 8.0
    assert sample_complexity(text, count_tokens=lambda s: len(s)) == len("a small red circle")
    assert source_complexity([text, video]) == 7
    assert source_complexity([text, video, audio], probe=1) == 4
    with pytest.raises(DataError, match="empty source"):
        source_complexity([])
    with pytest.raises(DataError, match="audio_sr"):
        sample_complexity({"id": "x", "audio": np.zeros(10)})
    # MAS end to end from the data: complexities 4, 10 -> alpha 1 gives [4/14, 10/14]
    s = MixtureSampler.with_mas([[text], [video]], alpha=1.0)
    assert s.target() == pytest.approx([4 / 14, 10 / 14])


def test_curriculum_interpolation_exact():
    sched = CurriculumSchedule([(0, [1, 0, 0]), (100, [0, 1, 1]), (300, [1, 1, 2])])
    assert sched(0) == [1.0, 0.0, 0.0]
    assert sched(-5) == [1.0, 0.0, 0.0]
    assert sched(50) == pytest.approx([0.5, 0.25, 0.25], abs=1e-15)
    assert sched(100) == pytest.approx([0.0, 0.5, 0.5], abs=1e-15)
    assert sched(200) == pytest.approx([0.125, 0.375, 0.5], abs=1e-15)
    assert sched(300) == pytest.approx([0.25, 0.25, 0.5], abs=1e-15)
    assert sched(10_000) == pytest.approx([0.25, 0.25, 0.5], abs=1e-15)
    lin = CurriculumSchedule.linear([3, 1], [1, 3], steps=10)
    assert lin(0) == [0.75, 0.25]
    assert lin(5) == pytest.approx([0.5, 0.5], abs=1e-15)
    assert lin(10) == [0.25, 0.75]
    # the sampler uses the schedule per step (batch_size draws share one step)
    sampler = MixtureSampler([5, 5, 5], sched, batch_size=4)
    for _ in range(4 * 50):
        next(sampler)
    assert sampler.step == 50 and sampler.target() == pytest.approx([0.5, 0.25, 0.25])
    # before step 100 only source 0 can appear at step 0
    fresh = MixtureSampler([5, 5, 5], sched, batch_size=4)
    assert {s for s, _ in fresh.next_batch()} == {0}


def test_curriculum_realised_follows_target():
    sched = CurriculumSchedule.linear([1, 0], [0, 1], steps=100)
    sampler = MixtureSampler([50, 50], sched, batch_size=100, num_samples=100 * 100, log_every=10, seed=1)
    list(sampler)
    for h in sampler.history:
        d = sum(h["window_counts"])
        assert h["window_counts"][0] / d == pytest.approx(h["window_expected"][0] / d, abs=0.03)
    assert sampler.history[-1]["target"] == [0.0, 1.0]


def test_samples_cover_each_source_without_replacement_per_epoch():
    sampler = MixtureSampler([7, 3], [1, 1], seed=5)
    seen = {0: [], 1: []}
    while len(seen[0]) < 14 or len(seen[1]) < 6:
        s, i = next(sampler)
        seen[s].append(i)
    assert sorted(seen[0][:7]) == list(range(7)) and sorted(seen[0][7:14]) == list(range(7))
    assert sorted(seen[1][:3]) == list(range(3))
    assert seen[0][:7] != seen[0][7:14]  # reshuffled per epoch
    assert sampler.flat_index((1, 2)) == 9


def test_determinism_and_seed_dependence():
    s1, s2 = MixtureSampler([10, 20], [1, 2], seed=4), MixtureSampler([10, 20], [1, 2], seed=4)
    a = [next(s1) for _ in range(500)]
    assert a == [next(s2) for _ in range(500)]
    s3 = MixtureSampler([10, 20], [1, 2], seed=5)
    assert a != [next(s3) for _ in range(500)]


def test_state_dict_resume_identical_continuation():
    sched = CurriculumSchedule.linear([1, 1, 1], [1, 0, 3], steps=40)
    ref = MixtureSampler([13, 29, 7], sched, seed=9, batch_size=3, log_every=5)
    first = [next(ref) for _ in range(61)]  # stop mid-batch
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    rest = [next(ref) for _ in range(200)]
    resumed = MixtureSampler([13, 29, 7], sched, seed=9, batch_size=3, log_every=5)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert [next(resumed) for _ in range(200)] == rest
    assert resumed.counts == ref.counts and resumed.history == ref.history
    # and it equals an uninterrupted run
    whole = MixtureSampler([13, 29, 7], sched, seed=9, batch_size=3, log_every=5)
    assert [next(whole) for _ in range(261)] == first + rest
    with pytest.raises(ConfigError, match="seed=9"):
        MixtureSampler([13, 29, 7], sched, seed=1, batch_size=3).load_state_dict(ref.state_dict())


def test_num_samples_and_mixture_log(tmp_path):
    sampler = MixtureSampler([10, 30], seed=0, num_samples=400, log_every=100)
    assert len(sampler) == 400 and len(list(sampler)) == 400
    m = sampler.mixture()
    assert m["draws"] == 400 and sum(m["counts"]) == 400 and m["target"] == pytest.approx([0.25, 0.75])
    assert sum(m["shares"]) == pytest.approx(1.0) and m["expected_shares"] == pytest.approx([0.25, 0.75])
    assert [h["step"] for h in sampler.history] == [100, 200, 300, 400]
    out = plot_mixture(sampler.history, tmp_path / "sub" / "mix.png", names=["a", "b"])
    assert out.exists() and out.stat().st_size > 1000


def test_clear_errors():
    with pytest.raises(DataError, match=r"source 1 is empty"):
        MixtureSampler([[1, 2], []])
    with pytest.raises(ConfigError, match=r"temperature must be > 0.*-1"):
        temperature_weights([1, 2], -1)
    with pytest.raises(ConfigError, match=r"temperature must be > 0.*0"):
        MixtureSampler.with_temperature([1, 2], 0)
    with pytest.raises(ConfigError, match=r"alpha must be .*>= 0, got -0.5"):
        mas_weights([1.0, 2.0], -0.5)
    with pytest.raises(ConfigError, match=r"complexities\[1\]=0.0"):
        mas_weights([1.0, 0.0], 1.0)
    with pytest.raises(ConfigError, match=r"weights has 2 entries \(\[1, 2\]\) but there are 3 sources"):
        MixtureSampler([1, 2, 3], [1, 2])
    with pytest.raises(ConfigError, match=r"weights must be finite and >= 0, got \[1.0, -1.0\]"):
        MixtureSampler([1, 2], [1, -1])
    with pytest.raises(ConfigError, match=r"CurriculumSchedule over 2 sources.*3 sources"):
        MixtureSampler([1, 2, 3], CurriculumSchedule.linear([1, 1], [1, 2], 5))
    with pytest.raises(ConfigError, match=r"milestones\[1\] weights has 3 entries"):
        CurriculumSchedule([(0, [1, 1]), (5, [1, 1, 1])])
    with pytest.raises(ConfigError, match=r"strictly increasing, got \[5, 5\]"):
        CurriculumSchedule([(5, [1, 1]), (5, [1, 2])])
    with pytest.raises(ConfigError, match=r"complexities has 1 entries"):
        MixtureSampler.with_mas([[{}], [{}]], 1.0, complexities=[1.0])
    with pytest.raises(ConfigError, match=r"weights\(0\) has 1 entries"):
        next(MixtureSampler([1, 2], lambda step: [1]))
    with pytest.raises(DataError, match="n must be >= 1"):
        DDWASampler(0, 4)
    with pytest.raises(ConfigError, match="top_fraction must be in \\[0, 1\\], got 1.5"):
        DDWASampler(10, 4, top_fraction=1.5)
    with pytest.raises(ConfigError, match="boost must be a finite number > 0, got -1"):
        DDWASampler(10, 4, boost=-1)


# ---- DDWA ------------------------------------------------------------------------------------------------
def test_logit_grad_norm_matches_autograd():
    torch.manual_seed(0)
    z = torch.randn(6, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = torch.nn.functional.cross_entropy(z, y, reduction="sum")
    (g,) = torch.autograd.grad(loss, z)
    assert torch.allclose(logit_grad_norm(z, y), g.norm(dim=1), atol=1e-6)


def test_ddwa_weights_hand_made_case():
    s = DDWASampler(5, batch_size=2, warmup=0, update_every=10, boost=1.3, top_fraction=0.4)
    # sample 0 seen twice (mean 0.5), sample 4 never seen: seen = 4 samples -> top ceil(0.4 * 4) = 2
    s.update([0, 1, 2, 3, 0], scores=[0.9, 0.2, 0.8, 0.7, 0.1])
    assert torch.allclose(s.mean_scores()[:4], torch.tensor([0.5, 0.2, 0.8, 0.7], dtype=torch.float64))
    assert torch.isnan(s.mean_scores()[4])
    s.next_batch()  # step 0 >= warmup: reweight before drawing
    expected = torch.tensor([1.0, 1.0, 1.3, 1.3, 1.0], dtype=torch.float64) / 5.6
    assert torch.allclose(s.weights, expected, atol=1e-15)
    assert s.boosted.tolist() == [False, False, True, True, False]
    # ties: lower index first; top_fraction 0 boosts nothing
    t = DDWASampler(4, 1, warmup=0, top_fraction=0.5)
    t.update([0, 1, 2, 3], scores=[1.0, 1.0, 1.0, 0.0])
    t.reweight()
    assert t.boosted.tolist() == [True, True, False, False]
    u = DDWASampler(4, 1, warmup=0, top_fraction=0.0)
    u.update([0, 1], scores=[1.0, 2.0])
    u.reweight()
    assert torch.allclose(u.weights, torch.full((4,), 0.25, dtype=torch.float64))
    # update from logits uses the closed-form norm
    v = DDWASampler(2, 1)
    got = v.update([0, 1], logits=torch.tensor([[0.0, 0.0], [10.0, -10.0]]), labels=torch.tensor([0, 0]))
    assert got[0].item() == pytest.approx(math.sqrt(0.5)) and got[1].item() < 1e-6


def test_ddwa_warmup_is_uniform_and_update_schedule():
    s = DDWASampler(4, batch_size=1000, warmup=3, update_every=2, top_fraction=0.25, boost=3.0, seed=0)
    s.update([0], scores=[5.0])
    counts = torch.zeros(4)
    for _ in range(3):
        counts += torch.bincount(torch.tensor(s.next_batch()), minlength=4)
        assert s.reweights == 0
        assert torch.equal(s.weights, torch.full((4,), 0.25, dtype=torch.float64))
    assert (counts / 3000 - 0.25).abs().max() < 0.03
    s.next_batch()  # step 3: first reweight
    assert s.reweights == 1 and s.boosted.tolist() == [True, False, False, False]
    assert s.weights[0].item() == pytest.approx(0.5)
    batch = s.next_batch()  # step 4: no reweight
    assert s.reweights == 1 and batch.count(0) > 400
    s.next_batch()  # step 5: reweight again
    assert s.reweights == 2


def test_ddwa_determinism_and_resume():
    def run(sampler, steps):
        out = []
        for _ in range(steps):
            b = sampler.next_batch()
            sampler.update(b, scores=[(i * 37 % 11) / 11 for i in b])
            out.append(b)
        return out

    a = DDWASampler(50, 8, warmup=3, update_every=2, seed=2)
    first = run(a, 5)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    rest = run(a, 10)
    b = DDWASampler(50, 8, warmup=3, update_every=2, seed=2)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert run(b, 10) == rest
    c = DDWASampler(50, 8, warmup=3, update_every=2, seed=2)
    assert run(c, 15) == first + rest
    assert run(DDWASampler(50, 8, warmup=3, update_every=2, seed=3), 15) != first + rest
    # boost 1.0 is uniform with the same stream
    d, e = DDWASampler(50, 8, warmup=0, boost=1.0, seed=2), DDWASampler(50, 8, warmup=10**9, seed=2)
    assert run(d, 6) == run(e, 6)
