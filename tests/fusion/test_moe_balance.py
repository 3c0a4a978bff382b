"""MoE acceptance figures (top-2 of 8) at benchmark scale, seed 0 only, budgeted in steps.

The training runs are `benchmarks/moe_balance.py` itself (imported from its path) with its default config:
dim 32, 16 Gaussian clusters with cluster-specific targets, 256 tokens per step, 600 Adam steps, dropless,
load_balance_coef 1e-1 or aux-free bias (bias_update_rate 1e-3); loads are measured on 4096 held-out tokens.
The full benchmark runs seeds 0 1 2 and writes the table in docs/moe_balance.md; this file runs seed 0 once
per setting (about 4 s each on one core) and asserts the issue's thresholds:
  * balanced settings (lb, auxfree, and both forced-collapse starts): load CV < 0.1, max/mean < 1.25, no dead
    expert, and the balancing costs the task at most 10 % MSE against no balancing;
  * no balancing: CV > 0.2 (measured 0.295 for seed 0; the issue's calibration said ~0.6, see the doc) and at
    least 2x the CV of every balanced setting;
  * forced collapse (router bias 4 on expert 0: share 0.5 of the assignments at step 0, the top-2 maximum):
    that share falls below 2/E within 600 steps (measured: step 52 with lb, 157 with aux-free).
Plus forward-only checks not already in test_moe.py: top-2-of-8 combine weights sum to 1 and are the
renormalised full-softmax probabilities of the selected experts (also when aux-free bias changes the
selection); the router runs in fp32 for a bf16 module and input; capacity at top-2 of 8 with a collapsed
router keeps each expert within ceil(cf * T * k / E), overflow passes through the residual, dropless drops none.
"""

import functools
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmfusion.fusion.moe import MoEFusion

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "moe_balance.py"
_spec = importlib.util.spec_from_file_location("moe_balance_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up while the file executes
_spec.loader.exec_module(bench)

E, K = 8, 2
BALANCED = ["lb", "auxfree", "collapse_lb", "collapse_auxfree"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def _result(setting: str):
    cfg = bench.Config()
    assert (cfg.num_experts, cfg.top_k, cfg.steps) == (E, K, 600)
    return bench.run(cfg, setting, seed=0)


@pytest.mark.parametrize("setting", BALANCED)
def test_balanced_settings_reach_issue_thresholds(setting):
    r = _result(setting)
    assert r.cv < 0.1, r
    assert r.max_over_mean < 1.25, r
    assert r.dead == 0, r
    assert r.task_mse < 1.1 * _result("none").task_mse, (r.task_mse, _result("none").task_mse)


def test_no_balancing_is_clearly_less_balanced():
    r = _result("none")
    assert r.cv > 0.2, r  # measured 0.295 (seed 0)
    assert r.max_over_mean > 1.25, r  # measured 1.50
    for setting in BALANCED:
        assert r.cv > 2 * _result(setting).cv, setting


@pytest.mark.parametrize("setting", ["collapse_lb", "collapse_auxfree"])
def test_forced_collapse_recovers_below_two_over_e_within_600_steps(setting):
    r = _result(setting)
    assert r.share_curve[0] == pytest.approx(1 / K)  # collapsed: expert 0 in every token's top-2
    assert 0 < r.recovery_step < 600, r.recovery_step
    assert r.share_curve[r.recovery_step] < 2 / E
    assert max(r.share_curve[-100:]) < 2 / E  # and it stays recovered
    assert r.share_collapsed < 2 / E  # held-out share at the end


def _tokens(seed=0, b=8, n=32, d=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g).to(dtype)


def _forward_with_h(moe, x):
    """Run moe on one modality and capture the normed tokens the router sees."""
    seen = {}
    handle = moe.norm.register_forward_hook(lambda mod, inp, out: seen.setdefault("h", out))
    try:
        out = moe({"x": x}, {"x": torch.ones(x.shape[0], dtype=torch.bool)})
    finally:
        handle.remove()
    return out, seen["h"]


@pytest.mark.parametrize("aux_free", [False, True])
def test_top2_of_8_combine_weights_sum_to_one(aux_free):
    torch.manual_seed(0)
    moe = MoEFusion(["x"], 32, num_experts=E, top_k=K, aux_free_bias=aux_free)
    if aux_free:
        with torch.no_grad():
            moe.expert_bias.copy_(torch.linspace(-0.3, 0.3, E))  # moves selection away from the top probs
    out, h = _forward_with_h(moe, _tokens())
    w, idx = out.info["combine_weights"], out.info["expert_index"]
    assert w.shape == (256, K) and (w > 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(256), rtol=0, atol=1e-6)
    probs = F.linear(h.float(), moe.router.weight.float()).softmax(-1)
    top = probs.gather(1, idx)
    torch.testing.assert_close(w, top / top.sum(-1, keepdim=True), rtol=0, atol=1e-6)
    differs = (idx != probs.topk(K, dim=-1).indices).any(-1).float().mean()
    assert (differs > 0.2) if aux_free else (differs == 0)


def test_router_is_fp32_for_bf16_module_and_input():
    torch.manual_seed(0)
    moe = MoEFusion(["x"], 32, num_experts=E, top_k=K, capacity_factor=None).to(torch.bfloat16)
    out, h = _forward_with_h(moe, _tokens(dtype=torch.bfloat16))
    assert h.dtype == torch.bfloat16 and out.tokens.dtype == torch.bfloat16
    for key in ("combine_weights", "lb_loss", "z_loss"):
        assert out.info[key].dtype == torch.float32, key
    logits32 = F.linear(h.float(), moe.router.weight.float())
    probs32 = logits32.softmax(-1)
    top = probs32.gather(1, out.info["expert_index"])
    torch.testing.assert_close(
        out.info["combine_weights"], top / top.sum(-1, keepdim=True), rtol=0, atol=1e-6
    )
    assert out.info["z_loss"].item() == pytest.approx(
        torch.logsumexp(logits32, -1).square().mean().item(), abs=1e-5
    )
    # the same router in bf16 would give visibly different weights, so the check above can fail
    probs16 = F.linear(h, moe.router.weight).softmax(-1).float()
    top16 = probs16.gather(1, out.info["expert_index"])
    assert (top16 / top16.sum(-1, keepdim=True) - out.info["combine_weights"]).abs().max() > 1e-4


def test_capacity_top2_of_8_with_collapsed_router():
    x = _tokens()
    t = x.shape[0] * x.shape[1]
    for cf in (1.25, 0.25, None):
        torch.manual_seed(0)
        moe = MoEFusion(["x"], 32, num_experts=E, top_k=K, capacity_factor=cf, router_bias=True)
        with torch.no_grad():
            moe.router.bias[0] = 4.0
        out, _ = _forward_with_h(moe, x)
        idx, kept = out.info["expert_index"], out.info["kept"]
        assert (idx == 0).any(-1).all()  # every token wants expert 0
        per_expert = torch.bincount(idx[kept], minlength=E)
        if cf is None:
            assert kept.all() and out.info["dropped"].item() == 0
            continue
        cap = math.ceil(cf * t * K / E)  # 80, 16
        assert per_expert.max().item() <= cap and per_expert[0].item() == cap
        assert out.info["dropped"].item() == (~kept).sum().item() > 0
        none_left = ~kept.any(-1)
        assert none_left.any() == (cf < 1)  # at 0.25 second choices overflow too
        flat_in, flat_out = x.reshape(t, -1), out.tokens.reshape(t, -1)
        assert torch.equal(flat_out[none_left], flat_in[none_left])  # overflow: residual only
        assert not torch.equal(flat_out[~none_left], flat_in[~none_left])
