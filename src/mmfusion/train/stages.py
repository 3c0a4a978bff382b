"""Multi-stage runs (T3) and the CL-FT probe (T2).

A run with `train.stages` goes through its stages in order. Each stage freezes the parameters whose
`named_parameters()` names match its `freeze` patterns (fnmatch), builds a fresh AdamW + warm-up/cosine
schedule over the rest (with per-pattern learning rates from `lr_groups`), and trains for its `steps`
on its own data (`n_train` subset, `batch_size`) in its own precision. Checkpoints are named by the
run's global step and record the stage (index, name, step within the stage); `resume` continues inside
the right stage at the right step, bitwise identical to an uninterrupted run.

`ContrastiveProbe` is the two-tower model with a classification head on its image embedding: the
`contrastive` objective is the usual InfoNCE, the `probe` objective cross-entropy on a label read
from the synthetic scene (colour / shape / size of the leftmost object, or the object count).
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..batch import Batch
from ..errors import CheckpointError, ConfigError, DataError
from ..models.contrastive import ContrastiveModel, ModelOutput
from ..models.contrastive_config import ModelConfig, ProbeConfig
from ..models.persistence import read_config, save_folder
from .checkpoint import require_latest
from .config import StageConfig, TrainConfig
from .rng import set_rng_state
from .trainer import StageInfo, TrainData, Trainer

PROBE_FILE = "probe.safetensors"


# ---- the probe ---------------------------------------------------------------------------------------------
def probe_classes(label: str) -> list[str]:
    """The class names of a probe label, in index order."""
    from ..data.synthetic import COLOURS, NUMBER_WORDS, SHAPES, SIZES

    return list({"colour": COLOURS, "shape": SHAPES, "size": SIZES, "count": NUMBER_WORDS}[label])


def probe_label(scene: dict[str, Any] | None, label: str) -> int:
    """Class index of `label` for a scene record: an attribute of the leftmost object, or the object count."""
    if not scene or not scene.get("objects"):
        raise DataError(f"a sample has no scene record: the probe label {label!r} is read from it")
    objects = scene["objects"]
    if label == "count":
        return len(objects) - 1
    leftmost = min(objects, key=lambda o: o["x"])
    return probe_classes(label).index(leftmost[label])


def probe_target(label: str):
    """The Collate target of a probe stage: the class of `label` read from each sample's scene record."""
    from ..data.collate import Target

    return Target(
        "scene", tuple(probe_classes(label)), extract=functools.partial(_scene_attribute, label=label)
    )


def _scene_attribute(scene: dict[str, Any] | None, label: str) -> str:
    return probe_classes(label)[probe_label(scene, label)]


class ContrastiveProbe(ContrastiveModel):
    """ContrastiveModel + `head`: a linear (or one-hidden-layer MLP) classifier on the image embedding.

    `objective` picks the loss of forward(): "contrastive" (the two-tower loss) or "probe" (cross-entropy
    of head(image embedding) against batch["label"]). The head reads the L2-normalised embedding times
    sqrt(embed_dim), so its inputs have unit scale whatever the width. save_pretrained writes an ordinary
    contrastive model folder (loadable by ContrastiveModel.from_pretrained) plus probe.safetensors.
    """

    def __init__(self, config: ModelConfig, tokenizer):
        if config.probe is None:
            raise ConfigError("model.probe is not set: ContrastiveProbe needs a probe label")
        super().__init__(config, tokenizer)
        probe: ProbeConfig = config.probe
        self.classes = probe_classes(probe.label)
        d, n = config.embed_dim, len(self.classes)
        self.head = (
            nn.Linear(d, n)
            if probe.hidden == 0
            else nn.Sequential(nn.Linear(d, probe.hidden), nn.GELU(), nn.Linear(probe.hidden, n))
        )
        self.objective = "contrastive"

    def probe_logits(self, images: torch.Tensor) -> torch.Tensor:
        emb = self.embed_image_tensor(images) * math.sqrt(self.config.embed_dim)
        return self.head(emb)

    def forward(self, batch: Batch) -> ModelOutput:
        if self.objective != "probe":
            return super().forward(batch)
        logits = self.probe_logits(batch["image"]).float()
        labels = batch["label"].to(logits.device)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.detach().argmax(dim=1) == labels).float().mean()
        return ModelOutput(loss, {"probe_acc": acc})

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> predicted class indices (B,)."""
        was = self.training
        self.eval()
        out = [
            self.probe_logits(images[s : s + batch_size]).argmax(dim=1).cpu()
            for s in range(0, images.shape[0], batch_size)
        ]
        self.train(was)
        return torch.cat(out)

    def save_pretrained(self, directory: str | Path) -> Path:
        """The contrastive model folder (without the head) + probe.safetensors (the head)."""
        state = self.state_dict()
        backbone = {k: v for k, v in state.items() if not k.startswith("head.")}
        head = {k: v.detach().contiguous().cpu() for k, v in state.items() if k.startswith("head.")}
        shim = SimpleNamespace(state_dict=lambda: backbone)
        directory = save_folder(
            shim, directory, "contrastive", self.config.model_dump(mode="json"), self.tokenizer
        )
        save_file(head, str(Path(directory) / PROBE_FILE), metadata={"format": "pt"})
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device = "cpu"
    ) -> ContrastiveProbe:
        from ..modalities.clip_tokenizer import load_text_tokenizer

        config = ModelConfig.model_validate(read_config(directory, "contrastive"))
        probe_path = Path(directory) / PROBE_FILE
        if config.probe is None or not probe_path.is_file():
            raise CheckpointError(f"{directory} holds no probe (model.probe and {PROBE_FILE})")
        t = config.text
        model = cls(config, load_text_tokenizer(directory, t.context_length, t.arch, t.vocab_size))
        weights = load_file(str(Path(directory) / "model.safetensors"), device=str(map_location))
        weights.update(load_file(str(probe_path), device=str(map_location)))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{directory}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
            )
        return model.to(map_location).eval()


def has_probe(directory: str | Path) -> bool:
    return (Path(directory) / PROBE_FILE).is_file()


@torch.no_grad()
def probe_accuracy(
    model: ContrastiveProbe, dataset: Sequence[dict[str, Any]], batch_size: int = 256
) -> float:
    """Accuracy of the probe on `dataset` (samples with "image" and "scene")."""
    from ..modalities.image import preprocess_image

    label = model.config.probe.label
    correct = total = 0
    for s in range(0, len(dataset), batch_size):
        chunk = [dataset[i] for i in range(s, min(s + batch_size, len(dataset)))]
        images = torch.stack([preprocess_image(x["image"], model.image_size) for x in chunk])
        labels = torch.tensor([probe_label(x.get("scene"), label) for x in chunk])
        correct += int((model.predict(images.to(model.device)) == labels).sum())
        total += len(chunk)
    return correct / max(total, 1)


# ---- freezing and parameter groups -----------------------------------------------------------------------
def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _name_hint(names: Sequence[str]) -> str:
    tops = sorted({n.split(".")[0] for n in names})
    return f"top-level names: {', '.join(t + ('.*' if any('.' in n for n in names if n.startswith(t + '.')) else '') for t in tops)}"


def check_patterns(model: nn.Module, stages: Sequence[StageConfig]) -> None:
    """Every freeze / lr_groups pattern of every stage must match a parameter (lr_groups: a trainable
    one); raise ConfigError naming the stage key and the pattern otherwise. Runs before any training."""
    names = [n for n, _ in model.named_parameters()]
    for i, stage in enumerate(stages):
        for pattern in stage.freeze:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ConfigError(
                    f"train.stages.{i}.freeze: pattern {pattern!r} (stage {stage.name!r}) matches no "
                    f"parameter; {_name_hint(names)}"
                )
        trainable = [n for n in names if not _matches(n, stage.freeze)]
        if not trainable:
            raise ConfigError(f"train.stages.{i}.freeze (stage {stage.name!r}) freezes every parameter")
        for pattern in stage.lr_groups:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in trainable):
                raise ConfigError(
                    f"train.stages.{i}.lr_groups: pattern {pattern!r} (stage {stage.name!r}) matches no "
                    f"trainable parameter; {_name_hint(trainable)}"
                )


def apply_freeze(model: nn.Module, patterns: Sequence[str]) -> tuple[int, int]:
    """requires_grad = False for parameters matching any pattern, True for the others -> (trainable, total)."""
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(not _matches(name, patterns))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def stage_param_groups(model: nn.Module, stage: StageConfig, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters: (first matching lr_groups pattern or the stage lr) x
    (decay: matrices; no decay: biases, norms, embeddings, scalars) as in trainer.param_groups."""
    groups: dict[tuple[str | None, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        pattern = next((pat for pat in stage.lr_groups if fnmatch.fnmatchcase(name, pat)), None)
        decay = p.ndim >= 2 and "embedding" not in name
        groups.setdefault((pattern, decay), []).append(p)
    out = []
    for (pattern, decay), params in groups.items():
        g: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if pattern is not None:
            g["lr"] = stage.lr_groups[pattern]
        out.append(g)
    return out


def set_objective(model: nn.Module, objective: str | None) -> None:
    if hasattr(model, "objective"):
        model.objective = objective or "contrastive"
    elif objective not in (None, "contrastive"):
        raise ConfigError(f"objective {objective!r}: the model has no probe (set model.probe)")


# ---- the stage loop ------------------------------------------------------------------------------------------
def stage_train_config(train: TrainConfig, stage: StageConfig) -> TrainConfig:
    return train.model_copy(update={**stage.train_overrides(), "stages": None})


def _read_state(ckpt) -> dict[str, Any]:
    return json.loads((ckpt.path / "state.json").read_text())


def fit_stages(
    model: nn.Module,
    train: TrainConfig,
    run_dir: str | Path,
    make_data: Callable[[int, StageConfig], TrainData],
    resume: bool = False,
    log: Callable[[str], None] = print,
    on_eval_for: Callable[[int, StageConfig], Callable | None] | None = None,
    is_main: bool = True,
) -> dict[str, float]:
    """Train `model` through `train.stages`; returns the last logged metrics of the last stage run.

    make_data(index, stage) builds the stage's TrainData; on_eval_for(index, stage) its eval hook.
    """
    stages = train.stages or []
    say = log if is_main else (lambda m: None)
    check_patterns(model, stages)
    run_dir = Path(run_dir)
    start, ckpt, skipped = 0, None, Counter()
    if resume:
        ckpt = require_latest(run_dir / "checkpoints", say)
        state = _read_state(ckpt)
        info = state.get("stage")
        if info is None:
            raise CheckpointError(
                f"{ckpt.path} records no stage: it was written by a run without train.stages"
            )
        idx = info["index"]
        if idx >= len(stages) or stages[idx].name != info["name"]:
            raise CheckpointError(
                f"{ckpt.path} is from stage {idx} {info['name']!r}, which this config does not have at "
                f"that position (stages: {', '.join(s.name for s in stages)})"
            )
        start = idx
        if info["step"] >= stages[idx].steps:  # that stage was complete: the next one starts afresh
            model_state, _, _ = ckpt.load()
            model.load_state_dict(model_state)
            set_rng_state(state["rng"])
            skipped = Counter(state.get("skipped", {}))
            say(f"resumed from {ckpt.path} (step {ckpt.step}, end of stage {idx + 1} {info['name']!r})")
            start, ckpt = idx + 1, None
    offset = sum(s.steps for s in stages[:start])
    last: dict[str, float] = {}
    for i in range(start, len(stages)):
        stage = stages[i]
        cfg = stage_train_config(train, stage)
        set_objective(model, stage.objective)
        trainable, total = apply_freeze(model, stage.freeze)
        data = make_data(i, stage)
        n_samples = (
            len(data.dataset) if hasattr(data, "dataset") and hasattr(data.dataset, "__len__") else "?"
        )
        objective = getattr(model, "objective", None) or "the model's loss"
        lrs = f"lr {cfg.lr:g}" + "".join(f", {p}: {lr:g}" for p, lr in stage.lr_groups.items())
        say(
            f"stage {i + 1}/{len(stages)} {stage.name!r} (objective {objective}): "
            f"steps {offset + 1}-{offset + stage.steps}, batch {cfg.batch_size} from {n_samples} samples, "
            f"{lrs}; trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"
            + (f"; frozen: {', '.join(stage.freeze)}" if stage.freeze else "")
        )
        trainer = Trainer(
            model,
            data,
            cfg,
            run_dir,
            log=log,
            on_eval=on_eval_for(i, stage) if on_eval_for else None,
            stage=StageInfo(i, stage.name, offset, len(stages)),
            groups=stage_param_groups(model, stage, cfg.weight_decay),
        )
        trainer.skipped = Counter(skipped)
        last = trainer.fit(resume=ckpt is not None, ckpt=ckpt)
        skipped = Counter(trainer.skipped)
        ckpt = None
        offset += stage.steps
    if hasattr(model, "objective"):
        model.objective = "contrastive"
    for p in model.parameters():
        p.requires_grad_(True)
    return last
