"""Knowledge distillation (T5): a frozen teacher's soft targets and features train a student.

    loss = mean over rows of [ w_ce * CE(student, label) + w_kd * T^2 * KL(p_teacher^T || p_student^T) ]
           + beta * feature_loss(projection(student feature), teacher feature) + the student's fusion aux_loss

with p^T = softmax(logits / T) (Hinton et al. 2015, arXiv:1503.02531) and feature matching through a
trainable Linear projection (FitNets, Romero et al. 2015, arXiv:1412.6550). Labelled rows weigh
w_ce = 1 - alpha, w_kd = alpha; rows labelled UNLABELLED (-1) have no CE and weigh w_kd = 1, so a batch may
mix a few labelled samples with many unlabelled ones (the teacher labels those). Rows where none of the
teacher's modalities is present (batch.mask) get no KD or feature term and w_ce = 1.

Cross-modal distillation (seeds 001, 004): teacher and student are any two models that read different
modalities of the same Batch, e.g. an image teacher and an audio student on paired scenes (`mmfusion.data.tasks.paired_samples`):
each model encodes only its own modalities, so the batch simply carries both.

`DistillationModel` is an ordinary model for the Trainer (forward(batch) -> ModelOutput). The teacher is
held outside the module tree: it is not in `parameters()` (so not in the optimizer), not in `state_dict()`
(so not in checkpoints), stays in eval mode and runs under no_grad; `.to()` still moves it. Checkpoints hold
the student and the projection (exact resume); `save_pretrained` writes the student alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import Batch
from ..errors import ConfigError, DataError
from .config import DistillConfig  # noqa: F401 - defined in config.py (train.distill), re-exported

if TYPE_CHECKING:  # imported in forward: config.py can import DistillConfig without a models <-> config cycle
    from ..models.contrastive import ModelOutput

UNLABELLED = -1  # data["label"] of a row without a label (distilled from the teacher only)


# ---- losses -------------------------------------------------------------------------------------------------
def class_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, C) classification logits unchanged; (B,) match logits z -> (B, 2) [0, z], whose softmax is
    [1 - sigmoid(z), sigmoid(z)], so one KD formula serves both heads."""
    if logits.ndim == 1:
        return torch.stack([torch.zeros_like(logits), logits], dim=-1)
    return logits


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row T^2 * KL(softmax(t / T) || softmax(s / T)) = T^2 * sum_c p_t (log p_t - log p_s): (B, C) -> (B,).

    Ref: Hinton, Vinyals & Dean 2015 (the T^2 keeps gradient magnitudes comparable across temperatures)."""
    log_p_s = F.log_softmax(class_logits(student_logits).float() / temperature, dim=-1)
    log_p_t = F.log_softmax(class_logits(teacher_logits).float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(dim=-1)
    return temperature**2 * kl


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Per-row feature distance, (B, D) x (B, D) -> (B,): "mse" = mean_d (s - t)^2, "cosine" = 1 - cos(s, t).

    `student` is already projected to the teacher's width (FitNets' regressor)."""
    if student.shape != teacher.shape:
        raise ConfigError(
            f"feature shapes differ: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    s, t = student.float(), teacher.float()
    if kind == "mse":
        return (s - t).pow(2).mean(dim=-1)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1)
    raise ConfigError(f"feature_loss {kind!r}: allowed: mse, cosine")


# ---- the wrapper -------------------------------------------------------------------------------------------
def _head_of(model: nn.Module) -> tuple[str, int]:
    config = getattr(model, "config", None)
    head, n = getattr(config, "head", None), getattr(config, "n_classes", None)
    if head is None or not hasattr(model, "logits"):
        raise ConfigError(
            f"{type(model).__name__} cannot be distilled: it needs `logits(batch) -> (logits, fusion output)` "
            "and `config.head` (a MultiModalModel has both)"
        )
    return head, (n if head == "classify" else 2)


class DistillationModel(nn.Module):
    """Student trained on labels and on a frozen teacher's soft targets (+ optional feature matching).

    student, teacher: MultiModalModels (or modules with `logits(batch) -> (logits, FusionOutput)` and a
    `config` with `head`, `n_classes`, `dim`) with the same head and number of classes; they may read
    different modalities of the batch. Batch: the modalities of both, data["label"] (B,) int64 with
    UNLABELLED (-1) for rows without a label. Metrics: ce, kd, feat (unweighted means), accuracy
    (labelled rows), labelled (fraction of labelled rows).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        alpha: float = 0.5,
        temperature: float = 4.0,
        beta: float = 0.0,
        feature_loss: str = "mse",
    ):
        super().__init__()
        s_head, t_head = _head_of(student), _head_of(teacher)
        if s_head != t_head:
            raise ConfigError(
                f"teacher head {t_head[0]!r} with {t_head[1]} classes does not match the student's "
                f"{s_head[0]!r} with {s_head[1]} classes"
            )
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"distill alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ConfigError(f"distill temperature must be > 0, got {temperature}")
        if beta < 0:
            raise ConfigError(f"distill beta must be >= 0, got {beta}")
        if feature_loss not in ("mse", "cosine"):
            raise ConfigError(f"distill feature_loss {feature_loss!r}: allowed: mse, cosine")
        s_tok, t_tok = getattr(student, "tokenizer", None), getattr(teacher, "tokenizer", None)
        if (
            s_tok is not None
            and t_tok is not None
            and s_tok.tokenizer.get_vocab() != t_tok.tokenizer.get_vocab()
        ):
            raise ConfigError(
                "teacher and student have different tokenizers: the batch's text ids would mean different "
                "tokens to the teacher; collate with the teacher's tokenizer and give the student the same one"
            )
        self.student = student
        self.head = s_head[0]
        self.alpha, self.temperature, self.beta, self.feature_kind = alpha, temperature, beta, feature_loss
        # FitNets' regressor: student width -> teacher width; training-only, dropped by save_pretrained
        self.projection = nn.Linear(student.config.dim, teacher.config.dim) if beta > 0 else None
        teacher.requires_grad_(False)
        teacher.eval()
        object.__setattr__(self, "teacher", teacher)  # not a submodule: no parameters, no state_dict entries

    @classmethod
    def from_config(cls, student: nn.Module, cfg: DistillConfig, teacher: nn.Module) -> DistillationModel:
        """The wrapper a DistillConfig describes (cfg.teacher is not read: the teacher is passed in)."""
        return cls(student, teacher, cfg.alpha, cfg.temperature, cfg.beta, cfg.feature_loss)

    def _apply(self, fn, recurse: bool = True):  # .to() / .cuda() / .float() move the teacher too
        super()._apply(fn, recurse)
        self.teacher._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> DistillationModel:
        super().train(mode)
        self.teacher.eval()  # the teacher never trains (no dropout, no modality dropout)
        return self

    def _teacher_sees(self, batch: Batch, n: int, device: torch.device) -> torch.Tensor:
        """(B,) bool: rows where at least one of the teacher's modalities is present (its targets mean something)."""
        keys = list(getattr(self.teacher, "modalities", []))
        masks = [batch.mask[k] for k in keys if k in batch.mask]
        if not masks or len(masks) < len(keys):  # a modality without a mask is present in every row
            return torch.ones(n, dtype=torch.bool, device=device)
        return torch.stack(masks, dim=1).any(dim=1).to(device)

    def forward(self, batch: Batch) -> ModelOutput:
        """Loss and metrics of one batch; see the module docstring for the formula."""
        from ..models.contrastive import ModelOutput

        logits, fused = self.student.logits(batch)
        with torch.no_grad():
            t_logits, t_fused = self.teacher.logits(batch)
        labels = batch.data["label"].to(logits.device).long()
        n_cls = 2 if self.head == "match" else logits.shape[-1]
        if bool(((labels < UNLABELLED) | (labels >= n_cls)).any()):
            bad = labels[(labels < UNLABELLED) | (labels >= n_cls)][0].item()
            raise DataError(f"data['label'] has {bad}: expected 0..{n_cls - 1} or UNLABELLED ({UNLABELLED})")
        lab = (labels != UNLABELLED).float()
        seen = self._teacher_sees(batch, len(labels), logits.device).float()
        safe = labels.clamp(min=0)
        if self.head == "match":
            ce = F.binary_cross_entropy_with_logits(logits.float(), safe.float(), reduction="none")
            pred = (logits > 0).long()
        else:
            ce = F.cross_entropy(logits.float(), safe, reduction="none")
            pred = logits.argmax(dim=-1)
        kd = kd_loss(logits, t_logits, self.temperature)  # (B,)
        # labelled rows: (1 - alpha) CE + alpha KD; unlabelled: KD only; rows the teacher cannot see: CE only
        w_kd = seen * (self.alpha * lab + (1.0 - lab))
        w_ce = lab * (1.0 - self.alpha * seen)
        loss = (w_ce * ce + w_kd * kd).mean() + fused.aux_loss.float()
        n_lab, n_seen = lab.sum().clamp(min=1), seen.sum().clamp(min=1)
        metrics: dict[str, Any] = {
            "ce": ((ce * lab).sum() / n_lab).detach(),
            "kd": ((kd * seen).sum() / n_seen).detach(),
            "labelled": lab.mean().detach(),
            "accuracy": (((pred == safe).float() * lab).sum() / n_lab).detach(),
        }
        if self.projection is not None:
            dist = feature_loss(self.projection(fused.pooled), t_fused.pooled, self.feature_kind)
            feat = (dist * seen).sum() / n_seen
            loss = loss + self.beta * feat
            metrics["feat"] = feat.detach()
        else:
            metrics["feat"] = torch.zeros(())
        routing = getattr(self.student, "routing_stats", lambda f: {})(fused)
        return ModelOutput(loss, metrics, logits.detach(), {f"student.{k}": v for k, v in routing.items()})

    def predict(self, batch: Batch) -> torch.Tensor:
        """The student's predictions (B,)."""
        return self.student.predict(batch)

    def precision_report(self) -> dict[str, str]:
        """The student's (the Trainer logs it, T6); the teacher runs under the same autocast policy."""
        report = getattr(self.student, "precision_report", None)
        return report() if report is not None else {}

    def modality_parameters(self) -> dict[str, list[str]]:
        """The student's modality -> parameter-name prefixes, under this wrapper's "student." prefix."""
        prefixes = getattr(self.student, "modality_parameters", None)
        if prefixes is None:
            raise ConfigError(f"the student {type(self.student).__name__} has no modality_parameters()")
        return {k: [f"student.{p}" for p in v] for k, v in prefixes().items()}

    def save_pretrained(self, directory):
        """The student alone (the teacher and the projection are training-time only)."""
        return self.student.save_pretrained(directory)


def load_teacher(directory: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """A saved MultiModalModel (save_pretrained folder), frozen and in eval mode."""
    from ..models.multimodal import MultiModalModel

    teacher = MultiModalModel.from_pretrained(directory, map_location)
    return teacher.requires_grad_(False).eval()


def wrap_for_distillation(
    student: nn.Module, cfg: DistillConfig | None, teacher: nn.Module | None = None
) -> nn.Module:
    """`student` unchanged when cfg is None, else DistillationModel(student, teacher or cfg.teacher's model)."""
    if cfg is None:
        return student
    return DistillationModel.from_config(
        student, cfg, teacher if teacher is not None else load_teacher(cfg.teacher)
    )


# ---- data -------------------------------------------------------------------------------------------------
def distillation_collate(student, teacher, fields=None, target=None):
    """The Collate of a distillation run: the student's and the teacher's inputs (each encodes its own), the
    student's target, with UNLABELLED rows passed through."""
    from dataclasses import replace

    from ..data.collate import Collate

    inner = student.collate(fields, target)
    inputs = {**teacher.inputs(fields), **inner.inputs}
    return Collate(inputs, inner.tokenizer or teacher.tokenizer, replace(inner.target, unlabelled=UNLABELLED))


def drop_labels(samples: Sequence[dict[str, Any]], n_labelled: int | None) -> list[dict[str, Any]]:
    """Copies of `samples` keeping the labels of the first `n_labelled` only (the rest UNLABELLED); None keeps all."""
    if n_labelled is None:
        return list(samples)
    if n_labelled > len(samples):
        raise ConfigError(
            f"distill.n_labelled = {n_labelled} but there are only {len(samples)} training samples"
        )
    return [s if i < n_labelled else {**s, "label": UNLABELLED} for i, s in enumerate(samples)]


def accuracy(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Fraction of labelled rows the model's predict() gets right (eval mode, restored afterwards)."""
    was = model.training
    model.eval()
    correct = total = 0
    try:
        for b in batches:
            labels = b.data["label"]
            keep = labels != UNLABELLED
            pred = model.predict(b).cpu()
            correct += int((pred[keep] == labels[keep]).sum())
            total += int(keep.sum())
    finally:
        model.train(was)
    return correct / max(total, 1)


__all__ = [
    "UNLABELLED",
    "DistillConfig",
    "DistillationModel",
    "accuracy",
    "class_logits",
    "distillation_collate",
    "drop_labels",
    "feature_loss",
    "kd_loss",
    "load_teacher",
    "wrap_for_distillation",
]
