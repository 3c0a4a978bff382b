"""Mixture weights over several sources (D3, T9): each returns a probability vector over the sources.

* ``temperature_weights(sizes, T)``: p_i ∝ n_i^(1/T) (T = 1 proportional to size, T = inf uniform).
* ``mas_weights(complexities, alpha)``: the modality-aware sampler, p_i ∝ c_i^alpha, with c_i a source's
  complexity measured from its data by ``source_complexity`` (see there for the exact definition).
* ``CurriculumSchedule``: a mixture that changes over training, piecewise-linear between (step, weights)
  milestones (each milestone normalised first), constant before the first and after the last.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ...errors import ConfigError, DataError


def normalise_weights(weights: Sequence[float], name: str) -> list[float]:
    """Non-negative finite weights with a positive sum -> probabilities (a clear ConfigError otherwise)."""
    w = [float(x) for x in weights]
    if not w:
        raise ConfigError(f"{name} must not be empty")
    bad = [x for x in w if not math.isfinite(x) or x < 0]
    if bad:
        raise ConfigError(f"{name} must be finite and >= 0, got {w}")
    total = sum(w)
    if total <= 0:
        raise ConfigError(f"{name} must have a positive sum, got {w}")
    return [x / total for x in w]


def temperature_weights(sizes: Sequence[int], temperature: float) -> list[float]:
    """p_i = n_i^(1/T) / sum_j n_j^(1/T). T = 1: proportional to size; T = inf: uniform; T must be > 0."""
    t = float(temperature)
    if not t > 0:  # also rejects NaN
        raise ConfigError(f"temperature must be > 0 (inf for uniform), got {temperature}")
    n = [int(s) for s in sizes]
    if not n:
        raise ConfigError("sizes must not be empty")
    empty = [i for i, s in enumerate(n) if s < 1]
    if empty:
        raise DataError(f"source {empty[0]} is empty (sizes={n}); every source needs >= 1 sample")
    if math.isinf(t):
        return [1.0 / len(n)] * len(n)
    # in log space so huge sizes and small T do not overflow
    logs = [math.log(s) / t for s in n]
    m = max(logs)
    return normalise_weights([math.exp(x - m) for x in logs], "temperature weights")


def mas_weights(complexities: Sequence[float], alpha: float) -> list[float]:
    """Modality-aware sampler: p_i = c_i^alpha / sum_j c_j^alpha. alpha = 0: uniform; alpha = 1: ∝ complexity.

    alpha must be >= 0 and every complexity > 0 (compute them with `source_complexity`)."""
    a = float(alpha)
    if not (a >= 0 and math.isfinite(a)):
        raise ConfigError(f"alpha must be a finite number >= 0, got {alpha}")
    c = [float(x) for x in complexities]
    if not c:
        raise ConfigError("complexities must not be empty")
    bad = [(i, x) for i, x in enumerate(c) if not (x > 0 and math.isfinite(x))]
    if bad:
        i, x = bad[0]
        raise ConfigError(f"complexities must be finite and > 0, got complexities[{i}]={x} in {c}")
    logs = [a * math.log(x) for x in c]
    m = max(logs)
    return normalise_weights([math.exp(x - m) for x in logs], "MAS weights")


DEFAULT_UNITS: dict[str, float] = {"text": 1.0, "image": 1.0, "video": 1.0, "audio": 1.0}


def sample_complexity(
    sample: Mapping[str, Any],
    units: Mapping[str, float] | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> float:
    """The complexity of one sample: sum over its present modalities of units[m] * amount_m, where

    * text:  number of tokens of sample["text"] (`count_tokens`, default whitespace words: len(text.split()))
    * image: 1 per image (an image counts as one frame)
    * video: number of frames, sample["video"].shape[0] (an array (T, H, W, 3) or a list of frames)
    * audio: length in seconds, len(sample["audio"]) / sample["audio_sr"] (audio_sr required)

    `units` (default 1.0 each: tokens + frames + seconds) converts the amounts to one scale; a modality
    missing from `units` is not counted. A value of None counts as absent."""
    u = DEFAULT_UNITS if units is None else units
    count = count_tokens or (lambda s: len(s.split()))
    total = 0.0
    if u.get("text") and sample.get("text") is not None:
        total += u["text"] * count(sample["text"])
    if u.get("image") and sample.get("image") is not None:
        total += u["image"] * 1.0
    if u.get("video") and sample.get("video") is not None:
        v = sample["video"]
        total += u["video"] * (v.shape[0] if hasattr(v, "shape") else len(v))
    if u.get("audio") and sample.get("audio") is not None:
        if not sample.get("audio_sr"):
            raise DataError(f"sample {sample.get('id', '?')!r} has audio but no 'audio_sr' (Hz)")
        a = sample["audio"]
        n = a.shape[-1] if hasattr(a, "shape") else len(a)
        total += u["audio"] * n / float(sample["audio_sr"])
    return float(total)


def source_complexity(
    samples: Sequence[Mapping[str, Any]],
    units: Mapping[str, float] | None = None,
    count_tokens: Callable[[str], int] | None = None,
    probe: int | None = None,
) -> float:
    """A source's complexity: the mean `sample_complexity` over its samples (the first `probe` only, if
    given: a deterministic probe, no randomness). Raises DataError for an empty source."""
    if len(samples) == 0:
        raise DataError("cannot measure the complexity of an empty source")
    if probe is not None and probe < 1:
        raise ConfigError(f"probe must be >= 1, got {probe}")
    k = len(samples) if probe is None else min(probe, len(samples))
    return sum(sample_complexity(samples[i], units, count_tokens) for i in range(k)) / k


class CurriculumSchedule:
    """Target mixture as a function of the step: piecewise-linear through (step, weights) milestones.

    Each milestone's weights are normalised to probabilities first; between milestones s0 < s1 the target is
    p(s) = p0 + (s - s0) / (s1 - s0) * (p1 - p0); before the first milestone it is p0, after the last p_last.
    """

    def __init__(self, milestones: Sequence[tuple[int, Sequence[float]]]):
        if not milestones:
            raise ConfigError("milestones must not be empty")
        steps = [int(s) for s, _ in milestones]
        if any(s < 0 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
            raise ConfigError(f"milestone steps must be >= 0 and strictly increasing, got {steps}")
        probs = [normalise_weights(w, f"milestones[{i}] weights") for i, (_, w) in enumerate(milestones)]
        k = len(probs[0])
        for i, p in enumerate(probs):
            if len(p) != k:
                raise ConfigError(
                    f"milestones[{i}] weights has {len(p)} entries, milestones[0] has {k}: "
                    "every milestone needs one weight per source"
                )
        self.steps, self.probs, self.num_sources = steps, probs, k

    @classmethod
    def linear(cls, start: Sequence[float], end: Sequence[float], steps: int) -> CurriculumSchedule:
        """From `start` at step 0 to `end` at step `steps`, linearly; `end` afterwards."""
        if int(steps) < 1:
            raise ConfigError(f"steps must be >= 1, got {steps}")
        return cls([(0, start), (int(steps), end)])

    def __call__(self, step: int) -> list[float]:
        s = self.steps
        if step <= s[0]:
            return list(self.probs[0])
        if step >= s[-1]:
            return list(self.probs[-1])
        j = bisect.bisect_right(s, step)  # s[j-1] <= step < s[j]
        t = (step - s[j - 1]) / (s[j] - s[j - 1])
        return [a + t * (b - a) for a, b in zip(self.probs[j - 1], self.probs[j])]


__all__ = [
    "DEFAULT_UNITS",
    "CurriculumSchedule",
    "mas_weights",
    "normalise_weights",
    "sample_complexity",
    "source_complexity",
    "temperature_weights",
]
