"""plots/federated.png: the global model's held-out metric and the clients' mean local loss per round."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_rounds(rows: list[dict[str, Any]], out_png: Path, key: str | None) -> Path | None:
    if not rows or key is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(
        [r["round"] for r in rows],
        [r.get(key, float("nan")) for r in rows],
        marker="o",
        label=f"global {key}",
    )
    ax.set_xlabel("round")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    trained = [r for r in rows if "client_loss" in r]
    if trained:
        ax2 = ax.twinx()
        ax2.plot(
            [r["round"] for r in trained],
            [r["client_loss"] for r in trained],
            color="tab:orange",
            alpha=0.6,
            label="clients' mean local loss",
        )
        ax2.set_ylabel("local loss")
    fig.legend(loc="lower right")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
