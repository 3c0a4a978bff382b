"""`mmfusion federate`: edge-cloud federated training on Flower (mmfusion.federated)."""

from __future__ import annotations

import argparse


def add_federated_commands(sub: argparse._SubParsersAction, add_config_args) -> None:
    p = sub.add_parser(
        "federate",
        help="federated training on Flower: clients train on their own data, the server aggregates",
        description="Federated training of the recipe's model on Flower (FedAvg / FedProx, optional DP noise). "
        "Each client holds its part of the training split (federated.partition: iid | label | size) and the "
        "inputs federated.modalities gives it; per round it trains federated.local_steps steps with the "
        "run's Trainer and sends its model back; the server aggregates and evaluates the global model on "
        "the test split. Writes runs/<name>/model (the global model), rounds/round-NNN, federated.jsonl, "
        "federated.json and plots/federated.png. --mode simulation runs every client in this process; "
        "--mode processes runs Flower's gRPC server here and one process per client over localhost.",
    )
    add_config_args(p)  # --config (a recipe with a federated: section), --set, as `mmfusion train`
    p.add_argument("--clients", type=int, help="number of clients (overrides federated.clients)")
    p.add_argument("--rounds", type=int, help="number of rounds (overrides federated.rounds)")
    p.add_argument(
        "--mode",
        choices=["simulation", "processes"],
        default="simulation",
        help="simulation: all clients in this process (default); processes: one process per client over gRPC",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="delete an existing run directory of the same name"
    )
    # a client process (started by --mode processes, or by hand on an edge that shares the run directory)
    p.add_argument("--connect", metavar="HOST:PORT", help="run one client and connect it to this server")
    p.add_argument("--client-id", type=int, help="with --connect: which client (0..clients-1) this is")
    p.set_defaults(func=cmd_federate)


def cmd_federate(args) -> int:
    from .config import load_config
    from .errors import ConfigError

    if args.connect:
        if args.client_id is None or not args.config:
            raise ConfigError("--connect needs --client-id and --config (the run's config.yaml)")
        from .federated.federate import run_client

        return run_client(args.config, args.connect, args.client_id)
    overrides = list(args.overrides)
    if args.clients is not None:
        overrides.append(f"federated.clients={args.clients}")
    if args.rounds is not None:
        overrides.append(f"federated.rounds={args.rounds}")
    cfg = load_config(args.config, overrides)
    if cfg.federated is None:
        raise ConfigError(
            f"{args.config or 'the default config'}: no federated: section (see configs/federated.yaml)"
        )
    from .federated.federate import serve_processes, simulate

    run = simulate if args.mode == "simulation" else serve_processes
    metrics = run(cfg, overwrite=args.overwrite)
    final = metrics.get("final", {})
    shown = {k: round(v, 4) for k, v in final.items() if k.startswith(("accuracy", "i2t", "t2i"))}
    print(f"final global model: {shown}; {metrics['bytes_total'] / 1e6:.2f} MB communicated")
    return 0
