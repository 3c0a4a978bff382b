"""Adversarial attacks the project generates against its own models (requirement Z2's test inputs).

- `pgd_images`: L-infinity projected gradient descent (Madry et al. 2018) on images in [0, 1] against any
  differentiable loss, e.g. the cross-entropy of an image's similarities to candidate captions with its true
  caption as the label (untargeted: the loss is maximised).
- `char_attack`: greedy black-box character edits (DeepWordBug-style substitution / deletion / insertion inside
  words), at most k edits, so the attacked text is within Levenshtein distance k of the original.
- `synonym_attack`: greedy word substitutions from a synonym table (the synthetic world's vocabulary by
  default, `SYNONYMS`): the meaning stays the same for a reader, the words are ones the model never saw.

Both text attacks take `score(texts) -> (N,) tensor` (lower = better for the attacker, e.g. the similarity to
the true answer) and `success(texts) -> (N,) bool`, and stop at the first success.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# The synthetic world's words -> words with the same meaning it never uses (mmfusion.data.synthetic.scene).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("ring", "disc", "round"),
    "square": ("box", "block", "quadrate"),
    "triangle": ("trigon", "wedge"),
    "diamond": ("rhombus", "lozenge"),
    "cross": ("plus", "x"),
    "red": ("crimson", "scarlet"),
    "green": ("emerald", "lime"),
    "blue": ("azure", "navy"),
    "yellow": ("golden", "lemon"),
    "purple": ("violet", "magenta"),
    "orange": ("amber", "tangerine"),
    "white": ("snowy", "ivory"),
    "cyan": ("aqua", "turquoise"),
    "small": ("little", "tiny"),
    "large": ("big", "huge"),
    "left": ("west",),
    "right": ("east",),
}
ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def pgd_images(
    x: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    eps: float,
    steps: int,
    alpha: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L-inf PGD: maximise `loss_fn(x_adv)` (a per-sample (N,) loss, or a scalar) over ||x_adv - x||_inf <= eps,
    x_adv in [0, 1]. x: (N, 3, H, W) in [0, 1]; alpha: step size (default 2.5 * eps / steps). Returns x_adv."""
    if eps < 0 or steps < 0:
        raise ValueError(f"pgd_images: eps and steps must be >= 0 (got {eps}, {steps})")
    alpha = 2.5 * eps / max(steps, 1) if alpha is None else alpha
    x = x.detach()
    delta = torch.zeros_like(x)
    if random_start and eps > 0:
        delta = (torch.rand(x.shape, generator=generator) * 2 - 1).to(x) * eps
    adv = (x + delta).clamp(0.0, 1.0)
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = loss_fn(adv).sum()
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = adv + alpha * grad.sign()
            adv = (x + (adv - x).clamp(-eps, eps)).clamp(0.0, 1.0)
    return adv.detach()


def retrieval_loss(
    embed: Callable[[torch.Tensor], torch.Tensor],
    candidates: torch.Tensor,
    labels: torch.Tensor,
    scale: float,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The loss PGD maximises against a two-tower model: per image, the cross-entropy of scale * cos(image,
    candidates) (candidates (K, D) L2-normalised) with its true candidate index `labels` (N,) as the target."""

    def loss(x: torch.Tensor) -> torch.Tensor:
        logits = scale * embed(x) @ candidates.t()  # (N, K)
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")

    return loss


@dataclass
class TextAttackResult:
    """The attacked text, the number of edits made and whether `success` held at the end."""

    text: str
    edits: int
    success: bool


def _char_edits(text: str) -> list[str]:
    """Every text one character edit away inside a word: delete a letter, substitute or insert a letter."""
    out: list[str] = []
    for i, c in enumerate(text):
        if not c.isalpha():
            continue
        out.append(text[:i] + text[i + 1 :])
        out += [text[:i] + a + text[i + 1 :] for a in ALPHABET if a != c]
        out += [text[:i] + a + text[i:] for a in ALPHABET]
    return list(dict.fromkeys(out))  # unique, in order


def _synonym_edits(text: str, synonyms: dict[str, tuple[str, ...]]) -> list[str]:
    words = text.split(" ")
    out: list[str] = []
    for i, w in enumerate(words):
        for s in synonyms.get(w, ()):
            out.append(" ".join(words[:i] + [s] + words[i + 1 :]))
    return out


def _greedy(
    text: str,
    neighbours: Callable[[str], list[str]],
    score: Callable[[list[str]], torch.Tensor],
    success: Callable[[list[str]], torch.Tensor],
    k: int,
    max_candidates: int | None,
    generator: torch.Generator | None,
) -> TextAttackResult:
    if bool(success([text])[0]):
        return TextAttackResult(text, 0, True)
    for edit in range(1, k + 1):
        cands = neighbours(text)
        if not cands:
            return TextAttackResult(text, edit - 1, False)
        if max_candidates is not None and len(cands) > max_candidates:
            pick = torch.randperm(len(cands), generator=generator)[:max_candidates]
            cands = [cands[int(i)] for i in pick]
        text = cands[int(score(cands).argmin())]
        if bool(success([text])[0]):
            return TextAttackResult(text, edit, True)
    return TextAttackResult(text, k, False)


def char_attack(
    text: str,
    score: Callable[[list[str]], torch.Tensor],
    success: Callable[[list[str]], torch.Tensor],
    k: int = 2,
    max_candidates: int | None = 256,
    generator: torch.Generator | None = None,
) -> TextAttackResult:
    """Greedy character attack: up to k rounds, each taking the single-character edit (of at most
    `max_candidates` sampled ones) with the lowest `score`; stops when `success` holds."""
    return _greedy(text, _char_edits, score, success, k, max_candidates, generator)


def synonym_attack(
    text: str,
    score: Callable[[list[str]], torch.Tensor],
    success: Callable[[list[str]], torch.Tensor],
    k: int = 2,
    synonyms: dict[str, tuple[str, ...]] | None = None,
) -> TextAttackResult:
    """Greedy synonym attack: up to k word substitutions from `synonyms` (default SYNONYMS), each the one with
    the lowest `score`; a substituted word is never substituted again (its synonyms are not in the table)."""
    table = SYNONYMS if synonyms is None else synonyms
    return _greedy(text, lambda t: _synonym_edits(t, table), score, success, k, None, None)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions) between two strings."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]
