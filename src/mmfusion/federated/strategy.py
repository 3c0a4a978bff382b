"""The server's strategy: Flower's FedAvg / FedProx (optionally inside Flower's DP wrapper), wrapped once more
for what a run records.

    Recorded(inner, ...) -> per round: bytes down / up, clients trained / failed, their mean local loss
    (weighted by their sample counts)

The wrapper also makes a round reproducible (results aggregated in client order, whatever order they
arrived in), waits for every client before round 1 (so round 1 never starts short), and applies the
payload codec (mmfusion.federated.wire): the global model travels compressed, aggregation runs in float32.
"""

from __future__ import annotations

import time
from typing import Any

from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedProx,
    Strategy,
)

from ..errors import MMFusionError
from ..train.federated_config import FederatedConfig
from .wire import decode, encode, payload_bytes


def base_strategy(fcfg: FederatedConfig, initial, evaluate_fn, fit_config) -> Strategy:
    """Flower's FedAvg or FedProx over `initial` arrays (float32), optionally in the server-side DP wrapper."""
    kwargs: dict[str, Any] = dict(
        fraction_fit=fcfg.fraction_fit,
        fraction_evaluate=0.0,  # the server evaluates the global model itself (evaluate_fn)
        min_fit_clients=1,
        min_evaluate_clients=0,
        min_available_clients=1,  # after round 1 a lost client does not stall the federation
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=fit_config,
        accept_failures=True,
        initial_parameters=ndarrays_to_parameters(initial),
        fit_metrics_aggregation_fn=mean_client_loss,
    )
    inner: Strategy = (
        FedProx(proximal_mu=fcfg.proximal_mu, **kwargs) if fcfg.strategy == "fedprox" else FedAvg(**kwargs)
    )
    if fcfg.dp is not None:
        sampled = max(1, int(fcfg.clients * fcfg.fraction_fit))
        inner = DifferentialPrivacyServerSideFixedClipping(
            inner, fcfg.dp.noise_multiplier, fcfg.dp.clipping_norm, sampled
        )
    return inner


def mean_client_loss(metrics: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """The clients' last local loss, weighted by their sample counts."""
    pairs = [(n, float(m["loss"])) for n, m in metrics if "loss" in m]
    total = sum(n for n, _ in pairs)
    return {"loss": sum(n * v for n, v in pairs) / total} if total else {}


class Recorded(Strategy):
    """`inner` with the payload codec, a deterministic aggregation order and per-round records."""

    def __init__(self, inner: Strategy, fcfg: FederatedConfig, dtypes, log=print, clients_gone=None):
        super().__init__()
        self.inner, self.fcfg, self.dtypes, self.log = inner, fcfg, list(dtypes), log
        self.clients_gone = clients_gone  # () -> why a client cannot join any more (None: none such)
        self.records: dict[int, dict[str, Any]] = {}
        self._t0: dict[int, float] = {}

    def __repr__(self) -> str:
        return f"Recorded({self.inner!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        if server_round == 1:
            self._wait_for_clients(client_manager)
        self._t0[server_round] = time.perf_counter()
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        out = []
        for proxy, ins in instructions:
            arrays = encode(parameters_to_ndarrays(ins.parameters), self.fcfg.compression)
            out.append((proxy, FitIns(ndarrays_to_parameters(arrays), ins.config)))
        self.records[server_round] = {
            "round": server_round,
            "clients_sampled": len(out),
            "bytes_down": sum(payload_bytes(ins.parameters) for _, ins in out),
        }
        return out

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures):
        rec = self.records.setdefault(server_round, {"round": server_round})
        rec["bytes_up"] = sum(payload_bytes(res.parameters) for _, res in results)
        rec["clients_ok"], rec["clients_failed"] = len(results), len(failures)
        rec["client_loss"] = mean_client_loss([(res.num_examples, res.metrics) for _, res in results]).get(
            "loss", float("nan")
        )
        rec["cids"] = sorted(int(res.metrics.get("cid", -1)) for _, res in results)
        decoded = []
        for proxy, res in sorted(results, key=lambda r: int(r[1].metrics.get("cid", -1))):
            arrays = decode(parameters_to_ndarrays(res.parameters), self.dtypes)
            res = FitRes(res.status, ndarrays_to_parameters(arrays), res.num_examples, res.metrics)
            decoded.append((proxy, res))
        for f in failures:
            self.log(f"round {server_round}: a client failed: {_describe_failure(f)}")
        params, metrics = self.inner.aggregate_fit(server_round, decoded, failures)
        rec["seconds"] = time.perf_counter() - self._t0.get(server_round, time.perf_counter())
        return params, metrics

    def _wait_for_clients(self, client_manager: ClientManager) -> None:
        """Every client connected before round 1, or an error: a client process that ended, or the timeout."""
        n, deadline = self.fcfg.clients, time.monotonic() + self.fcfg.connect_timeout_s
        while not client_manager.wait_for(n, timeout=1):
            gone = self.clients_gone() if self.clients_gone is not None else None
            if gone:
                raise MMFusionError(f"federated: {gone}")
            if time.monotonic() > deadline:
                raise MMFusionError(
                    f"federated: {client_manager.num_available()} of {n} clients connected within "
                    f"connect_timeout_s = {self.fcfg.connect_timeout_s} s"
                )

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters):
        return self.inner.evaluate(server_round, parameters)


def _describe_failure(f) -> str:
    if isinstance(f, BaseException):
        return f"{type(f).__name__}: {f}"
    proxy, res = f
    return f"client {proxy.cid}: {res.status.message}"


__all__ = ["Recorded", "base_strategy"]
