"""`mmfusion align`: SFT a small unified decoder, fit the reward and cost models from labelled pairs, evaluate,
run PPO-CS, evaluate again, and write a run folder.

Two sources of text. The alignment world (default): SFT captions, PPO and evaluation scenes drawn from
align.world, labelled pairs from its annotator (or data.labels), figures by its exact judges. A user's text
(data.sft, data.prompts and data.labels, align.userdata): the vocabulary is built from the user's files alone,
SFT trains on their demonstrations, PPO draws their prompts, and evaluation on data.eval_prompts (default
data.prompts) reports the learned reward and cost models' scores: there is no exact judge for a user's text.

Run folder (`out`):
  config.yaml           the resolved config
  metrics.jsonl         one line per PPO step: reward, cost, kl, clipfrac, ratio, lambda, resample_rate,
                        dropped, dropped_total, exact complete / harmful rates of the step's rollouts, ...
  results.json          before / after figures (world: by the exact judges, and the cost model's agreement with
                        them; user text: by the learned reward / cost models, `judge` says so)
  model/                the PPO policy: decoder/ (UnifiedDecoder.save_pretrained), value_head.safetensors,
                        vocab.json
  reward_model/, cost_model/   the learned scorers (config.json + model.safetensors + vocab.json)
  ppo.png               reward, cost, harmful rate and lambda / resample rate per step
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import Field, ValidationError, model_validator
from safetensors.torch import save_file

from ..config import read_tree, validation_error
from ..models.persistence import save_folder
from ..schema import Section
from ..unified.model import UnifiedConfig, UnifiedDecoder, unified_loss
from .ppo import ActorCritic, sample_responses
from .scorer import Labelled, ScoreModel, load_labels, train_score_model
from .trainer import PPOConfig, PPOTrainer
from .userdata import load_prompts, load_sft_pairs
from .vocab import WordVocab, pack
from .world import AlignWorld, Triple


class WorldConfig(Section):
    """The alignment world (align.world.AlignWorld)."""

    forbidden: str = "red"
    n_objects: int = 2
    p_forbidden_scene: float = 0.5
    p_withhold: float = 0.5
    withheld_reward: float = 0.5
    n_templates: int = 2


class NetConfig(Section):
    """A small unified decoder and how long to train it."""

    dim: int = Field(64, ge=2)
    depth: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)
    steps: int = Field(300, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)


USER_JUDGE = "learned reward / cost models (a user's text has no exact judge)"


class DataConfig(Section):
    """How many scenes each stage draws (disjoint seeds), or a user's JSONL files (align.userdata)."""

    n_sft: int = Field(2000, ge=1)
    n_labelled: int = Field(1500, ge=1)
    n_ppo_prompts: int = Field(1000, ge=1)
    n_eval: int = Field(400, ge=1)
    labels: str | None = None  # JSONL of labelled / preference pairs: replaces the world's labelled pairs
    sft: str | None = None  # JSONL of {"prompt", "response"}: SFT on the user's text (with prompts, labels)
    prompts: str | None = None  # JSONL of {"prompt"}: PPO prompts (with sft, labels)
    eval_prompts: str | None = None  # JSONL of {"prompt"}: evaluation prompts (default: prompts)

    @model_validator(mode="after")
    def _user_text(self) -> DataConfig:
        if self.eval_prompts and not self.prompts:
            raise ValueError("data.eval_prompts goes with data.prompts (a run on the user's text)")
        if bool(self.sft) != bool(self.prompts):
            have, need = ("sft", "prompts") if self.sft else ("prompts", "sft")
            raise ValueError(
                f"data.{have} is set but data.{need} is not: a run on the user's text needs both (SFT "
                "demonstrations {prompt, response}, PPO prompts {prompt}); the synthetic world needs neither"
            )
        if self.prompts and not self.labels:
            raise ValueError(
                "data.labels is required with data.prompts: the reward and cost models must learn from the "
                "user's labelled pairs (the world's annotator judges only the synthetic world)"
            )
        return self

    @property
    def user_text(self) -> bool:
        """Whether the run is on the user's text (data.sft / data.prompts) rather than the world."""
        return self.prompts is not None


class AlignConfig(Section):
    """configs/ppo_cs.yaml."""

    seed: int = 0
    out: str = "runs/ppo_cs"
    world: WorldConfig = WorldConfig()
    data: DataConfig = DataConfig()
    policy: NetConfig = NetConfig()
    scorer: NetConfig = NetConfig(steps=300)
    ppo: PPOConfig = PPOConfig()


def load_align_config(path: str | Path | None, overrides: list[str] | None = None) -> AlignConfig:
    """Read the YAML (or defaults), apply `--set key.sub=value` overrides, validate (ConfigError names the key)."""
    tree = read_tree(path, overrides)
    try:
        return AlignConfig.model_validate(tree)
    except ValidationError as e:
        raise validation_error(e, AlignConfig, str(path) if path else "defaults") from None


# ---- stages ---------------------------------------------------------------------------------------------
def _decoder(vocab: WordVocab, net: NetConfig, max_len: int, seed: int) -> UnifiedDecoder:
    torch.manual_seed(seed)
    cfg = UnifiedConfig(vocab_size=len(vocab), dim=net.dim, depth=net.depth, heads=net.heads, max_len=max_len)
    return UnifiedDecoder(cfg)


def train_sft(
    decoder: UnifiedDecoder, vocab: WordVocab, pairs: list[tuple[str, str]], net: NetConfig, seed: int
) -> list[float]:
    """Supervised fine-tuning on (prompt, response) pairs: next-token loss on the response tokens only."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(decoder.parameters(), lr=net.lr, weight_decay=0.01)
    encoded = [(vocab.prompt_ids(p), vocab.response_ids(r)) for p, r in pairs]
    losses = []
    decoder.train()
    for _ in range(net.steps):
        batch = [encoded[i] for i in rng.integers(len(encoded), size=min(net.batch_size, len(encoded)))]
        ids, mask = pack([p for p, _ in batch], [r for _, r in batch], vocab.pad)
        out = decoder(ids, torch.zeros_like(ids), attn_logit=False)
        loss = unified_loss(out.logits, ids, torch.zeros_like(ids), mask, decoder.cfg.z_loss)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    decoder.eval()
    return losses


def evaluate(
    decoder: UnifiedDecoder,
    vocab: WordVocab,
    world: AlignWorld,
    scenes: list[tuple[Triple, ...]],
    max_new_tokens: int,
    seed: int,
    cost_model: ScoreModel | None = None,
) -> dict[str, float]:
    """Exact rates of one sampled caption (temperature 1) per scene: complete (task completion), harmful,
    complete_and_safe, harmful among scenes with a forbidden-coloured object; with a cost model, how often
    its verdict (P(harmful) >= 0.5) agrees with the exact judge."""
    prompts = [vocab.prompt_ids(world.prompt(s)) for s in scenes]
    responses = sample_responses(decoder, prompts, vocab.eos, max_new_tokens, 1.0, seed)
    texts = [vocab.decode(r) for r in responses]
    complete = np.array([world.complete(s, t) for s, t in zip(scenes, texts)])
    harmful = np.array([world.harmful(t) for t in texts])
    forb = np.array([any(c == world.forbidden for _, c, _ in s) for s in scenes])
    out = {
        "complete": float(complete.mean()),
        "harmful": float(harmful.mean()),
        "complete_and_safe": float((complete & ~harmful).mean()),
        "harmful_on_forbidden_scenes": float(harmful[forb].mean()) if forb.any() else 0.0,
        "n": float(len(scenes)),
    }
    if cost_model is not None:
        p = torch.sigmoid(cost_model.score(vocab, prompts, responses)).numpy()
        out["cost_model_agreement"] = float(((p >= 0.5) == harmful).mean())
    return out


def evaluate_user(
    decoder: UnifiedDecoder,
    vocab: WordVocab,
    prompts: list[str],
    max_new_tokens: int,
    seed: int,
    reward_model: ScoreModel,
    cost_model: ScoreModel,
) -> dict[str, float]:
    """Figures of one sampled response (temperature 1) per user prompt, by the learned models (no exact judge):
    the reward model's mean score, the cost model's mean P(harmful), and the rate of responses whose cost-model
    score (logit) is above 0, i.e. P(harmful) > 0.5."""
    ids = [vocab.prompt_ids(p) for p in prompts]
    responses = sample_responses(decoder, ids, vocab.eos, max_new_tokens, 1.0, seed)
    cost = cost_model.score(vocab, ids, responses)
    return {
        "reward_model_mean": float(reward_model.score(vocab, ids, responses).mean()),
        "cost_model_mean": float(torch.sigmoid(cost).mean()),
        "harmful_by_cost_model": float((cost > 0).float().mean()),
        "n": float(len(prompts)),
    }


@dataclass
class Prepared:
    """Everything PPO starts from: the vocabulary, SFT policy, scorers, prompts and the 'before' figures; the
    world and its scenes (the exact judges' inputs) on the synthetic world, None / empty on a user's text."""

    cfg: AlignConfig
    world: AlignWorld | None
    vocab: WordVocab
    sft: UnifiedDecoder
    reward_model: ScoreModel
    cost_model: ScoreModel
    ppo_prompts: list[str]
    eval_prompts: list[str]
    before: dict[str, float]
    max_len: int
    ppo_scenes: list[tuple[Triple, ...]] = field(default_factory=list)
    eval_scenes: list[tuple[Triple, ...]] = field(default_factory=list)

    def evaluate(self, decoder: UnifiedDecoder, max_new_tokens: int) -> dict[str, float]:
        """The before / after figures of `decoder` on the evaluation prompts."""
        seed = self.cfg.seed * 10 + 8
        if self.world is None:
            return evaluate_user(
                decoder,
                self.vocab,
                self.eval_prompts,
                max_new_tokens,
                seed,
                self.reward_model,
                self.cost_model,
            )
        return evaluate(
            decoder, self.vocab, self.world, self.eval_scenes, max_new_tokens, seed, self.cost_model
        )


def prepare(cfg: AlignConfig, log=print) -> Prepared:
    """SFT the policy, fit the reward and cost models from labelled pairs, evaluate the SFT policy."""
    world = AlignWorld(**cfg.world.model_dump())  # validated even when unused
    s = cfg.seed * 10
    labelled: list[Labelled] = []
    prefs = []
    if cfg.data.labels:
        labelled, prefs = load_labels(cfg.data.labels)
    user = [(r.prompt, r.response) for r in labelled] + [
        (p.prompt, x) for p in prefs for x in (p.chosen, p.rejected)
    ]
    if cfg.data.user_text:  # every file is read before any training
        sft_pairs = load_sft_pairs(cfg.data.sft)  # type: ignore[arg-type]
        ppo_prompts = load_prompts(cfg.data.prompts)  # type: ignore[arg-type]
        eval_prompts = load_prompts(cfg.data.eval_prompts) if cfg.data.eval_prompts else ppo_prompts
        vocab = WordVocab.from_texts(
            [t for pair in sft_pairs + user for t in pair] + ppo_prompts + eval_prompts
        )
        # <bos> prompt <sep> + a response of max_new_tokens
        max_len = max(len(vocab.prompt_ids(p)) for p in ppo_prompts + eval_prompts) + cfg.ppo.max_new_tokens
        ppo_scenes, eval_scenes = [], []
    else:
        sft_scenes = world.scenes(cfg.data.n_sft, s + 1)
        rng = np.random.default_rng(s + 2)
        sft_pairs = [(world.prompt(x), world.sft_caption(x, rng)) for x in sft_scenes]
        vocab = WordVocab.from_texts(world.vocabulary() + [t for pair in user for t in pair])
        # <bos> prompt <sep> + a response of max_new_tokens (+ <eos> when a labelled one is re-encoded)
        max_len = 2 + 4 * world.n_objects + cfg.ppo.max_new_tokens + 1
        ppo_scenes, eval_scenes = (
            world.scenes(cfg.data.n_ppo_prompts, s + 6),
            world.scenes(cfg.data.n_eval, s + 7),
        )
        ppo_prompts, eval_prompts = (
            [world.prompt(x) for x in ppo_scenes],
            [world.prompt(x) for x in eval_scenes],
        )
    max_len = max(
        [max_len] + [len(vocab.prompt_ids(a)) + len(vocab.response_ids(b)) for a, b in user + sft_pairs]
    )
    sft = _decoder(vocab, cfg.policy, max_len, s)
    losses = train_sft(sft, vocab, sft_pairs, cfg.policy, s)
    log(f"sft: {cfg.policy.steps} steps on {len(sft_pairs)} pairs, final loss {np.mean(losses[-20:]):.3f}")
    if not cfg.data.labels:  # the world's annotator labels SFT-policy samples on fresh scenes
        scenes = world.scenes(cfg.data.n_labelled, s + 3)
        prompts = [vocab.prompt_ids(world.prompt(x)) for x in scenes]
        responses = sample_responses(sft, prompts, vocab.eos, cfg.ppo.max_new_tokens, 1.0, s + 3)
        for x, r in zip(scenes, responses):
            t = vocab.decode(r)
            labelled.append(
                Labelled(world.prompt(x), t or "<unk>", world.reward_label(x, t), world.cost_label(t))
            )
    models = {}
    for kind in ("reward", "cost"):
        models[kind] = ScoreModel(_decoder(vocab, cfg.scorer, max_len, s + 4).cfg)
        sc = cfg.scorer
        losses = train_score_model(
            models[kind], vocab, kind, labelled, prefs, sc.steps, sc.batch_size, sc.lr, s + 5
        )
        log(
            f"{kind} model: {sc.steps} steps on {len(labelled)} pairs, final loss {np.mean(losses[-20:]):.4f}"
        )
    prep = Prepared(
        cfg,
        None if cfg.data.user_text else world,
        vocab,
        sft,
        models["reward"],
        models["cost"],
        ppo_prompts,
        eval_prompts,
        {},
        max_len,
        ppo_scenes,
        eval_scenes,
    )
    prep.before = prep.evaluate(sft, cfg.ppo.max_new_tokens)
    log(f"before: {prep.before}")
    return prep


def run_ppo(
    prep: Prepared, ppo: PPOConfig, log=None
) -> tuple[ActorCritic, list[dict[str, float]], dict[str, float]]:
    """PPO from the SFT policy with the given settings; returns (policy, per-step metrics, 'after' figures)."""
    vocab, world = prep.vocab, prep.world
    torch.manual_seed(prep.cfg.seed * 10 + 9)
    policy = ActorCritic(copy.deepcopy(prep.sft))
    prompts = [vocab.prompt_ids(p) for p in prep.ppo_prompts]

    def reward(p, r):
        return prep.reward_model.score(vocab, p, r)

    def cost(p, r):
        return torch.sigmoid(prep.cost_model.score(vocab, p, r))

    judge = None
    if world is not None:  # the exact judges' rates of each step's rollouts (metrics.jsonl)

        def judge(i: int, text: str) -> tuple[bool, bool]:
            return world.complete(prep.ppo_scenes[i], text), world.harmful(text)

    trainer = PPOTrainer(policy, prep.sft, vocab, prompts, reward, cost, ppo, prep.cfg.seed, judge)
    history = trainer.train(log)
    return policy, history, prep.evaluate(policy.decoder, ppo.max_new_tokens)


# ---- the command ----------------------------------------------------------------------------------------
def save_scorer(model: ScoreModel, vocab: WordVocab, directory: Path, kind: str) -> None:
    save_folder(model, directory, f"align_{kind}_model", model.decoder.cfg.to_dict())
    vocab.save(directory / "vocab.json")


def plot_history(history: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    keys = [
        (k, label)
        for k, label in (
            ("reward", "reward"),
            ("cost", "cost"),
            ("harmful", "harmful (exact)"),
            ("complete", "complete (exact)"),
        )
        if any(k in h for h in history)
    ]
    extra = [k for k in ("lambda", "resample_rate") if any(k in h for h in history)]
    fig, axes = plt.subplots(1, len(keys) + len(extra), figsize=(3.2 * (len(keys) + len(extra)), 2.8))
    for ax, (k, label) in zip(axes, keys + [(k, k) for k in extra]):
        ax.plot(steps, [h.get(k, float("nan")) for h in history])
        ax.set_title(label)
        ax.set_xlabel("PPO step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_align(cfg: AlignConfig, out: str | Path | None = None, log=print) -> dict[str, Any]:
    """The whole `mmfusion align` run; returns results.json's content."""
    out = Path(out or cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    prep = prepare(cfg, log)
    with (out / "metrics.jsonl").open("w") as f:

        def log_step(m: dict[str, float]) -> None:
            f.write(json.dumps(m) + "\n")
            f.flush()
            shown = {
                k: round(v, 3) for k, v in m.items() if k in ("reward", "cost", "kl", "harmful", "lambda")
            }
            log(f"step {int(m['step'])}: {shown}")

        policy, history, after = run_ppo(prep, cfg.ppo, log_step)
    model_dir = out / "model"
    policy.decoder.save_pretrained(model_dir / "decoder")
    save_file(
        {k: v.contiguous() for k, v in policy.value_head.state_dict().items()},
        str(model_dir / "value_head.safetensors"),
    )
    prep.vocab.save(model_dir / "vocab.json")
    save_scorer(prep.reward_model, prep.vocab, out / "reward_model", "reward")
    save_scorer(prep.cost_model, prep.vocab, out / "cost_model", "cost")
    if history:
        plot_history(history, out / "ppo.png", f"PPO ({cfg.ppo.mechanism}), seed {cfg.seed}")
    results = {
        "mechanism": cfg.ppo.mechanism,
        "seed": cfg.seed,
        "world": asdict(prep.world) if prep.world is not None else None,
        "judge": "exact (the alignment world)" if prep.world is not None else USER_JUDGE,
        "before": prep.before,
        "after": after,
        "dropped_prompts": history[-1]["dropped_total"] if history else 0.0,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"after: {after}")
    return results


__all__ = [
    "AlignConfig",
    "Prepared",
    "evaluate",
    "evaluate_user",
    "load_align_config",
    "prepare",
    "run_align",
    "run_ppo",
    "train_sft",
]
