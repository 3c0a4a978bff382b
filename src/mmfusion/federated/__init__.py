"""Edge-cloud federated training on Flower (requirement S6): `mmfusion federate --config configs/federated.yaml`.

partition   non-IID splits of a training split (label / size skew) and per-client modalities
wire        model state <-> Flower arrays, fp16 / bf16 payload compression
client      MMFusionClient: Flower NumPyClient around the one Trainer (FedProx's proximal term as a callback)
strategy    Flower's FedAvg / FedProx (+ DP wrapper), recorded: bytes per round, failures, ordered aggregation
server      the run directory, the resolved config, held-out evaluation of the global model each round
federate    simulation (every client in this process, Flower's server loop) and processes over localhost
"""

import logging
import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower would post usage events; no network here


def quiet_flower(level: int = logging.ERROR) -> None:
    """Flower logs every round step at INFO and warns that start_server / start_client are deprecated (see
    docs/federated.md); mmfusion prints one line per round itself."""
    logging.getLogger("flwr").setLevel(level)
