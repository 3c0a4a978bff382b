"""Data-aware sampling over several sources (D3, D4, T9), one file per concern:

* ``weights.py``: mixture weights (``temperature_weights``, ``mas_weights`` with ``source_complexity``) and
  the ``CurriculumSchedule`` (a mixture that changes over training).
* ``mixture.py``: ``MixtureSampler``, the seeded, resumable stream of (source, sample) pairs that follows a
  target mixture and records the realised one.
* ``plot.py``: ``plot_mixture`` (realised vs target shares) and ``history_from_metrics``.
* ``ddwa_sampler.py``: ``DDWASampler`` (dynamic data weighting by a per-sample gradient-norm proxy,
  ``logit_grad_norm``). The Trainer-side wiring of `data.sampler: ddwa` is ``mmfusion.data.ddwa``.

Their public names are importable from here. Every state_dict holds only tensors, ints, floats, lists and
dicts, so ``torch.load(weights_only=True)`` reads it back.
"""

from __future__ import annotations

from .ddwa_sampler import DDWASampler, logit_grad_norm
from .mixture import MixtureSampler
from .plot import history_from_metrics, plot_mixture
from .weights import (
    DEFAULT_UNITS,
    CurriculumSchedule,
    mas_weights,
    sample_complexity,
    source_complexity,
    temperature_weights,
)

__all__ = [
    "DEFAULT_UNITS",
    "CurriculumSchedule",
    "DDWASampler",
    "MixtureSampler",
    "history_from_metrics",
    "logit_grad_norm",
    "mas_weights",
    "plot_mixture",
    "sample_complexity",
    "source_complexity",
    "temperature_weights",
]
