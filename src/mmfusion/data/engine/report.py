"""The cleaning report of `mmfusion data build`: report.png (counts per reason), report.html (counts,
examples per reason, mislabelled files) and the summary table printed at the end of a build."""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from .quality import REASONS

if TYPE_CHECKING:
    from .pipeline import BuildResult

EXAMPLES = 5  # examples listed per reason in report.html


def summary_table(result: BuildResult) -> str:
    """A plain-text table of what the build did: counts, reasons, work skipped and per-stage times."""
    total = sum(result.seconds.values())
    rows = [
        ("build id", result.build_id[:16]),
        ("inputs", str(result.inputs)),
        ("accepted", str(result.accepted)),
        ("rejected", str(result.inputs - result.accepted)),
        *((f"  {reason}", str(n)) for reason, n in _ordered(result.rejected)),
        ("mislabelled files (kept if valid)", str(result.mislabelled)),
        *((f"  modalities {combo}", str(n)) for combo, n in sorted(result.modalities.items())),
        ("shards written / skipped", f"{result.shards_written} / {result.shards_skipped}"),
        ("chunks processed / skipped", f"{result.chunks_processed} / {result.chunks_skipped}"),
        *((f"  {stage} s", f"{s:.2f}") for stage, s in result.seconds.items()),
        ("samples/s (wall)", f"{result.inputs / max(total, 1e-9):.1f}"),
        ("processed samples per CPU-second", _per_cpu(result)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:>16}" for k, v in rows)


def _per_cpu(result: BuildResult) -> str:
    cpu = result.process_cpu_s
    return f"{result.samples_processed / cpu:.1f}" if cpu > 0 else "-"


def _ordered(counts: Counter) -> list[tuple[str, int]]:
    order = list(REASONS)
    return sorted(counts.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))


def write_report(result: BuildResult, verdicts: list[dict], out: Path) -> None:
    """Write out/report.png and out/report.html for a finished build."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [("accepted", result.accepted), *_ordered(result.rejected)]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(counts) + 1.2))
    ax.barh(
        [k for k, _ in counts][::-1],
        [n for _, n in counts][::-1],
        color=["#c44"] * (len(counts) - 1) + ["#4a4"],
    )
    for y, (_, n) in enumerate(counts[::-1]):
        ax.text(n, y, f" {n}", va="center")
    ax.set_xlabel("samples")
    ax.set_title(f"build {result.build_id[:12]}: {result.inputs} inputs")
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=100)
    plt.close(fig)

    esc = html.escape
    parts = [
        "<!doctype html><meta charset='utf-8'><title>mmfusion build report</title>",
        "<style>body{font-family:sans-serif;max-width:60em}td,th{padding:2px 8px;text-align:left}</style>",
        f"<h1>Build {esc(result.build_id[:16])}</h1>",
        f"<p>{result.inputs} inputs: {result.accepted} accepted in {len(result.shards)} shards, "
        f"{result.inputs - result.accepted} rejected (rejected.jsonl).</p>",
        "<img src='report.png' alt='counts per reason'>",
        "<h2>Counts per reason</h2><table><tr><th>reason</th><th>samples</th><th>meaning</th></tr>",
        *(
            f"<tr><td>{esc(r)}</td><td>{n}</td><td>{esc(REASONS.get(r, ''))}</td></tr>"
            for r, n in _ordered(result.rejected)
        ),
        "</table><h2>Examples</h2>",
    ]
    for reason, _ in _ordered(result.rejected):
        rows = [v for v in verdicts if any(r == reason for r, _ in v["reasons"])][:EXAMPLES]
        parts.append(f"<h3>{esc(reason)}</h3><ul>")
        for v in rows:
            detail = "; ".join(d for r, d in v["reasons"] if r == reason)
            parts.append(f"<li><b>{esc(v['id'])}</b> ({esc(', '.join(v['sources']))}): {esc(detail)}</li>")
        parts.append("</ul>")
    notes = [n for v in verdicts for n in v["notes"]]
    if notes:
        parts.append("<h2>Mislabelled files</h2><p>Used as what their content is when valid.</p><ul>")
        parts += [f"<li>{esc(n)}</li>" for n in notes]
        parts.append("</ul>")
    parts.append(f"<h2>Summary</h2><pre>{esc(summary_table(result))}</pre>")
    (out / "report.html").write_text("\n".join(parts) + "\n", encoding="utf-8")


__all__ = ["summary_table", "write_report"]
