"""Concept filters calibrated on a user's labelled JSONL (Z4): `mmfusion filter calibrate --data FILE.jsonl`.

Rows are samples in the data engine's JSONL manifest format (`mmfusion.data.sources.JsonlDataset`: `text`
and / or `image`, a path relative to the manifest) plus a label column (default `concepts`: a list of the
concept names the sample shows; `[]` for a sample that shows none):

    {"text": "a knife on a table", "image": "img/0001.png", "concepts": ["weapon"]}

A concept's vector comes from the labelled rows themselves (there are no prompts to embed, as there are in
the synthetic world): per modality, the direction mean(positive rows' embeddings) - mean(negative rows'),
L2-normalised (`concept_vector`); with both modalities, the mean of the two directions, L2-normalised (a
difference within one modality cancels the gap between the towers' regions of the space). Thresholds per
concept and modality are then set on the same calibration rows for the levels' recall targets
(`ConceptFilters.calibrate`), and precision / recall are reported on held-out rows: `--eval-data FILE` or a
deterministic stratified split (`split_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.sources import JsonlDataset
from ..errors import ConfigError, DataError
from ..safety.filters import Concept, ConceptFilters, concept_vector

MODALITIES = ("image", "text")
CHUNK = 256  # rows decoded and embedded at a time


@dataclass
class LabelledRows:
    """A labelled JSONL manifest, parsed (media not decoded): the rows in use (entries of the dataset), which
    modalities each has and their (rows, concepts) boolean labels."""

    dataset: JsonlDataset
    concepts: list[str]
    labels: np.ndarray  # (rows, concepts) bool: row i shows concept c
    has: dict[str, np.ndarray]  # modality -> (rows,) bool: the row has that field
    index: np.ndarray  # (rows,) the row's entry in the dataset

    @property
    def name(self) -> str:
        return self.dataset.name

    def subset(self, rows: np.ndarray) -> LabelledRows:
        """The rows at positions `rows`."""
        rows = np.asarray(rows, dtype=int)
        return LabelledRows(
            self.dataset,
            self.concepts,
            self.labels[rows],
            {m: h[rows] for m, h in self.has.items()},
            self.index[rows],
        )


def read_labelled(
    path: str | Path, label_column: str = "concepts", concepts: list[str] | None = None
) -> LabelledRows:
    """Parse a labelled JSONL manifest; `concepts` (None: every label found, sorted) fixes the columns, and a
    row naming another concept is an error. DataError names the file, the line and the field."""
    ds = JsonlDataset(path, MODALITIES, on_error="fail", require=False)
    if not ds.entries:
        raise DataError(f"{ds.name}: no rows")
    found: list[list[str]] = []
    has: dict[str, list[bool]] = {m: [] for m in MODALITIES}
    for n, obj in ds.entries:
        where = f"{ds.name} line {n}"
        assert isinstance(obj, dict)  # on_error="fail": invalid JSON already raised
        if label_column not in obj:
            raise DataError(
                f"{where}: no field '{label_column}' (the label column: a list of concept names, [] for "
                "none; --label-column names another field)"
            )
        value = obj[label_column]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(c, str) and c for c in value):
            raise DataError(
                f"{where}: field '{label_column}': expected a list of concept names, got {value!r}"
            )
        if concepts is not None:
            unknown = sorted(set(value) - set(concepts))
            if unknown:
                raise DataError(
                    f"{where}: field '{label_column}': unknown concept {unknown[0]!r}; the concepts calibrated "
                    f"are {concepts} (--concepts, or every label of the --data file)"
                )
        for m in MODALITIES:
            has[m].append(obj.get(m) is not None)
        if not (has["image"][-1] or has["text"][-1]):
            raise DataError(f"{where}: a row needs 'text' and / or 'image'")
        if has["text"][-1] and not isinstance(obj["text"], str):
            raise DataError(f"{where}: field 'text': expected a string, got {obj['text']!r}")
        found.append(value)
    names = list(concepts) if concepts is not None else sorted({c for v in found for c in v})
    if not names:
        raise DataError(
            f"{ds.name}: no row names a concept in '{label_column}'; nothing to calibrate (a filter needs "
            "positive rows of each concept)"
        )
    labels = np.array([[c in v for c in names] for v in found], dtype=bool).reshape(len(found), len(names))
    return LabelledRows(ds, names, labels, {m: np.array(h) for m, h in has.items()}, np.arange(len(found)))


def split_rows(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration rows, evaluation rows): a stratified, seeded split. Rows are grouped by their label set;
    each group is shuffled (seeded) and floor(fraction * group size) of it goes to evaluation, so a label set
    seen fewer than 1 / fraction times stays in calibration. Both index arrays are sorted."""
    if not 0 < fraction < 1:
        raise ConfigError(f"--eval-fraction = {fraction}: expected a fraction in (0, 1)")
    rng = np.random.default_rng(seed)
    groups: dict[bytes, list[int]] = {}
    for i, row in enumerate(np.asarray(labels, dtype=bool)):
        groups.setdefault(row.tobytes(), []).append(i)
    evaluation: list[int] = []
    for key in sorted(groups):
        rows = rng.permutation(groups[key])
        evaluation += rows[: int(np.floor(fraction * len(rows) + 1e-9))].tolist()
    ev = np.array(sorted(evaluation), dtype=int)
    cal = np.setdiff1d(np.arange(len(labels)), ev)
    return cal, ev


def embed(model, rows: LabelledRows, modality: str) -> np.ndarray:
    """(rows having `modality`, D) L2-normalised embeddings, in row order, decoded CHUNK rows at a time."""
    idx = rows.index[rows.has[modality]]
    encode = model.encode_image if modality == "image" else model.encode_text
    out = []
    for s in range(0, len(idx), CHUNK):
        if modality == "text":  # checked strings (read_labelled): nothing to decode
            items = [rows.dataset.entries[k][1]["text"] for k in idx[s : s + CHUNK]]  # type: ignore[index]
        else:  # decoded by the manifest reader; a missing or broken file raises DataError naming the line
            items = [rows.dataset[int(k)]["image"] for k in idx[s : s + CHUNK]]  # type: ignore[index]
        out.append(encode(items).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def _check_classes(rows: LabelledRows, modality: str, part: str) -> None:
    y = rows.labels[rows.has[modality]]
    for j, c in enumerate(rows.concepts):
        pos = int(y[:, j].sum())
        if pos == 0 or pos == len(y):
            kind = "positive" if pos == 0 else "negative"
            raise DataError(
                f"{rows.name}: concept {c!r} has no {kind} row with '{modality}' in the {part} ({len(y)} rows "
                f"with '{modality}'): it cannot be calibrated (a filter needs examples that show the concept "
                "and examples that do not)"
            )


def calibrate_labelled(
    model,
    rows: LabelledRows,
    recall: dict[str, float],
    model_id: str = "",
    precision: dict[str, float] | None = None,
    part: str = "calibration part",
) -> ConceptFilters:
    """Filters for `rows.concepts`: vectors from the rows' embeddings, thresholds per present modality (per
    level for its precision target if `precision` names it, else its recall target)."""
    present = [m for m in MODALITIES if rows.has[m].any()]
    for m in present:
        _check_classes(rows, m, part)
    emb = {m: embed(model, rows, m) for m in present}
    vectors = []
    for j in range(len(rows.concepts)):
        per = []
        for m in present:
            y = rows.labels[rows.has[m], j]
            per.append(concept_vector(emb[m][y], emb[m][~y]))
        vectors.append(concept_vector(np.stack(per)))
    filters = ConceptFilters(
        [Concept(c, [], v.tolist()) for c, v in zip(rows.concepts, vectors)],
        model_id,
        dict(recall),
        dict(precision or {}),
    )
    for m in present:
        filters.calibrate(m, emb[m], rows.labels[rows.has[m]])
    return filters


def labelled_report(model, filters: ConceptFilters, rows: LabelledRows) -> dict[str, Any]:
    """modality -> concept -> level -> precision / recall (and "auroc") on labelled rows, as `filter_report`."""
    return {
        m: filters.report(m, embed(model, rows, m), rows.labels[rows.has[m]])
        for m in MODALITIES
        if rows.has[m].any()
    }


__all__ = ["LabelledRows", "calibrate_labelled", "embed", "labelled_report", "read_labelled", "split_rows"]
