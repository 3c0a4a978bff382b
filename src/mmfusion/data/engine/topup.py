"""Top up rare modality combinations with paired data rendered from the synthetic world (D5, seed 002).

The combinations of a shard set are counted from tar headers (`stream.scan_shards`); every combination
below the target (or every combination named) gets target - count new samples from
`SyntheticWorld.sample(split, index, modalities=combination)`, with indices from `start_index` on (far
from the 0.. indices `mmfusion data synth` uses, so the scenes are new), ids ``topup-<combination>-<n>``
and ``meta["source"] = "synthetic-topup"``. Each combination is written as its own shards
``topup-<combination>-000000.tar`` in the record format of `writers.write_webdataset`.

CLI: ``mmfusion data topup SRC --target N --out DIR`` (see add_arguments).
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError

if TYPE_CHECKING:  # the heavy imports wait for the handlers: `mmfusion --help` stays fast
    from ..synthetic import SyntheticWorld


def plan_topup(
    counts: Mapping[str, int], target: int, combinations: Sequence[str] | None = None
) -> dict[str, int]:
    """{combination: samples to add} so each reaches `target`: the given combinations (which may be absent
    from `counts`), else every combination present. Combinations already at or above target are left out."""
    from ..synthetic import MODALITIES
    from .stream import combination_of

    if target < 1:
        raise ConfigError(f"target = {target}: expected a positive number of samples per combination")
    wanted = [combination_of(c.split("+")) for c in combinations] if combinations else sorted(counts)
    for combo in wanted:
        bad = [m for m in combo.split("+") if m not in MODALITIES]
        if bad:
            raise ConfigError(
                f"combination {combo!r}: the synthetic world cannot render {bad}; expected '+'-joined names "
                f"from {list(MODALITIES)}"
            )
    return {c: target - counts.get(c, 0) for c in wanted if counts.get(c, 0) < target}


def render_topup(
    world: SyntheticWorld, plan: Mapping[str, int], split: str = "train", start_index: int = 1_000_000
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(combination, sample) pairs for the plan, in plan order; sample indices run from start_index on."""
    index = start_index
    for combo, need in plan.items():
        mods = tuple(combo.split("+"))
        for n in range(need):
            s = world.sample(split, index, modalities=mods)
            s["id"] = f"topup-{combo}-{n:07d}"
            s["meta"] = {"source": "synthetic-topup", "world_index": index}
            index += 1
            yield combo, s


def topup(
    src,
    out_dir: str | Path,
    target: int,
    world: SyntheticWorld | None = None,
    combinations: Sequence[str] | None = None,
    split: str = "train",
    start_index: int = 1_000_000,
    samples_per_shard: int = 1000,
    progress: bool = False,
) -> dict[str, Any]:
    """Count the combinations of the shards `src`, render what the plan needs, write it under out_dir.

    Returns {"before": counts, "added": plan, "after": counts, "shards": paths}."""
    from ..synthetic import SyntheticWorld, WorldConfig
    from ..writers import write_webdataset
    from .stream import combination_counts, scan_shards

    before = dict(sorted(combination_counts(scan_shards(src)).items()))
    plan = plan_topup(before, target, combinations)
    world = world or SyntheticWorld(WorldConfig())
    pairs: Any = render_topup(world, plan, split, start_index)
    if progress:
        from tqdm import tqdm

        pairs = tqdm(pairs, total=sum(plan.values()), desc="render top-up", unit="sample")
    shards: list[str] = []
    out = Path(out_dir)
    # render_topup yields one combination after the other: stream each group into its shards
    for combo, group in itertools.groupby(pairs, key=lambda pair: pair[0]):
        samples = (s for _, s in group)
        paths = write_webdataset(samples, out, f"topup-{combo.replace('+', '-')}", samples_per_shard)
        shards += [str(p) for p in paths]
    after = {c: before.get(c, 0) + plan.get(c, 0) for c in sorted({*before, *plan})}
    return {"before": before, "added": plan, "after": after, "shards": shards}


def format_table(report: Mapping[str, Any]) -> str:
    rows = [f"{'combination':<32} {'before':>7} {'added':>7} {'after':>7}"]
    for c, n in report["after"].items():
        rows.append(f"{c:<32} {report['before'].get(c, 0):>7} {report['added'].get(c, 0):>7} {n:>7}")
    return "\n".join(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mmfusion data topup`."""
    parser.add_argument("src", help="the dataset's WebDataset shards (a folder, a tar or a brace pattern)")
    parser.add_argument("--target", type=int, required=True, help="samples wanted per modality combination")
    parser.add_argument("--out", required=True, help="output folder for topup-*.tar and topup_report.json")
    parser.add_argument(
        "--combinations",
        default=None,
        help="comma-separated combinations to top up, e.g. 'audio+text,image+text' (default: those present)",
    )
    parser.add_argument("--split", default="train", choices=["train", "val", "test"], help="synthetic split")
    parser.add_argument("--seed", type=int, default=0, help="synthetic world seed")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--start-index", type=int, default=1_000_000, help="first synthetic sample index")
    parser.add_argument("--samples-per-shard", type=int, default=1000)


def topup_main(args: argparse.Namespace) -> int:
    """`mmfusion data topup`: print before / added / after per combination and write the report."""
    if args.start_index < 0:
        raise ConfigError(f"--start-index = {args.start_index}: expected >= 0")
    from ..synthetic import SyntheticWorld, WorldConfig

    combos = [c.strip() for c in args.combinations.split(",") if c.strip()] if args.combinations else None
    try:
        world = SyntheticWorld(WorldConfig(seed=args.seed, image_size=args.image_size))
    except ValueError as e:
        raise ConfigError(f"--image-size / --seed: {e}") from None
    report = topup(
        args.src,
        args.out,
        args.target,
        world,
        combos,
        args.split,
        args.start_index,
        args.samples_per_shard,
        progress=True,
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "topup_report.json").write_text(json.dumps(report, indent=1))
    print(format_table(report))
    print(
        f"wrote {sum(report['added'].values())} samples in {len(report['shards'])} shard(s) under {args.out}"
    )
    return 0


__all__ = ["add_arguments", "format_table", "plan_topup", "render_topup", "topup", "topup_main"]
