"""The edge: a Flower NumPyClient that trains the run's model on its own samples with the one Trainer.

Per round it receives the global model (and the round's config: local_steps, lr, proximal_mu), runs
`local_steps` optimizer steps of mmfusion.train.Trainer on its ClientDataset (fresh AdamW, constant lr, a
shuffle seeded by run seed, round and client), and returns the new state with its sample count. FedProx's
proximal term mu/2 * |w - w_global|^2 enters as its gradient mu * (w - w_global), added by a Trainer
callback before clipping and the step. Its training log is <run>/clients/client-<cid>/metrics.jsonl, one
stage per round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.client import NumPyClient
from torch import nn

from ..run import model_collate, train_data
from ..train.rng import seed_everything
from ..train.trainer import StageInfo, Trainer
from .wire import decode, encode, load_arrays, state_arrays


class ProximalTerm:
    """FedProx (Li et al. 2020): adds mu * (w - w_global) to each parameter's gradient, the gradient of
    mu/2 * |w - w_global|^2, with w_global the model as the round began."""

    def __init__(self, model: nn.Module, mu: float):
        self.mu = mu
        self.anchor = [p.detach().clone() for p in model.parameters()]

    def on_before_optimizer_step(self, trainer) -> None:
        with torch.no_grad():
            for p, g in zip(trainer.module.parameters(), self.anchor):
                if p.grad is not None:
                    p.grad.add_(p - g, alpha=self.mu)


def round_seed(seed: int, server_round: int, cid: int) -> int:
    """The seed of client `cid`'s local training in `server_round` (its shuffle and dropout)."""
    return int(np.random.default_rng([seed, server_round, cid]).integers(2**31))


class MMFusionClient(NumPyClient):
    """Client `cid` of a federation over `fed` (mmfusion.federated.setup.Federation), holding `data`."""

    def __init__(
        self, cid: int, fed, data, model: nn.Module | None = None, callbacks: list[Any] | None = None
    ):
        self.cid, self.fed, self.data = cid, fed, data
        self.model = model if model is not None else fed.new_model()
        self.dtypes = [a.dtype for a in state_arrays(self.model)]
        self.callbacks = callbacks or []
        self.dir = Path(fed.out) / "clients" / f"client-{cid}"

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return encode(state_arrays(self.model), self.fed.cfg.federated.compression)

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]):
        cfg = self.fed.cfg
        load_arrays(self.model, decode(parameters, self.dtypes))
        server_round, steps = int(config["server_round"]), int(config["local_steps"])
        mu = float(config.get("proximal_mu", 0.0))
        seed = round_seed(cfg.seed, server_round, self.cid)
        seed_everything(seed)
        batch = min(cfg.train.batch_size, len(self.data))
        train = cfg.train.model_copy(
            update={
                "steps": steps,
                "batch_size": batch,
                "accumulation": 1,
                "lr": float(config["lr"]),
                "warmup_steps": 0,
                "min_lr_ratio": 1.0,  # constant within a round; the server decays lr over rounds
                "eval_every": 0,
                "log_every": min(cfg.train.log_every, steps),
                "progress": False,
            }
        )
        data = train_data(
            cfg.model_copy(update={"seed": seed}), self.data, model_collate(cfg, self.model), batch
        )
        stage = StageInfo(
            server_round - 1, f"round-{server_round}", (server_round - 1) * steps, cfg.federated.rounds
        )
        callbacks = [*self.callbacks, *([ProximalTerm(self.model, mu)] if mu > 0 else [])]
        trainer = Trainer(
            self.model,
            data,
            train,
            self.dir,
            log=lambda _m: None,
            stage=stage,
            callbacks=callbacks,
            checkpoints=False,
        )
        last = trainer.fit()
        metrics = {"loss": float(last.get("loss", float("nan"))), "cid": self.cid, "samples": len(self.data)}
        return self.get_parameters({}), len(self.data), metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]):
        # the server evaluates the global model on held-out data (federated.py); clients are not asked
        return 0.0, len(self.data), {}


__all__ = ["MMFusionClient", "ProximalTerm", "round_seed"]
