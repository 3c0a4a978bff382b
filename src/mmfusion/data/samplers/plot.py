"""Plots of the realised vs target mixture, from a MixtureSampler's history or a run's metrics.jsonl."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...errors import ConfigError


def plot_mixture(
    history: Sequence[Mapping[str, Any]], path: str | Path, names: Sequence[str] | None = None
) -> Path:
    """Plot realised (solid) vs target (dashed) share per source over steps from `MixtureSampler.history`.

    Shares are per logging window: window_counts / window draws against window_expected / window draws
    (the mean target over the window), so a changing curriculum is compared like for like. Uses the Agg
    backend through matplotlib's object API (no global pyplot state). Returns the written path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not history:
        raise ConfigError("history is empty: create the sampler with log_every > 0 and draw some samples")
    k = len(history[0]["counts"])
    names = list(names) if names is not None else [f"source {i}" for i in range(k)]
    if len(names) != k:
        raise ConfigError(f"names has {len(names)} entries ({names}) but the history has {k} sources")
    steps = [h["step"] for h in history]
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i in range(k):
        real = [h["window_counts"][i] / max(sum(h["window_counts"]), 1) for h in history]
        want = [h["window_expected"][i] / max(sum(h["window_expected"]), 1e-12) for h in history]
        (line,) = ax.plot(steps, real, label=f"{names[i]} realised")
        ax.plot(steps, want, linestyle="--", color=line.get_color(), label=f"{names[i]} target")
    ax.set_xlabel("step")
    ax.set_ylabel("share of draws")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def history_from_metrics(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """A run's metrics.jsonl rows (with source/<name> realised and target/<name> shares per logging window,
    as the Trainer logs them for MixtureData) -> the `history` format of `plot_mixture`."""
    history = []
    for r in rows:
        if f"source/{names[0]}" not in r:
            continue
        real = [float(r[f"source/{n}"]) for n in names]
        history.append(
            {
                "step": r["step"],
                "counts": real,
                "window_counts": real,
                "window_expected": [float(r[f"target/{n}"]) for n in names],
            }
        )
    return history


__all__ = ["history_from_metrics", "plot_mixture"]
