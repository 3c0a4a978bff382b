"""What the Trainer does with each optimizer step's model outputs besides logging.

* Aux-loss-free MoE balancing (DeepSeek-V3, Wang et al. 2024 arXiv:2408.15664; as in torchtitan): after the
  optimizer step, every MoE fusion built with `aux_free_bias` gets `update_expert_bias(load)`, where load is
  its tokens per expert of the step (ModelOutput.routing), summed over the micro-batches and the ranks, so
  every rank applies the same update: bias_i += u * sign(mean load - load_i), centred per group.
* The data's `observe(micro)` when it has one (`data.sampler: ddwa` scores the step's samples).
* Stateful data (`state_dict` / `load_state_dict`, e.g. the DDWA sampler) in the checkpoint: tensors as
  extra tensors "data.<key>", the rest in state.json under "data".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError
from . import distributed as dist_utils

if TYPE_CHECKING:
    from ..batch import Batch
    from ..models.contrastive import ModelOutput

DATA_PREFIX = "data."


class StepHooks:
    """Built by the Trainer from its unwrapped model and its data; `after_step` runs once per optimizer step."""

    def __init__(self, module: nn.Module, data: Any):
        from ..fusion.moe import MoEFusion

        self.balanced = {
            name: m for name, m in module.named_modules() if isinstance(m, MoEFusion) and m.aux_free_bias
        }
        self.observe = getattr(data, "observe", None)

    @property
    def active(self) -> bool:
        """Whether the Trainer must keep each step's (batch, output) pairs for `after_step`."""
        return bool(self.balanced) or self.observe is not None

    def after_step(self, micro: list[tuple[Batch, ModelOutput]]) -> dict[str, float]:
        """Run after the optimizer step on its micro-batches; returns metrics to log."""
        metrics: dict[str, float] = {}
        for name, moe in self.balanced.items():
            counts = [out.routing[name] for _, out in micro if name in out.routing]
            if not counts:
                raise ConfigError(
                    f"{name}: aux_free_bias is set but the model's forward returns no routing stats for it "
                    f"(ModelOutput.routing[{name!r}]), so its expert bias would never move"
                )
            load = dist_utils.all_reduce_sum(torch.stack(counts).sum(dim=0).float().tolist())
            moe.update_expert_bias(torch.tensor(load, device=moe.expert_bias.device))
        if self.observe is not None:
            metrics.update(self.observe(micro))
        return metrics


def data_state(data: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON part, tensors as extra "data.<key>") of stateful data; ({}, {}) for data without state."""
    if not hasattr(data, "state_dict"):
        return {}, {}
    state = data.state_dict()
    tensors = {DATA_PREFIX + k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}, tensors


def load_data_state(
    data: Any, rest: dict[str, Any] | None, extra: dict[str, torch.Tensor], where: str
) -> None:
    """Inverse of `data_state`, from a checkpoint's state.json "data" entry and its extra tensors."""
    if not hasattr(data, "load_state_dict"):
        return
    if rest is None:
        from ..errors import CheckpointError

        raise CheckpointError(
            f"{where} holds no data-sampler state: it was written by a run with another sampler"
        )
    tensors = {k.removeprefix(DATA_PREFIX): v for k, v in extra.items() if k.startswith(DATA_PREFIX)}
    data.load_state_dict({**rest, **tensors})


__all__ = ["StepHooks", "data_state", "load_data_state"]
