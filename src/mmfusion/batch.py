"""The Batch: modality -> tensor, plus a boolean presence mask per modality (True = present)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Batch:
    """A collated batch.

    data:  modality -> tensor whose first dim is the batch (e.g. "image": (B, 3, H, W), "text": (B, L) ids);
           task targets (e.g. "label": (B,) int64) ride here too and have no mask
    mask:  modality -> bool tensor (B,), True where the sample has that modality. A missing modality is
           explicit here; its rows in `data` are placeholders that models must ignore.
    meta:  per-sample non-tensor fields (ids, scene keys, raw captions) for evaluation and logging.
    """

    data: dict[str, torch.Tensor]
    mask: dict[str, torch.Tensor]
    meta: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.data.values())).shape[0] if self.data else 0

    def __contains__(self, modality: str) -> bool:
        return modality in self.data

    def __getitem__(self, modality: str) -> torch.Tensor:
        return self.data[modality]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            {k: v.to(device, non_blocking=True) for k, v in self.data.items()},
            {k: v.to(device, non_blocking=True) for k, v in self.mask.items()},
            self.meta,
        )
