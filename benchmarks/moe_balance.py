#!/usr/bin/env python
"""MoE load-balance calibration: top-2 of 8 MoEFusion on a toy task where routing matters (CPU, seeded).

Task: every token is drawn from one of `--clusters` Gaussian clusters in R^dim (centres ~ N(0, 4 I), spread
0.5); its target is a cluster-specific nonlinear function tanh(A_c x), A_c ~ N(0, 1/dim) per cluster, so one
expert MLP cannot serve every cluster well and the router has something to learn.
Model: MoEFusion(["x"], dim, num_experts=8, top_k=2, dropless by default) on (B, N, dim) token batches, then
a linear readout; loss = MSE(readout(out.tokens), target) + out.aux_loss; Adam (lr --lr), one thread. The task and the data stream are fixed per seed,
so every setting of one seed sees the same initial weights (except the forced bias) and the same batches.

Settings (z_loss_coef = --z-loss everywhere):
  none          load_balance_coef=0: no balancing.
  lb            load_balance_coef=--lb-coef (1e-1): Switch/GShard balance loss on the full softmax.
  auxfree       load_balance_coef=0, aux_free_bias=True, bias_update_rate=--bias-rate; the loop calls
                moe.update_expert_bias(out.info["tokens_per_expert"]) after every optimizer step.
  collapse_lb   router_bias=True with router.bias[0] = --collapse-bias (every token then has expert 0 in its
                top-2 at step 0: share 1/k = 0.5 of the assignments), trained as `lb`.
  collapse_auxfree  the same forced start, trained as `auxfree`.

Measured at the end on a held-out batch of --eval-tokens tokens (the routing actually used, i.e. including
expert_bias for aux-free; loads are the top-k assignments before capacity, info["tokens_per_expert"]):
load CV (std / mean, population std), max/mean, dead experts (0 assignments), share of expert 0, task MSE.
Per step on the training batch: CV and share of expert 0. Collapse recovery = first step whose training-batch
share of expert 0 is below 2/E (-1: never within --steps).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmfusion.fusion.moe import MoEFusion

SETTINGS = ("none", "lb", "auxfree", "collapse_lb", "collapse_auxfree")
COLLAPSED = 0  # the expert forced to win in the collapse settings


@dataclass
class Config:
    dim: int = 32
    hidden: int = 64
    num_experts: int = 8
    top_k: int = 2
    clusters: int = 16
    batch: int = 16
    tokens: int = 16  # per sample: batch * tokens routed tokens per step
    steps: int = 600
    lr: float = 3e-3
    capacity_factor: float | None = None  # dropless: capacity 1.25 already balances a little (see the doc)
    lb_coef: float = 1e-1
    z_loss: float = 1e-3
    bias_rate: float = 1e-3  # = MoEFusion's default; 1e-2 and 2e-3 jitter too much at the end (see the doc)
    collapse_bias: float = 4.0
    eval_tokens: int = 4096


@dataclass
class Result:
    setting: str
    seed: int
    cv: float
    max_over_mean: float
    dead: int
    share_collapsed: float
    task_mse: float
    recovery_step: int | None  # collapse settings only; -1 = not within the budget
    seconds: float
    share_curve: list[float] = field(default_factory=list)
    cv_curve: list[float] = field(default_factory=list)


class ToyTask:
    """Gaussian-cluster tokens with a cluster-specific target; fixed by `seed`."""

    def __init__(self, cfg: Config, seed: int):
        g = torch.Generator().manual_seed(10_000 + seed)
        self.cfg = cfg
        self.centres = 2.0 * torch.randn(cfg.clusters, cfg.dim, generator=g)
        self.maps = torch.randn(cfg.clusters, cfg.dim, cfg.dim, generator=g) / math.sqrt(cfg.dim)

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, dim) tokens and (n, dim) targets."""
        c = torch.randint(self.cfg.clusters, (n,), generator=g)
        x = self.centres[c] + 0.5 * torch.randn(n, self.cfg.dim, generator=g)
        y = torch.tanh(torch.einsum("nd,nde->ne", x, self.maps[c]))
        return x, y


def build(cfg: Config, setting: str, seed: int) -> tuple[MoEFusion, nn.Linear]:
    torch.manual_seed(seed)
    aux_free = setting.endswith("auxfree")
    collapse = setting.startswith("collapse")
    moe = MoEFusion(
        ["x"],
        cfg.dim,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        hidden=cfg.hidden,
        capacity_factor=cfg.capacity_factor,
        load_balance_coef=cfg.lb_coef if setting.endswith("lb") else 0.0,
        z_loss_coef=cfg.z_loss,
        aux_free_bias=aux_free,
        bias_update_rate=cfg.bias_rate,
        router_bias=collapse,
    )
    if collapse:
        with torch.no_grad():
            moe.router.bias.zero_()
            moe.router.bias[COLLAPSED] = cfg.collapse_bias
    readout = nn.Linear(cfg.dim, cfg.dim)
    return moe, readout


def _forward(moe: MoEFusion, readout: nn.Linear, x: torch.Tensor, y: torch.Tensor, shape: tuple[int, int]):
    b, n = shape
    mask = {"x": torch.ones(b, dtype=torch.bool)}
    out = moe({"x": x.view(b, n, -1)}, mask)
    mse = F.mse_loss(readout(out.tokens).view(b * n, -1), y)
    return out, mse


def _load_stats(counts: torch.Tensor) -> tuple[float, float, int]:
    mean = counts.mean().item()
    return (counts.std(unbiased=False).item() / mean, counts.max().item() / mean, int((counts == 0).sum()))


def run(cfg: Config, setting: str, seed: int) -> Result:
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose from {SETTINGS}")
    t0 = time.perf_counter()
    task = ToyTask(cfg, seed)
    moe, readout = build(cfg, setting, seed)
    opt = torch.optim.Adam([*moe.parameters(), *readout.parameters()], lr=cfg.lr)
    g = torch.Generator().manual_seed(20_000 + seed)
    assignments = cfg.batch * cfg.tokens * cfg.top_k
    share_curve, cv_curve = [], []
    recovery = -1
    for step in range(cfg.steps):
        x, y = task.sample(cfg.batch * cfg.tokens, g)
        out, mse = _forward(moe, readout, x, y, (cfg.batch, cfg.tokens))
        counts = out.info["tokens_per_expert"]
        share = counts[COLLAPSED].item() / assignments
        share_curve.append(share)
        cv_curve.append(out.info["load_cv"].item())
        if recovery < 0 and share < 2 / cfg.num_experts:
            recovery = step
        opt.zero_grad(set_to_none=True)
        (mse + out.aux_loss).backward()
        opt.step()
        if moe.aux_free_bias:
            moe.update_expert_bias(counts)
    with torch.no_grad():
        ge = torch.Generator().manual_seed(30_000 + seed)
        x, y = task.sample(cfg.eval_tokens, ge)
        out, mse = _forward(moe, readout, x, y, (cfg.eval_tokens // cfg.tokens, cfg.tokens))
    counts = out.info["tokens_per_expert"]
    cv, max_mean, dead = _load_stats(counts)
    return Result(
        setting=setting,
        seed=seed,
        cv=cv,
        max_over_mean=max_mean,
        dead=dead,
        share_collapsed=counts[COLLAPSED].item() / (cfg.eval_tokens * cfg.top_k),
        task_mse=mse.item(),
        recovery_step=recovery if setting.startswith("collapse") else None,
        seconds=time.perf_counter() - t0,
        share_curve=share_curve,
        cv_curve=cv_curve,
    )


def table(results: list[Result]) -> str:
    head = f"{'setting':<17}{'seed':>5}{'CV':>8}{'max/mean':>10}{'dead':>6}{'share e0':>10}{'task MSE':>10}{'recov.':>8}"
    lines = [head, "-" * len(head)]

    def row(name, seed, rs: list[Result]) -> str:
        mean = lambda f: sum(f(r) for r in rs) / len(rs)  # noqa: E731
        rec = [r.recovery_step for r in rs if r.recovery_step is not None]
        if not rec:
            rec_s = "-"
        elif len(rec) == 1:
            rec_s = str(rec[0])
        else:
            rec_s = "never" if min(rec) < 0 else f"{sum(rec) / len(rec):.0f}"
        return (
            f"{name:<17}{seed:>5}{mean(lambda r: r.cv):>8.3f}{mean(lambda r: r.max_over_mean):>10.3f}"
            f"{mean(lambda r: r.dead):>6.2g}{mean(lambda r: r.share_collapsed):>10.3f}"
            f"{mean(lambda r: r.task_mse):>10.4f}{rec_s:>8}"
        )

    for setting in dict.fromkeys(r.setting for r in results):
        rs = [r for r in results if r.setting == setting]
        lines += [row(setting, str(r.seed), [r]) for r in rs]
        lines.append(row(setting, "mean", rs))
    return "\n".join(lines)


def plot(results: list[Result], cfg: Config, plot_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = dict(zip(SETTINGS, ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange")))
    for r in results:
        label = f"{r.setting} s{r.seed}"
        if r.setting.startswith("collapse"):
            ax1.plot(r.share_curve, color=colours[r.setting], alpha=0.7, lw=0.8, label=label)
        ax2.plot(_smooth(r.cv_curve), color=colours[r.setting], alpha=0.7, lw=0.8, label=label)
    ax1.axhline(2 / cfg.num_experts, color="k", ls="--", lw=0.8, label="2/E")
    ax1.axhline(1 / cfg.num_experts, color="grey", ls=":", lw=0.8, label="1/E (uniform)")
    ax1.set(xlabel="step", ylabel="share of expert 0 (training batch)", title="forced collapse on expert 0")
    ax2.axhline(0.1, color="k", ls="--", lw=0.8)
    ax2.set(xlabel="step", ylabel="load CV (training batch, 20-step mean)", title="load CV", yscale="log")
    ax1.legend(fontsize=6)
    ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = plot_dir / "moe_balance.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _smooth(v: list[float], w: int = 20) -> list[float]:
    return [sum(v[max(0, i - w + 1) : i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(len(v))]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Calibrate MoEFusion load balancing (top-2 of 8) on a toy clustered-token task.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = Config()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=d.steps, help="training steps per run (the budget)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--lb-coef", type=float, default=d.lb_coef, help="load_balance_coef of the lb settings")
    p.add_argument(
        "--bias-rate", type=float, default=d.bias_rate, help="bias_update_rate of the aux-free settings"
    )
    p.add_argument("--z-loss", type=float, default=d.z_loss, help="z_loss_coef, all settings")
    p.add_argument(
        "--collapse-bias", type=float, default=d.collapse_bias, help="initial router bias of expert 0"
    )
    p.add_argument(
        "--capacity-factor", type=float, default=None, help="training capacity factor (default: dropless)"
    )
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--clusters", type=int, default=d.clusters)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=None, help="write per-run results (with curves) as JSON here")
    p.add_argument(
        "--plot-dir", type=Path, default=Path("runs/moe_balance"), help="where moe_balance.png goes"
    )
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = Config(
        dim=args.dim,
        clusters=args.clusters,
        steps=args.steps,
        lr=args.lr,
        capacity_factor=args.capacity_factor,
        lb_coef=args.lb_coef,
        z_loss=args.z_loss,
        bias_rate=args.bias_rate,
        collapse_bias=args.collapse_bias,
    )
    print(f"config: {asdict(cfg)}")
    results = []
    for setting in args.settings:
        for seed in args.seeds:
            r = run(cfg, setting, seed)
            print(
                f"  {setting:<17} seed {seed}: CV {r.cv:.3f}, task MSE {r.task_mse:.4f} ({r.seconds:.1f} s)"
            )
            results.append(r)
    print(table(results))
    if not args.no_plot:
        print(f"plot: {plot(results, cfg, args.plot_dir)}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"config": asdict(cfg), "results": [asdict(r) for r in results]}))
        print(f"results: {args.out}")
    return results


if __name__ == "__main__":
    main()
