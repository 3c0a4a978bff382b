"""SyntheticJudge: a small CNN trained on the synthetic world that judges generated images (E2).

It predicts the (shape, colour, size) of the *left-most* object of an image (for a one-object scene: the
object) and exposes its penultimate activations as the feature space of FID and its joint class logits as
the classifier of the Inception Score. FID/IS computed with it are "FID/IS under our judge": they compare
image sets in this extractor's feature space and are not comparable to Inception-v3 FID/IS numbers.

Images: uint8 (N, H, W, 3) in [0, 255] or float (N, 3, H, W) in [0, 1] (numpy or torch), resized to the
judge's `image_size` with antialiased bilinear filtering. A float batch outside [0, 1] is refused, because
a [-1, 1] tensor passed by mistake would silently give plausible-looking but wrong judgements.

`python -m mmfusion.eval.judge_cli --help`: train one, print its held-out accuracy and reference FID/IS values.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.synthetic import COLOURS, SHAPES, SIZES, Obj, Scene, SyntheticWorld
from ..errors import CheckpointError, DataError

JUDGE_KIND = "synthetic_judge"
WEIGHTS_FILE = "judge.safetensors"
CONFIG_FILE = "judge.json"
ATTRIBUTES = ("shape", "colour", "size")
_VOCAB = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}


@dataclass(frozen=True)
class JudgeConfig:
    """Architecture of the judge; saved beside the weights (judge.json) with the attribute vocabularies."""

    image_size: int = 32
    width: int = 16  # channels of the first conv stage (doubled once)
    feature_dim: int = 64  # D of `features` (the FID feature space)


def as_unit_images(images: Any, size: int | None = None) -> torch.Tensor:
    """uint8 (N, H, W, 3) / float (N, 3, H, W) in [0, 1] / a list of (H, W, 3) uint8 arrays
    -> float (N, 3, size, size) in [0, 1] (antialiased bilinear resize when H, W differ; None keeps them)."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise DataError("got an empty list of images; expected at least one (H, W, 3) uint8 image")
        images = np.stack([np.asarray(im) for im in images])
    t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[0] == 0:
        raise DataError(
            f"image batch has shape {tuple(t.shape)}; expected uint8 (N, H, W, 3) or float (N, 3, H, W), N >= 1"
        )
    if t.dtype == torch.uint8:
        if t.shape[-1] != 3:
            raise DataError(f"uint8 image batch has shape {tuple(t.shape)}; expected (N, H, W, 3)")
        t = t.permute(0, 3, 1, 2).float().div(255.0)
    elif t.is_floating_point():
        if t.shape[1] != 3:
            raise DataError(f"float image batch has shape {tuple(t.shape)}; expected (N, 3, H, W) in [0, 1]")
        t = t.float()
        if not torch.isfinite(t).all():
            raise DataError("float image batch contains NaN or infinite values")
        lo, hi = float(t.min()), float(t.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise DataError(
                f"float images must lie in [0, 1]; got values in [{lo:.3f}, {hi:.3f}] "
                "(convert a [-1, 1] tensor with (x + 1) / 2, or pass uint8 (N, H, W, 3))"
            )
        t = t.clamp(0, 1)
    else:
        raise DataError(f"image batch has dtype {t.dtype}; expected uint8 in [0, 255] or float in [0, 1]")
    if size is not None and t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return t


def target_object(scene: Scene | dict[str, Any]) -> Obj:
    """The object the judge describes: the left-most one (smallest x), i.e. the one a left-to-right
    caption mentions first; for a one-object scene, that object. Accepts a Scene or its to_dict() record."""
    if isinstance(scene, dict):
        scene = Scene.from_dict(scene)
    if not isinstance(scene, Scene) or not scene.objects:
        raise DataError(f"expected a Scene (or its dict record) with at least one object, got {scene!r}")
    return scene.left_to_right()[0]


def scene_labels(scenes: Sequence[Scene | dict[str, Any]]) -> torch.Tensor:
    """(N, 3) long: (shape, colour, size) class indices of each scene's target_object."""
    rows = []
    for s in scenes:
        o = target_object(s)
        rows.append((SHAPES.index(o.shape), COLOURS.index(o.colour), SIZES.index(o.size)))
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 3)


class _LeftmostPool(nn.Module):
    """Attention pooling (N, C, h, w) -> (N, C) over positions, logits = learned content score + gain *
    object mask + learned per-column bias. The mask term (init gain 4) puts attention on objects from step 0,
    the column bias (init +2 left .. -2 right) on the left-most one."""

    def __init__(self, channels: int, columns: int):
        super().__init__()
        self.score = nn.Conv2d(channels, 1, 1)
        self.mask_gain = nn.Parameter(torch.tensor(4.0))
        self.column_bias = nn.Parameter(torch.linspace(2.0, -2.0, columns))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h (N, C, h, w), mask (N, h, w) in [-1, 1] -> (N, C)."""
        logits = self.score(h)[:, 0] + self.mask_gain * mask + self.column_bias
        attn = logits.flatten(1).softmax(dim=1)  # (N, h * w)
        return (h.flatten(2) * attn[:, None]).sum(dim=2)


def _conv_bn(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SyntheticJudge(nn.Module):
    """Conv net (RGB + silhouette, 4 conv-BN-ReLU, two of stride 2) -> object- and left-biased attention
    pooling -> D features -> shape / colour / size heads.

    features: (N, D) non-negative activations; logits: {"shape": (N, 5), "colour": (N, 8), "size": (N, 2)}.
    """

    def __init__(self, config: JudgeConfig = JudgeConfig()):
        super().__init__()
        if config.image_size < 8 or config.image_size % 4:
            raise DataError(f"judge image_size must be a multiple of 4 and >= 8, got {config.image_size}")
        self.config = config
        w = config.width
        # input: RGB + silhouette (max over RGB: a colour-independent object mask, as objects are bright on
        # the dark background), which lets shape be learned in a few hundred steps
        self.convs = nn.Sequential(
            *_conv_bn(4, w, 1),
            *_conv_bn(w, w, 2),  # (N, w, S/2, S/2)
            *_conv_bn(w, 2 * w, 1),
            *_conv_bn(2 * w, 2 * w, 2),  # (N, 2w, S/4, S/4)
        )
        self.pool = _LeftmostPool(2 * w, config.image_size // 4)  # (N, 2w)
        self.project = nn.Sequential(nn.Linear(2 * w, config.feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({a: nn.Linear(config.feature_dim, len(_VOCAB[a])) for a in ATTRIBUTES})

    @property
    def num_features(self) -> int:
        """D (torchmetrics reads `num_features` from a custom feature extractor)."""
        return self.config.feature_dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x (N, 3, S, S) float in [0, 1] -> (features (N, D), {attribute: logits (N, classes)})."""
        x = torch.cat([x, x.amax(dim=1, keepdim=True)], dim=1) * 2.0 - 1.0  # (N, 4, S, S) in [-1, 1]
        mask = F.avg_pool2d(x[:, 3:], 4)[:, 0]  # (N, S/4, S/4) object coverage
        h = self.project(self.pool(self.convs(x), mask))  # (N, D)
        return h, {a: head(h) for a, head in self.heads.items()}

    @torch.no_grad()
    def _run(self, images: Any, batch_size: int = 512) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = as_unit_images(images, self.config.image_size)
        was = self.training
        self.eval()
        feats, logits = [], {a: [] for a in ATTRIBUTES}
        for s in range(0, x.shape[0], batch_size):
            f, lg = self(x[s : s + batch_size].to(self.device))
            feats.append(f.float().cpu())
            for a in ATTRIBUTES:
                logits[a].append(lg[a].float().cpu())
        self.train(was)
        return torch.cat(feats), {a: torch.cat(v) for a, v in logits.items()}

    def features(self, images: Any) -> torch.Tensor:
        """Images (see module docstring) -> (N, D) float features on the CPU (FID's feature space)."""
        return self._run(images)[0]

    def attribute_logits(self, images: Any) -> dict[str, torch.Tensor]:
        """Images -> {"shape": (N, 5), "colour": (N, 8), "size": (N, 2)} logits of the left-most object."""
        return self._run(images)[1]

    def class_logits(self, images: Any) -> torch.Tensor:
        """Images -> (N, 80) logits over joint (shape, colour, size) classes, index (s * 8 + c) * 2 + z.

        The sum of the three heads' log-probabilities: its softmax is the product of the heads' distributions
        (the Inception Score's p(y|x) under our judge)."""
        return joint_log_probs(self.attribute_logits(images))

    def predict_attributes(self, images: Any) -> list[dict[str, str]]:
        """Images -> [{"shape", "colour", "size"}] of each image's left-most (or single) object."""
        logits = self.attribute_logits(images)
        idx = {a: logits[a].argmax(dim=1).tolist() for a in ATTRIBUTES}
        n = len(idx["shape"])
        return [{a: _VOCAB[a][idx[a][i]] for a in ATTRIBUTES} for i in range(n)]

    # ---- training -------------------------------------------------------------------------------------------
    @classmethod
    def train_on_world(
        cls,
        world: SyntheticWorld,
        steps: int = 600,
        seed: int = 0,
        image_size: int = 32,
        batch_size: int = 64,
        lr: float = 3e-3,
        device: str | torch.device | None = None,
        progress: bool = False,
        blur: float = 2.0,
    ) -> SyntheticJudge:
        """Train on fresh renders of `world`'s train split (never repeats an image): `steps` AdamW steps of
        `batch_size` images, cross-entropy summed over the three heads, constant learning rate then linear decay
        to 0 over the last 20 % of steps.

        `blur` > 0 trains on randomly blurred copies (per image a level uniform in [0, blur], see `soft_blur`)
        so that blurry generated images (VQ decoders) are still judged by content; 0 turns it off.
        Sample indices are seed * 10^7 + step * batch_size + j, so a run is a pure function of its arguments.
        Evaluate on another split with `evaluate` (the splits hold disjoint scenes)."""
        if steps < 1 or batch_size < 1:
            raise DataError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
        dev = torch.device(device) if device is not None else _default_device()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            judge = cls(JudgeConfig(image_size=image_size)).to(dev)
        opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
        # constant, then linear decay over the last 20 %: a cosine decay from step 0 stalls shape learning
        decay = max(1, steps // 5)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (steps - s) / decay))
        bar: Any = range(steps)
        if progress:
            from tqdm import tqdm

            bar = tqdm(bar, desc="train judge", unit="step")
        judge.train()
        base = seed * 10_000_000
        gen = torch.Generator().manual_seed(seed)
        for step in bar:
            samples = [
                world.sample("train", base + step * batch_size + j, ("image",)) for j in range(batch_size)
            ]
            x = as_unit_images(np.stack([s["image"] for s in samples]), image_size)
            if blur > 0:
                x = soft_blur(x, torch.rand(batch_size, generator=gen) * blur)
            x = x.to(dev)
            y = scene_labels([s["scene"] for s in samples]).to(dev)
            _, logits = judge(x)
            loss = sum(F.cross_entropy(logits[a], y[:, i]) for i, a in enumerate(ATTRIBUTES))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        return judge.eval()

    @torch.no_grad()
    def evaluate(self, world: SyntheticWorld, split: str = "test", n: int = 500) -> dict[str, float]:
        """Held-out accuracy on samples 0..n-1 of `split`: per attribute, (shape, colour) jointly, all three."""
        samples = [world.sample(split, i, ("image",)) for i in range(n)]
        preds = self.predict_attributes(np.stack([s["image"] for s in samples]))
        truth = [target_object(s["scene"]) for s in samples]
        hit = {a: np.array([p[a] == getattr(o, a) for p, o in zip(preds, truth)]) for a in ATTRIBUTES}
        return {
            **{a: float(hit[a].mean()) for a in ATTRIBUTES},
            "shape_colour": float((hit["shape"] & hit["colour"]).mean()),
            "all": float((hit["shape"] & hit["colour"] & hit["size"]).mean()),
        }

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write judge.safetensors (weights) and judge.json (config + attribute vocabularies) to `directory`."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        meta = {
            "kind": JUDGE_KIND,
            "config": asdict(self.config),
            "vocab": {a: list(v) for a, v in _VOCAB.items()},
        }
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device = "cpu"
    ) -> SyntheticJudge:
        """Load a judge written by save_pretrained; CheckpointError when files, kind, vocabulary or keys differ."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise CheckpointError(
                    f"{p} not found; expected a folder written by SyntheticJudge.save_pretrained"
                )
        try:
            meta = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
        if not isinstance(meta, dict) or meta.get("kind") != JUDGE_KIND:
            got = meta.get("kind") if isinstance(meta, dict) else type(meta).__name__
            raise CheckpointError(f"{cfg_path}: kind is {got!r}; expected {JUDGE_KIND!r}")
        vocab = {a: list(v) for a, v in _VOCAB.items()}
        if meta.get("vocab") != vocab:
            raise CheckpointError(
                f"{cfg_path}: attribute vocabularies {meta.get('vocab')} differ from this world's {vocab}"
            )
        try:
            config = JudgeConfig(**meta["config"])
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{cfg_path}: bad 'config' {meta.get('config')!r}: {e}") from e
        try:
            weights = load_file(str(w_path), device=str(map_location))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{w_path} cannot be read as safetensors: {e}") from e
        judge = cls(config)
        try:
            judge.load_state_dict(weights, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{w_path} does not match judge config {config}: {e}") from e
        return judge.to(map_location).eval()


def soft_blur(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """x (N, 3, H, W), level (N,) >= 0 -> x blurred per image: level 0 = sharp, 1 = one 3x3 box filter,
    2 = two (about a Gaussian of sigma 1.15), linear in between, capped at 2 (edges: mean of valid pixels)."""

    def box(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, 3, stride=1, padding=1, count_include_pad=False)

    x1 = box(x)
    x2 = box(x1)
    lv = level.clamp(0, 2).to(x.dtype)[:, None, None, None]
    lo, hi = (lv).clamp(max=1), (lv - 1).clamp(min=0)
    return torch.where(lv <= 1, x + lo * (x1 - x), x1 + hi * (x2 - x1))


def joint_log_probs(logits: dict[str, torch.Tensor]) -> torch.Tensor:
    """{"shape": (N, 5), "colour": (N, 8), "size": (N, 2)} -> (N, 80) joint log-probabilities."""
    s, c, z = (F.log_softmax(logits[a].float(), dim=1) for a in ATTRIBUTES)
    return (s[:, :, None, None] + c[:, None, :, None] + z[:, None, None, :]).flatten(1)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


__all__ = [
    "JudgeConfig",
    "SyntheticJudge",
    "as_unit_images",
    "joint_log_probs",
    "soft_blur",
    "scene_labels",
    "target_object",
]
