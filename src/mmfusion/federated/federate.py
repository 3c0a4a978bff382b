"""`mmfusion federate`: a federation in one process (simulation) or as real processes over localhost.

simulation: N MMFusionClients in this process behind in-process ClientProxies, driven by Flower's own
            server loop (flwr.server.Server.fit) and strategy, one client at a time (deterministic; Flower's
            Ray-based simulation engine is not needed for models this size).
processes:  this process runs Flower's gRPC-bidi server (start_grpc_server + run_fl, what start_server does)
            and starts N client processes
            (`mmfusion federate --connect HOST:PORT --client-id I`), each in its own session; a client that
            dies mid-round counts as that round's failure and the federation goes on without it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flwr.common import DisconnectRes
from flwr.server.client_proxy import ClientProxy

from . import quiet_flower
from .server import (
    Evaluator,
    Federation,
    open_client_side,
    prepare_server,
    round_lr,
    write_round,
)


class InProcessProxy(ClientProxy):
    """A Flower ClientProxy that calls a client object in this process (what Ray actors do in Flower's
    simulation engine, without the actors)."""

    def __init__(self, cid: str, client):
        super().__init__(cid)
        self.client = client.to_client()

    def get_properties(self, ins, timeout, group_id):
        return self.client.get_properties(ins)

    def get_parameters(self, ins, timeout, group_id):
        return self.client.get_parameters(ins)

    def fit(self, ins, timeout, group_id):
        return self.client.fit(ins)

    def evaluate(self, ins, timeout, group_id):
        return self.client.evaluate(ins)

    def reconnect(self, ins, timeout, group_id):
        return DisconnectRes(reason="")


def _strategy(fed: Federation, evaluator: Evaluator, log, clients_gone=None):
    from .strategy import Recorded, base_strategy
    from .wire import load_arrays, state_arrays

    f = fed.cfg.federated
    initial = state_arrays(evaluator.model)
    dtypes = [a.dtype for a in initial]
    recorded: Recorded | None = None

    def fit_config(server_round: int) -> dict[str, Any]:
        return {
            "server_round": server_round,
            "local_steps": f.local_steps,
            "lr": round_lr(fed.cfg, server_round),
        }

    def evaluate_fn(server_round: int, arrays, config) -> tuple[float, dict[str, float]]:
        load_arrays(evaluator.model, arrays)
        metrics = evaluator.metrics()
        key, value = evaluator.headline(metrics)
        row = {
            "round": server_round,
            **(recorded.records.get(server_round, {}) if recorded else {}),
            **metrics,
        }
        if server_round > 0:
            evaluator.save_round(server_round)
        write_round(fed.out, row)
        evaluator.history.append(row)
        extra = ""
        if server_round > 0:
            extra = (
                f", clients ok {row.get('clients_ok')}/{row.get('clients_sampled')}, client loss "
                f"{row.get('client_loss', float('nan')):.4f}, {(row.get('bytes_down', 0) + row.get('bytes_up', 0)) / 1e6:.2f} MB"
            )
        log(f"round {server_round}/{f.rounds}: {key} {value:.4f}{extra}")
        return 1.0 - value, metrics

    inner = base_strategy(f, initial, evaluate_fn, fit_config)
    recorded = Recorded(inner, f, dtypes, log, clients_gone)
    return recorded


def _finish(fed: Federation, evaluator: Evaluator, partition_info: dict[str, Any], log) -> dict[str, Any]:
    import json

    from .plots import plot_rounds

    model_dir = evaluator.model.save_pretrained(fed.out / "model")
    tok = fed.out / "tokenizer.json"
    if tok.is_file() and not (Path(model_dir) / "tokenizer.json").is_file():
        import shutil

        shutil.copyfile(tok, Path(model_dir) / "tokenizer.json")
    final = evaluator.history[-1] if evaluator.history else {}
    rows = evaluator.history
    metrics = {
        "split": evaluator.split,
        "rounds": fed.cfg.federated.rounds,
        "final": final,
        "bytes_total": sum(r.get("bytes_down", 0) + r.get("bytes_up", 0) for r in rows),
        "clients_failed_total": sum(r.get("clients_failed", 0) for r in rows),
        "partition": partition_info,
    }
    (fed.out / "federated.json").write_text(json.dumps(metrics, indent=2))
    plot = plot_rounds(
        rows, fed.out / "plots" / "federated.png", evaluator.headline(final)[0] if final else None
    )
    log(
        f"global model: {model_dir}; per-round log {fed.out / 'federated.jsonl'}"
        + (f"; plot {plot}" if plot else "")
    )
    return metrics


def simulate(cfg, overwrite: bool = False, log=print) -> dict[str, Any]:
    """Run the federation with every client in this process; returns federated.json's content."""
    from flwr.server import Server, SimpleClientManager

    from ..run import load_split
    from .client import MMFusionClient

    quiet_flower()
    fed = prepare_server(cfg, overwrite, log)
    f = fed.cfg.federated
    server_model = fed.new_model()
    evaluator = Evaluator(fed, server_model)
    train_set = load_split(fed.cfg, "train")
    datasets, info = fed.client_datasets(train_set, range(f.clients))
    _log_partition(info, log)
    workspace = fed.new_model()  # one model object the in-process clients take turns on
    manager = SimpleClientManager()
    for cid in range(f.clients):
        manager.register(InProcessProxy(str(cid), MMFusionClient(cid, fed, datasets[cid], model=workspace)))
    server = Server(client_manager=manager, strategy=_strategy(fed, evaluator, log))
    server.set_max_workers(1)  # one client at a time: deterministic, and no thread oversubscription
    log(
        f"federation: {f.clients} clients in this process, {f.rounds} rounds x {f.local_steps} local steps, {f.strategy}"
    )
    server.fit(num_rounds=f.rounds, timeout=f.round_timeout_s)
    return _finish(fed, evaluator, info, log)


def _free_address(address: str) -> str:
    host, _, port = address.rpartition(":")
    if int(port) != 0:
        return address
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"


def serve_processes(
    cfg, overwrite: bool = False, log=print, client_env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run Flower's gRPC server here and the clients as `mmfusion federate --connect` processes."""
    from flwr.server import Server, ServerConfig, SimpleClientManager
    from flwr.server.server import run_fl
    from flwr.server.superlink.fleet.grpc_bidi.grpc_server import start_grpc_server

    from ..process import kill_group

    quiet_flower()
    fed = prepare_server(cfg, overwrite, log)
    f = fed.cfg.federated
    evaluator = Evaluator(fed, fed.new_model())
    logs = fed.out / "clients"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []

    def exited_early() -> str | None:
        """Before round 1: a client process that already ended, with the end of its log."""
        for cid, p in enumerate(procs):
            if p.poll() is not None:
                tail = (logs / f"client-{cid}.log").read_text(errors="replace").strip().splitlines()[-5:]
                return f"client {cid} exited with code {p.returncode} before joining:\n  " + "\n  ".join(tail)
        return None

    strategy = _strategy(fed, evaluator, log, exited_early)
    address = _free_address(f.address)
    # The clients start first (they retry until the server listens), without a preexec_fn: a process with
    # gRPC's threads running must not run Python in a fork. They die with this process themselves
    # (MMFUSION_DIE_WITH_PARENT, run_client).
    env = {**os.environ, "MMFUSION_DIE_WITH_PARENT": "1", **(client_env or {})}
    manager, grpc_server = SimpleClientManager(), None
    try:
        for cid in range(f.clients):
            cmd = [
                *(sys.executable, "-m", "mmfusion.cli", "federate", "--connect", address),
                *("--client-id", str(cid), "--config", str(fed.out / "config.yaml")),
            ]
            with open(logs / f"client-{cid}.log", "w") as out:
                procs.append(
                    subprocess.Popen(
                        cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
                    )
                )
        # Flower's gRPC server (what flwr.server.start_server runs), stopped however the run ends
        grpc_server = start_grpc_server(client_manager=manager, server_address=address)
        log(
            f"federation: server on {address}, {f.clients} client processes (logs in {logs}), {f.rounds} rounds"
        )
        run_fl(Server(client_manager=manager, strategy=strategy), ServerConfig(f.rounds, f.round_timeout_s))
        deadline = time.monotonic() + 60  # run_fl told them to disconnect: they exit on their own
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        if grpc_server is not None:
            grpc_server.stop(grace=1)
        for p in procs:
            if p.poll() is None:
                kill_group(p)
                p.wait()
    codes = {cid: p.returncode for cid, p in enumerate(procs)}
    log("client exit codes: " + ", ".join(f"{c}={rc}" for c, rc in codes.items()))
    return _finish(fed, evaluator, {"client_exit_codes": codes}, log)


def run_client(config_path: str | Path, address: str, cid: int, log=print) -> int:
    """A client process: build this edge's data from the shared config, connect, train when asked."""
    from flwr.client import start_client

    from ..run import load_split
    from .client import MMFusionClient

    if os.environ.get("MMFUSION_DIE_WITH_PARENT") == "1":  # started by serve_processes: never outlive it
        from ..process import die_with_parent

        die_with_parent()
    quiet_flower()
    fed = open_client_side(config_path, log)
    f = fed.cfg.federated
    if not 0 <= cid < f.clients:
        from ..errors import ConfigError

        raise ConfigError(f"--client-id {cid}: the federation has clients 0..{f.clients - 1}")
    datasets, _ = fed.client_datasets(load_split(fed.cfg, "train"), [cid])
    client = MMFusionClient(cid, fed, datasets[cid])
    log(
        f"client {cid}: {len(datasets[cid])} samples, inputs {f.client_modalities(cid) or 'all'}; connecting to {address}"
    )
    start_client(
        server_address=address, client=client.to_client(), insecure=True, max_retries=30, max_wait_time=60
    )
    return 0


def _log_partition(info: dict[str, Any], log) -> None:
    for cid, size in enumerate(info["sizes"]):
        labels = info.get("labels", [None] * len(info["sizes"]))[cid]
        log(
            f"client {cid}: {size} samples, inputs {info['modalities'][cid]}"
            + (f", labels {labels}" if labels else "")
        )


__all__ = ["InProcessProxy", "run_client", "serve_processes", "simulate"]
