"""Bias report (requirement Z3): a classifier's metrics per group along each sensitive axis, their disparity,
and the four-fifths line, computed with fairlearn's MetricFrame.

    report = axis_report("site", y_true, y_pred, groups, positive=1)
    report.by_group["accuracy"]   # {"north": 0.91, "south": 0.62}
    report.ratio["accuracy"]      # min / max over the groups = 0.68 -> flagged (< 0.8)

Metrics: accuracy for every classifier; with a positive class (a match head's 1, or --positive CLASS) also the
selection rate P(pred = positive) (the four-fifths rule's own quantity: adverse impact), the true-positive
rate and the false-positive rate. ratio = smallest group value / largest (1.0 = parity; fairlearn's
`ratio(method="between_groups")`), difference = largest - smallest. A metric whose ratio falls under 0.8
is flagged (the US EEOC four-fifths rule of thumb). Groups come from a sample field (a JSONL column, or a
manifest field kept in the sample's meta); samples without a value form the group "(missing)".
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

FOUR_FIFTHS = 0.8
MISSING = "(missing)"


@dataclass
class AxisReport:
    axis: str
    counts: dict[str, int]
    by_group: dict[str, dict[str, float]]  # metric -> group -> value
    overall: dict[str, float]
    ratio: dict[str, float]  # metric -> min / max over the groups
    difference: dict[str, float]  # metric -> max - min
    flagged: list[str]  # metrics under the four-fifths line

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _metrics(positive: Any | None) -> dict[str, Any]:
    from fairlearn.metrics import false_positive_rate, selection_rate, true_positive_rate
    from sklearn.metrics import accuracy_score

    out: dict[str, Any] = {"accuracy": accuracy_score}
    if positive is not None:

        def _bin(f):
            def g(y_true, y_pred):
                return f(np.asarray(y_true) == positive, np.asarray(y_pred) == positive, pos_label=True)

            return g

        out.update(
            selection_rate=_bin(selection_rate),
            true_positive_rate=_bin(true_positive_rate),
            false_positive_rate=_bin(false_positive_rate),
        )
    return out


def axis_report(
    axis: str,
    y_true: Sequence[Any],
    y_pred: Sequence[Any],
    groups: Sequence[Any],
    positive: Any | None = None,
) -> AxisReport:
    """Per-group metrics of predictions `y_pred` against `y_true` for the groups of one sensitive axis."""
    import warnings

    from fairlearn.metrics import MetricFrame

    if not (len(y_true) == len(y_pred) == len(groups)):
        raise ValueError(
            f"axis {axis!r}: {len(y_true)} labels, {len(y_pred)} predictions, {len(groups)} groups"
        )
    if len(y_true) == 0:
        raise ValueError(f"axis {axis!r}: no samples")
    names = np.array([MISSING if g is None else str(g) for g in groups], dtype=object)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rates of a group without positives / negatives are NaN, said below
        frame = MetricFrame(
            metrics=_metrics(positive),
            y_true=np.asarray(y_true),
            y_pred=np.asarray(y_pred),
            sensitive_features=names,
        )
        ratio = frame.ratio(method="between_groups")
        difference = frame.difference(method="between_groups")
    by_group = {m: {str(g): float(v) for g, v in frame.by_group[m].items()} for m in frame.by_group.columns}
    ratios = {m: float(ratio[m]) for m in frame.by_group.columns}
    counts = {str(g): int((names == g).sum()) for g in sorted(set(names))}
    return AxisReport(
        axis=axis,
        counts=counts,
        by_group=by_group,
        overall={m: float(v) for m, v in frame.overall.items()},
        ratio=ratios,
        difference={m: float(difference[m]) for m in frame.by_group.columns},
        flagged=[m for m, r in ratios.items() if np.isfinite(r) and r < FOUR_FIFTHS],
    )


# ---- a model on a dataset ------------------------------------------------------------------------------------
def predictions(model, dataset, collate, axes: Sequence[str], batch_size: int, num_workers: int = 0):
    """(y_true, y_pred, {axis: group per sample}) of a fusion classifier over `dataset`, in order; samples the
    collate skips are counted, not silently lost: returned as {reason: count}."""
    import dataclasses
    from collections import Counter

    import torch

    from ..data.loader import iterate_eval

    collate = dataclasses.replace(collate, meta=("id", *axes))
    y_true, y_pred, groups = [], [], {a: [] for a in axes}
    skipped: Counter[str] = Counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in iterate_eval(dataset, collate, batch_size, num_workers):
                skipped.update(reason for _, reason in batch.meta.get("skipped", []))
                if not batch.data:
                    continue
                y_pred.extend(model.predict(batch).cpu().tolist())
                y_true.extend(batch.data["label"].cpu().tolist())
                for a in axes:
                    groups[a].extend(batch.meta[a])
    finally:
        model.train(was_training)
    return y_true, y_pred, groups, dict(skipped)


# ---- the report ----------------------------------------------------------------------------------------------
def plot_axis(report: AxisReport) -> bytes:
    """PNG: each metric per group as bars, with the four-fifths line (0.8 x the best group) per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(report.by_group)
    groups = list(report.counts)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        values = [report.by_group[m].get(g, float("nan")) for g in groups]
        bars = ax.bar(
            range(len(groups)), values, color=["tab:red" if m in report.flagged else "tab:blue"] * len(groups)
        )
        finite = [v for v in values if np.isfinite(v)]
        if finite:
            ax.axhline(FOUR_FIFTHS * max(finite), color="black", ls="--", lw=1, label="4/5 of the best group")
        ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{m}\nratio {report.ratio[m]:.2f}", fontsize=9)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"axis: {report.axis}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(
    reports: list[AxisReport], out: Path, title: str, extra: dict[str, Any] | None = None
) -> Path:
    """<out>/bias.json and <out>/bias.html (one file: tables and the plots embedded); returns the HTML path."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {**(extra or {}), "four_fifths": FOUR_FIFTHS, "axes": [r.to_dict() for r in reports]}
    (out / "bias.json").write_text(json.dumps(payload, indent=2))
    esc = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}.flag{color:#b00;font-weight:bold}</style>",
        f"</head><body><h1>{esc(title)}</h1>",
        "<p>Per-group metrics along each sensitive axis. ratio = smallest group / largest group; a metric under "
        f"the four-fifths line (ratio &lt; {FOUR_FIFTHS}) is <span class='flag'>flagged</span>.</p>",
    ]
    for key, value in (extra or {}).items():
        parts.append(f"<p><b>{esc(str(key))}</b>: {esc(json.dumps(value))}</p>")
    for r in reports:
        metrics = list(r.by_group)
        parts.append(f"<h2>axis: {esc(r.axis)}</h2><table><tr><th>group</th><th>n</th>")
        parts += [f"<th>{esc(m)}</th>" for m in metrics]
        parts.append("</tr>")
        for g, n in r.counts.items():
            cells = "".join(f"<td>{r.by_group[m].get(g, float('nan')):.4f}</td>" for m in metrics)
            parts.append(f"<tr><td>{esc(g)}</td><td>{n}</td>{cells}</tr>")
        for label, row in (("overall", r.overall), ("ratio", r.ratio), ("difference", r.difference)):
            cells = "".join(
                f"<td class='{'flag' if label == 'ratio' and m in r.flagged else ''}'>{row[m]:.4f}</td>"
                for m in metrics
            )
            parts.append(f"<tr><th>{label}</th><td></td>{cells}</tr>")
        parts.append("</table>")
        verdict = (
            f"<p class='flag'>under the four-fifths line: {esc(', '.join(r.flagged))}</p>"
            if r.flagged
            else "<p>every metric within the four-fifths line</p>"
        )
        png = base64.b64encode(plot_axis(r)).decode()
        parts.append(f"{verdict}<img alt='{esc(r.axis)}' src='data:image/png;base64,{png}'>")
    parts.append("</body></html>")
    path = out / "bias.html"
    path.write_text("\n".join(parts))
    return path


__all__ = ["FOUR_FIFTHS", "AxisReport", "axis_report", "predictions", "write_report"]
