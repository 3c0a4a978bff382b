"""The resumable mixture sampler (D3, T9): a seeded stream of (source_index, sample_index) pairs.

``MixtureSampler`` draws the source from the target mixture of the current step (fixed weights, a
``CurriculumSchedule`` or any step -> weights callable; see ``weights.py``), the sample from that source's own
seeded permutation (reshuffled each time it is used up), so every source is seen without replacement within
its epochs. It is deterministic, resumable (``state_dict`` / ``load_state_dict`` continue the exact stream)
and records the realised mixture. Its state_dict holds only tensors, ints, floats, lists and dicts, so
``torch.load(weights_only=True)`` reads it back.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ...errors import ConfigError, DataError
from .weights import (
    CurriculumSchedule,
    mas_weights,
    normalise_weights,
    source_complexity,
    temperature_weights,
)


def sub_seed(*words: int) -> int:
    """A 63-bit seed from integers (numpy SeedSequence hashing: distinct words give unrelated seeds); seeds
    both samplers (MixtureSampler here, DDWASampler in ddwa_sampler.py)."""
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
            self._fixed, self._schedule = normalise_weights(w, "weights"), None
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
        self.generator = torch.Generator().manual_seed(sub_seed(self.seed, 0x5EED))
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
        return normalise_weights(w, f"weights({s})")

    def _permutation(self, source: int) -> list[int]:
        epoch = self.epochs[source]
        cached = self._perm_cache.get(source)
        if cached is None or cached[0] != epoch:
            g = torch.Generator().manual_seed(sub_seed(self.seed, source, epoch))
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


__all__ = ["MixtureSampler", "sub_seed"]
