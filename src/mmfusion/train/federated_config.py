"""The `federated:` section: edge-cloud federated training on Flower (mmfusion.federated, requirement S6).

federated:
  clients: 4              # edges; each holds its own part of the training split (never sent anywhere)
  rounds: 10              # server rounds: send the global model, train locally, aggregate
  local_steps: 20         # optimizer steps each sampled client runs per round (the run's Trainer)
  fraction_fit: 1.0       # share of the connected clients trained each round
  strategy: fedavg        # fedavg | fedprox (Flower's strategies; fedprox adds mu/2 |w - w_global|^2)
  proximal_mu: 0.01
  partition: {by: label, alpha: 0.3}   # iid | label (Dirichlet label skew) | size (Dirichlet sizes)
  modalities: [[audio], [image], [audio, image]]   # per client (cycled): what each edge has
  compression: none       # none | fp16 | bf16: the parameters travel in that precision both ways
  dp: {noise_multiplier: 0.0, clipping_norm: 1.0}  # Flower's server-side fixed-clipping DP wrapper
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..schema import Section


class PartitionConfig(Section):
    """How the training split is divided among the clients (mmfusion.federated.partition).

    iid:   a seeded shuffle cut into equal parts.
    label: for each class, client shares drawn from Dirichlet(alpha): small alpha = each client sees few
           classes (label skew). `field`: the sample field that holds the class (default: data.target.field).
    size:  client sizes drawn from Dirichlet(alpha), samples otherwise shuffled (quantity skew).
    """

    by: Literal["iid", "label", "size"] = "iid"
    alpha: float = Field(0.5, gt=0)
    field: str | None = None
    min_samples: int = Field(8, ge=1)  # every client gets at least this many samples (redrawn until so)


class DPConfig(Section):
    """Server-side differential-privacy noise (Flower's DifferentialPrivacyServerSideFixedClipping): each
    client's update is clipped to `clipping_norm` and the aggregate gets Gaussian noise of standard deviation
    noise_multiplier * clipping_norm / clients sampled."""

    noise_multiplier: float = Field(0.0, ge=0)
    clipping_norm: float = Field(1.0, gt=0)


class FederatedConfig(Section):
    clients: int = Field(4, ge=1)
    rounds: int = Field(10, ge=1)
    local_steps: int = Field(20, ge=1)
    fraction_fit: float = Field(1.0, gt=0, le=1)
    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float = Field(0.01, ge=0)
    partition: PartitionConfig = PartitionConfig()
    # the input keys (model encoders) each client has, cycled over the clients; None: every client has all
    modalities: list[list[str]] | None = None
    compression: Literal["none", "fp16", "bf16"] = "none"
    dp: DPConfig | None = None
    # processes mode: where the server listens (port 0: a free one) and how long it waits
    address: str = "127.0.0.1:0"
    connect_timeout_s: float = Field(120.0, gt=0)  # for every client to connect before round 1
    round_timeout_s: float | None = Field(600.0, gt=0)  # a client that takes longer counts as failed

    @model_validator(mode="after")
    def _check(self) -> FederatedConfig:
        if self.modalities is not None:
            for i, keys in enumerate(self.modalities):
                if not keys:
                    raise ValueError(f"federated.modalities[{i}] is empty: a client needs at least one input")
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"federated.address = {self.address!r}: expected host:port, e.g. 127.0.0.1:8080")
        return self

    def client_modalities(self, cid: int) -> list[str] | None:
        """The input keys client `cid` has (None: all of them)."""
        if self.modalities is None:
            return None
        return list(self.modalities[cid % len(self.modalities)])


__all__ = ["DPConfig", "FederatedConfig", "PartitionConfig"]
