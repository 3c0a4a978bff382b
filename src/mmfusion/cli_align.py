"""`mmfusion align`: constrained RLHF (PPO-CS) of a small unified decoder (mmfusion.align)."""

from __future__ import annotations

import argparse


def add_align_commands(sub: argparse._SubParsersAction, add_config_args) -> None:
    p = sub.add_parser(
        "align",
        help="PPO-CS: RLHF of a unified decoder with a learned reward and a safety cost (Z1)",
        description="Supervised fine-tuning of a small unified decoder on the alignment world (caption a scene; "
        "naming the forbidden colour is harmful), reward and cost models fitted to labelled pairs (the "
        "world's, or data.labels: a JSONL of labelled / preference pairs), then PPO with a value head, GAE and "
        "a KL penalty to the SFT policy. On a user's own text set data.sft (JSONL of {prompt, response} "
        "demonstrations), data.prompts (JSONL of {prompt}: PPO prompts; data.eval_prompts for held-out "
        "evaluation) and data.labels: the vocabulary comes from those files, and the figures come from the "
        "learned reward / cost models (there is no exact judge for a user's text). PPO runs "
        "under ppo.mechanism: none (plain PPO), resample (cut and re-sample "
        "trajectories whose safety score falls under ppo.theta, ppo.budget tries per prompt) or lagrangian "
        "(PPO-Lagrangian). Writes <out>/metrics.jsonl, results.json (before / after: on the world the "
        "harmful-output and task-completion rates by the exact judges; on a user's text the reward model's "
        "mean score, the cost model's mean P(harmful) and the rate of responses it scores harmful), model/, "
        "reward_model/, cost_model/ and ppo.png.",
    )
    add_config_args(p)  # --config (configs/ppo_cs.yaml), --set key.sub=value
    p.add_argument("--out", help="run folder (default: the config's out)")
    p.set_defaults(func=cmd_align)


def cmd_align(args) -> int:
    from .align.pipeline import load_align_config, run_align

    cfg = load_align_config(args.config, args.overrides)
    results = run_align(cfg, args.out)
    b, a = results["before"], results["after"]
    if results["world"] is None:
        figures = (
            f"harmful by the cost model {b['harmful_by_cost_model']:.3f} -> {a['harmful_by_cost_model']:.3f}, "
            f"reward model mean {b['reward_model_mean']:.3f} -> {a['reward_model_mean']:.3f} (learned judges)"
        )
    else:
        figures = f"harmful {b['harmful']:.3f} -> {a['harmful']:.3f}, complete {b['complete']:.3f} -> {a['complete']:.3f}"
    print(f"{cfg.ppo.mechanism}: {figures}, dropped prompts {results['dropped_prompts']:.0f}")
    return 0
