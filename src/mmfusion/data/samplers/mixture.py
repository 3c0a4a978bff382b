"""Data-aware sampling over several sources (D3, D4, T9): mixture weights, a resumable mixture sampler and DDWA.

Mixture weights (each returns a probability vector over the sources):

* ``temperature_weights(sizes, T)``: p_i ∝ n_i^(1/T) (T = 1 proportional to size, T = inf uniform).
* ``mas_weights(complexities, alpha)``: the modality-aware sampler, p_i ∝ c_i^alpha, with c_i a source's
  complexity measured from its data by ``source_complexity`` (see there for the exact definition).
* ``CurriculumSchedule``: a mixture that changes over training, piecewise-linear between (step, weights)
  milestones (each milestone normalised first), constant before the first and after the last.

``MixtureSampler`` draws (source_index, sample_index) pairs: the source from the target mixture of the
current step, the sample from that source's own seeded permutation (reshuffled each time it is used up),
so every source is seen without replacement within its epochs. It is seeded, deterministic, resumable
(``state_dict`` / ``load_state_dict`` continue the exact stream) and records the realised mixture.

``DDWASampler`` (dynamic data weighting) samples one dataset i.i.d. from per-sample weights: uniform for a
warm-up, then every K steps the samples whose mean score (per-sample gradient-norm proxy) is in the top
fraction get weight ``boost`` (1.3), the others 1.0, renormalised.

Every state_dict holds only tensors, ints, floats, lists and dicts, so ``torch.load(weights_only=True)``
reads it back.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError

# ---- mixture weights --------------------------------------------------------------------------------------


def _normalise(weights: Sequence[float], name: str) -> list[float]:
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
    return _normalise([math.exp(x - m) for x in logs], "temperature weights")


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
    return _normalise([math.exp(x - m) for x in logs], "MAS weights")


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
        probs = [_normalise(w, f"milestones[{i}] weights") for i, (_, w) in enumerate(milestones)]
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


# ---- the mixture sampler ----------------------------------------------------------------------------------


def _sub_seed(*words: int) -> int:
    """A 63-bit seed from integers (numpy SeedSequence hashing: distinct words give unrelated seeds)."""
    return int(
        np.random.SeedSequence([int(w) for w in words]).generate_state(2, np.uint64)[0] >> np.uint64(1)
    )


class MixtureSampler:
    """Seeded, resumable stream of (source_index, sample_index) over several sources.

    Args:
        sources: the sources (any Sequences; only their lengths are used) or their sizes as ints.
        weights: the target mixture: K non-negative numbers (fixed), a CurriculumSchedule, or a callable
            step -> K weights. Default: proportional to size (temperature 1).
        seed: the stream is a function of (seed, sizes, weights) only.
        batch_size: draws per step; the target of draw d is weights(d // batch_size), so a batch shares one
            mixture and the schedule's steps are optimizer steps.
        num_samples: stop after this many draws (None: endless); also len(sampler).
        log_every: append a snapshot to `history` every this many steps (0: never).

    Draw d: the source is the first i with u < cumsum(p)_i for u ~ U[0, 1) from the sampler's torch
    Generator; the sample is the next entry of source i's permutation for its current epoch
    (torch.randperm seeded by (seed, i, epoch)). Iterating yields pairs; `next_batch()` gives a step's list.
    `counts` (draws per source) and `expected` (sum of the targets used) give the realised mixture.
    """

    def __init__(
        self,
        sources: Sequence[Sequence[Any] | int],
        weights: Sequence[float] | CurriculumSchedule | Callable[[int], Sequence[float]] | None = None,
        seed: int = 0,
        batch_size: int = 1,
        num_samples: int | None = None,
        log_every: int = 0,
    ):
        if len(sources) == 0:
            raise ConfigError("sources must not be empty")
        sizes = [s if isinstance(s, int) else len(s) for s in sources]
        empty = [i for i, n in enumerate(sizes) if n < 1]
        if empty:
            raise DataError(f"source {empty[0]} is empty (sizes={sizes}); every source needs >= 1 sample")
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if num_samples is not None and int(num_samples) < 0:
            raise ConfigError(f"num_samples must be >= 0 or None, got {num_samples}")
        if int(log_every) < 0:
            raise ConfigError(f"log_every must be >= 0, got {log_every}")
        self.sizes = sizes
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.num_samples = None if num_samples is None else int(num_samples)
        self.log_every = int(log_every)
        if weights is None:
            weights = temperature_weights(sizes, 1.0)
        if isinstance(weights, CurriculumSchedule):
            if weights.num_sources != len(sizes):
                raise ConfigError(
                    f"weights (a CurriculumSchedule over {weights.num_sources} sources) does not match the "
                    f"{len(sizes)} sources"
                )
            self._schedule: Callable[[int], Sequence[float]] | None = weights
            self._fixed: list[float] | None = None
        elif callable(weights):
            self._schedule, self._fixed = weights, None
        else:
            w = list(weights)
            if len(w) != len(sizes):
                raise ConfigError(f"weights has {len(w)} entries ({w}) but there are {len(sizes)} sources")
            self._fixed, self._schedule = _normalise(w, "weights"), None
        self._cache_step, self._cache_cum, self._cache_p = -1, [], []
        self._perm_cache: dict[int, tuple[int, list[int]]] = {}
        self._reset_state()

    # -- construction helpers --
    @classmethod
    def with_temperature(cls, sources: Sequence[Any], temperature: float, **kw: Any) -> MixtureSampler:
        """Temperature mixing: p_i ∝ n_i^(1/T)."""
        sizes = [s if isinstance(s, int) else len(s) for s in sources]
        return cls(sources, temperature_weights(sizes, temperature), **kw)

    @classmethod
    def with_mas(
        cls,
        sources: Sequence[Sequence[Mapping[str, Any]]],
        alpha: float,
        complexities: Sequence[float] | None = None,
        units: Mapping[str, float] | None = None,
        count_tokens: Callable[[str], int] | None = None,
        probe: int | None = None,
        **kw: Any,
    ) -> MixtureSampler:
        """MAS: p_i ∝ c_i^alpha, c_i = source_complexity(sources[i]) unless `complexities` are given."""
        if complexities is None:
            complexities = [source_complexity(s, units, count_tokens, probe) for s in sources]
        elif len(complexities) != len(sources):
            raise ConfigError(
                f"complexities has {len(complexities)} entries ({list(complexities)}) but there are "
                f"{len(sources)} sources"
            )
        return cls(sources, mas_weights(complexities, alpha), **kw)

    # -- state --
    def _reset_state(self) -> None:
        self.generator = torch.Generator().manual_seed(_sub_seed(self.seed, 0x5EED))
        self.draws = 0
        self.epochs = [0] * len(self.sizes)
        self.positions = [0] * len(self.sizes)
        self.counts = [0] * len(self.sizes)
        self.expected = [0.0] * len(self.sizes)
        self.history: list[dict[str, Any]] = []
        self._last_log = {"draws": 0, "counts": [0] * len(self.sizes), "expected": [0.0] * len(self.sizes)}

    @property
    def step(self) -> int:
        """Completed-or-current step: draws // batch_size."""
        return self.draws // self.batch_size

    def target(self, step: int | None = None) -> list[float]:
        """The target mixture (probabilities) at `step` (default: the current step)."""
        s = self.step if step is None else int(step)
        if self._fixed is not None:
            return list(self._fixed)
        assert self._schedule is not None
        w = list(self._schedule(s))
        if len(w) != len(self.sizes):
            raise ConfigError(
                f"weights({s}) has {len(w)} entries ({w}) but there are {len(self.sizes)} sources"
            )
        return _normalise(w, f"weights({s})")

    def _permutation(self, source: int) -> list[int]:
        epoch = self.epochs[source]
        cached = self._perm_cache.get(source)
        if cached is None or cached[0] != epoch:
            g = torch.Generator().manual_seed(_sub_seed(self.seed, source, epoch))
            cached = (epoch, torch.randperm(self.sizes[source], generator=g).tolist())
            self._perm_cache[source] = cached
        return cached[1]

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("an endless MixtureSampler (num_samples=None) has no len()")
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self

    def __next__(self) -> tuple[int, int]:
        if self.num_samples is not None and self.draws >= self.num_samples:
            raise StopIteration
        step = self.step
        if step != self._cache_step:
            p = self.target(step)
            self._cache_step, self._cache_p, self._cache_cum = step, p, list(np.cumsum(p))
        u = float(torch.rand((), generator=self.generator, dtype=torch.float64))
        source = min(bisect.bisect_right(self._cache_cum, u), len(self.sizes) - 1)
        while self._cache_p[source] == 0:  # u at a boundary of a zero-weight source (float rounding)
            source -= 1
        perm = self._permutation(source)
        index = perm[self.positions[source]]
        self.positions[source] += 1
        if self.positions[source] == self.sizes[source]:
            self.positions[source] = 0
            self.epochs[source] += 1
        self.counts[source] += 1
        for i, p in enumerate(self._cache_p):
            self.expected[i] += p
        self.draws += 1
        if self.log_every and self.draws % (self.batch_size * self.log_every) == 0:
            self._log()
        return source, index

    def next_batch(self) -> list[tuple[int, int]]:
        """The next `batch_size` pairs (fewer only when num_samples runs out)."""
        out = []
        for _ in range(self.batch_size):
            try:
                out.append(next(self))
            except StopIteration:
                break
        return out

    def flat_index(self, pair: tuple[int, int]) -> int:
        """(source, index) -> index into the concatenation of the sources (torch ConcatDataset order)."""
        source, index = pair
        return sum(self.sizes[:source]) + index

    def _log(self) -> None:
        last = self._last_log
        self.history.append(
            {
                "step": self.step,
                "draws": self.draws,
                "counts": list(self.counts),
                "expected": list(self.expected),
                "window_counts": [a - b for a, b in zip(self.counts, last["counts"])],
                "window_expected": [a - b for a, b in zip(self.expected, last["expected"])],
                "target": self.target(self.step),
            }
        )
        self._last_log = {"draws": self.draws, "counts": list(self.counts), "expected": list(self.expected)}

    def mixture(self) -> dict[str, Any]:
        """For logging: step, draws, counts per source, realised shares, expected shares and current target."""
        d = max(self.draws, 1)
        return {
            "step": self.step,
            "draws": self.draws,
            "counts": list(self.counts),
            "shares": [c / d for c in self.counts],
            "expected_shares": [e / d for e in self.expected],
            "target": self.target(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "sizes": list(self.sizes),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "generator": self.generator.get_state(),
            "draws": self.draws,
            "epochs": list(self.epochs),
            "positions": list(self.positions),
            "counts": list(self.counts),
            "expected": list(self.expected),
            "history": [dict(h) for h in self.history],
            "last_log": dict(self._last_log),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state_dict from a sampler with the same sources, seed and batch size."""
        for key, mine in (("sizes", self.sizes), ("seed", self.seed), ("batch_size", self.batch_size)):
            if state[key] != mine:
                raise ConfigError(f"state_dict {key}={state[key]} does not match this sampler's {key}={mine}")
        self.generator.set_state(state["generator"])
        self.draws = int(state["draws"])
        self.epochs = [int(x) for x in state["epochs"]]
        self.positions = [int(x) for x in state["positions"]]
        self.counts = [int(x) for x in state["counts"]]
        self.expected = [float(x) for x in state["expected"]]
        self.history = [dict(h) for h in state["history"]]
        self._last_log = dict(state["last_log"])
        self._cache_step = -1


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


# ---- DDWA ---------------------------------------------------------------------------------------------------


def logit_grad_norm(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample ||d CE / d logits||_2 = ||softmax(z) - onehot(y)||_2, (B,) float32, closed form, no backward."""
    z = logits.detach().float()
    if z.dim() != 2 or labels.shape != (z.shape[0],):
        raise ConfigError(
            f"logits must be (B, C) and labels (B,), got logits {tuple(z.shape)} and labels {tuple(labels.shape)}"
        )
    g = torch.softmax(z, dim=1)
    g[torch.arange(z.shape[0]), labels.long()] -= 1.0
    return g.norm(dim=1)


class DDWASampler:
    """Dynamic data weighting over one dataset of `n` samples, drawn i.i.d. with replacement.

    Steps 0 .. warmup-1 draw uniformly. Scores come from `update`: a sample's score is the mean over the
    times it was seen of its per-sample gradient-norm proxy (`logit_grad_norm`: ||softmax(z) - onehot(y)||,
    the gradient of the loss w.r.t. the logits, not w.r.t. the parameters). At every step s >= warmup with
    (s - warmup) % update_every == 0 the weights are recomputed before drawing: of the samples seen at least
    once, the top ceil(top_fraction * seen) by mean score (ties: lower index first) get `boost`, every other
    sample 1.0; the weights are then divided by their sum. boost=1.0 is plain uniform sampling with the same
    random stream (a like-for-like baseline).

    Iterating yields batches (lists of `batch_size` indices); `num_steps` bounds the iteration.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        warmup: int = 100,
        update_every: int = 50,
        boost: float = 1.3,
        top_fraction: float = 0.25,
        seed: int = 0,
        num_steps: int | None = None,
    ):
        if int(n) < 1:
            raise DataError(f"n must be >= 1 (the dataset is empty), got {n}")
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if int(warmup) < 0:
            raise ConfigError(f"warmup must be >= 0, got {warmup}")
        if int(update_every) < 1:
            raise ConfigError(f"update_every must be >= 1, got {update_every}")
        if not (float(boost) > 0 and math.isfinite(float(boost))):
            raise ConfigError(f"boost must be a finite number > 0, got {boost}")
        if not 0 <= float(top_fraction) <= 1:
            raise ConfigError(f"top_fraction must be in [0, 1], got {top_fraction}")
        self.n, self.batch_size, self.warmup = int(n), int(batch_size), int(warmup)
        self.update_every, self.boost, self.top_fraction = (
            int(update_every),
            float(boost),
            float(top_fraction),
        )
        self.seed = int(seed)
        self.num_steps = num_steps
        self.generator = torch.Generator().manual_seed(_sub_seed(self.seed, 0xDD3A))
        self.step = 0
        self.score_sum = torch.zeros(self.n, dtype=torch.float64)
        self.seen = torch.zeros(self.n, dtype=torch.long)
        self.weights = torch.full((self.n,), 1.0 / self.n, dtype=torch.float64)
        self.boosted = torch.zeros(self.n, dtype=torch.bool)
        self.reweights = 0

    def mean_scores(self) -> torch.Tensor:
        """(n,) mean score per sample; NaN where never seen."""
        return torch.where(self.seen > 0, self.score_sum / self.seen.clamp(min=1), torch.nan)

    def update(
        self,
        indices: Sequence[int] | torch.Tensor,
        logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        scores: Sequence[float] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Add one score per index: `scores` directly, or logit_grad_norm(logits, labels). Returns them."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if scores is None:
            if logits is None or labels is None:
                raise ConfigError("update needs either scores or both logits and labels")
            s = logit_grad_norm(logits, labels)
        else:
            if logits is not None or labels is not None:
                raise ConfigError("give update either scores or logits and labels, not both")
            s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
        if s.shape[0] != idx.shape[0]:
            raise ConfigError(f"update got {idx.shape[0]} indices but {s.shape[0]} scores")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.n):
            raise ConfigError(
                f"indices must be in [0, {self.n}), got min {int(idx.min())} max {int(idx.max())}"
            )
        s64 = s.to(torch.float64)
        if not torch.isfinite(s64).all():
            raise ConfigError("scores must be finite")
        self.score_sum.index_add_(0, idx, s64)
        self.seen.index_add_(0, idx, torch.ones_like(idx))
        return s

    def reweight(self) -> None:
        """Recompute the weights from the current mean scores (see the class docstring)."""
        seen = torch.nonzero(self.seen > 0).reshape(-1)
        w = torch.ones(self.n, dtype=torch.float64)
        self.boosted = torch.zeros(self.n, dtype=torch.bool)
        k = math.ceil(self.top_fraction * seen.numel() - 1e-9)
        if k > 0:
            mean = self.score_sum[seen] / self.seen[seen]
            # stable sort on -score keeps lower indices first among ties
            order = torch.sort(-mean, stable=True).indices[:k]
            top = seen[order]
            w[top] = self.boost
            self.boosted[top] = True
        self.weights = w / w.sum()
        self.reweights += 1

    def next_batch(self) -> list[int]:
        """Indices of the next step (reweighting first when due)."""
        if self.step >= self.warmup and (self.step - self.warmup) % self.update_every == 0:
            self.reweight()
        batch = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=self.generator)
        self.step += 1
        return batch.tolist()

    def __iter__(self) -> Iterator[list[int]]:
        while self.num_steps is None or self.step < self.num_steps:
            yield self.next_batch()

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless DDWASampler (num_steps=None) has no len()")
        return self.num_steps

    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "seed": self.seed,
            "generator": self.generator.get_state(),
            "step": self.step,
            "score_sum": self.score_sum.clone(),
            "seen": self.seen.clone(),
            "weights": self.weights.clone(),
            "boosted": self.boosted.clone(),
            "reweights": self.reweights,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, mine in (("n", self.n), ("seed", self.seed)):
            if state[key] != mine:
                raise ConfigError(f"state_dict {key}={state[key]} does not match this sampler's {key}={mine}")
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        self.score_sum = state["score_sum"].clone()
        self.seen = state["seen"].clone()
        self.weights = state["weights"].clone()
        self.boosted = state["boosted"].clone()
        self.reweights = int(state["reweights"])


__all__ = [
    "CurriculumSchedule",
    "DDWASampler",
    "MixtureSampler",
    "logit_grad_norm",
    "mas_weights",
    "plot_mixture",
    "sample_complexity",
    "source_complexity",
    "temperature_weights",
]
