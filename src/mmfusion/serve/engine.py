"""The model engine of the embedding server: a loaded model, how raw request inputs become its tensors, and one
batched model call per operation (embed, tokens, fuse, classify). No HTTP, no queues: `backend.LocalBackend`
puts the cache and the batchers in front of it.

Inputs are decoded by the modality decoders (`media.py`) and preprocessed by each modality's
`SPEC.preprocess`, with two exceptions that keep a prediction independent of which requests share its batch
(the fusion attends over every token, padding included): text on the fusion paths is padded to the
tokenizer's context length, and audio always to the encoder's `max_frames` (SPEC.preprocess pads text and
audio to the longest of the batch).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..batch import Batch
from ..errors import DataError
from ..modalities import modality as modality_spec
from ..modalities.audio import preprocess_audio
from ..modalities.image import SPEC as IMAGE
from .http import MAX_TEXT_CHARS, MODALITIES, invalid, undecodable
from .media import READERS


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the config and weights (16 hex digits): the model id in cache keys and index files."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "model_dump_json"):
        h.update(config.model_dump_json().encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_text(raw: bytes | str, what: str) -> str:
    """A text input: UTF-8 (400 otherwise), a non-blank string of at most MAX_TEXT_CHARS characters (422)."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise undecodable(f"{what} is not UTF-8 text") from None
    if not isinstance(raw, str):
        raise invalid(f"{what} is {type(raw).__name__}; expected a string")
    if not raw.strip():
        raise invalid(f"{what} is empty")
    if len(raw) > MAX_TEXT_CHARS:
        raise invalid(f"{what} has {len(raw)} characters; at most {MAX_TEXT_CHARS}")
    return raw


class Engine:
    """A loaded model: which modalities it embeds, how raw inputs become tensors, one batched call each.

    ContrastiveModel: text and image, its own projection heads (the training embedding space).
    MultiModalModel: every encoder it has; an embedding is the mean of the encoder's projected tokens
    (the fusion input), L2-normalised; `classify` runs the whole model (fusion + head).
    prune_threshold, prune_means: a router-fusion model with its pruning calibration
    (mmfusion.evaluate.pruning_model) classifies with modality pruning at this gate threshold; each
    prediction then lists its skipped modalities ("pruned").
    """

    def __init__(
        self,
        model: torch.nn.Module,
        model_id: str | None = None,
        prune_threshold: float | None = None,
        prune_means: dict[str, torch.Tensor] | None = None,
    ):
        from ..models.contrastive import ContrastiveModel

        self.model = model.eval()
        self.prune_threshold, self.prune_means = prune_threshold, prune_means
        self.model_id = model_id or model_fingerprint(model)
        self.contrastive = isinstance(model, ContrastiveModel)
        if self.contrastive:
            self.model_type = "contrastive"
            self.keys = {"text": "text", "image": "image"}  # modality -> batch key
            # the contrastive model has no encoder configs: its image size is all preprocessing needs
            self.configs: dict[str, Any] = {"text": None, "image": IMAGE.config(image_size=model.image_size)}
            self.dim = model.config.embed_dim
        else:
            self.model_type = "multimodal"
            encoders = model.config.encoders
            self.keys = {cfg.kind: key for key, cfg in sorted(encoders.items())}
            self.configs = {m: encoders[key] for m, key in self.keys.items()}
            self.dim = model.config.dim
        self.tokenizer = model.tokenizer
        self._token_shapes: dict[str, tuple[int, int]] = {}
        self._placeholders: dict[str, Any] = {}

    @property
    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if m in self.keys]

    @property
    def can_classify(self) -> bool:
        return not self.contrastive

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_type": self.model_type,
            "model_id": self.model_id,
            "modalities": self.modalities,
            "dim": self.dim,
        }
        if self.can_classify:
            out["head"] = self.model.config.head
            out["n_classes"] = self.model.config.n_classes if self.model.config.head == "classify" else 2
        if self.prune_threshold is not None:
            out["prune_threshold"] = self.prune_threshold
        return out

    # ---- raw request payload -> model-ready item ------------------------------------------------------
    def prepare(self, modality: str, raw: bytes | str, what: str) -> Any:
        """Validate, decode and preprocess one input; raises APIError (400 undecodable, 422 invalid)."""
        if modality not in self.keys:
            raise invalid(f"this model has no {modality} encoder; it embeds {', '.join(self.modalities)}")
        if modality == "text":
            return check_text(raw, what)
        value = READERS[modality](raw, what)
        try:
            return self.preprocess(modality, value)
        except DataError as e:
            raise invalid(f"{what}: {e}") from None

    def preprocess(self, modality: str, value: Any) -> Any:
        """A decoded value -> one row of the batch tensor (text stays a string until `_stack` tokenizes it)."""
        cfg = self.configs[modality]
        if modality == "text":
            return value
        if modality == "audio":  # fixed length (SPEC.preprocess pads to the batch's longest clip)
            wave, rate = value
            seconds = max(cfg.max_frames - 1, 1) / 100.0  # hop 160 at 16 kHz: 100 frames per second
            return preprocess_audio(wave, rate, seconds=seconds, n_mels=cfg.n_mels)
        return modality_spec(modality).preprocess([value], cfg, self.tokenizer)[0]

    def placeholder(self, modality: str) -> Any:
        """A valid stand-in row for an absent modality (masked out by the model): the modality's placeholder,
        preprocessed (once)."""
        if modality not in self._placeholders:
            cfg = self.configs[modality]
            self._placeholders[modality] = self.preprocess(modality, modality_spec(modality).placeholder(cfg))
        return self._placeholders[modality]

    # ---- model calls (run in a worker thread) ---------------------------------------------------------
    def _stack(self, modality: str, items: Sequence[Any], fixed_length: bool = False) -> torch.Tensor:
        """Prepared items -> one batch tensor. `fixed_length` pads text to the tokenizer's context length
        (the fusion paths): the fusion attends over padding tokens, so padding to the batch's longest text
        would make a prediction depend on which other requests share its batch."""
        if modality == "text":
            if fixed_length:
                return self.tokenizer.encode(list(items), pad_to=self.tokenizer.context_length)
            return modality_spec("text").preprocess(list(items), self.configs["text"], self.tokenizer)
        return torch.stack(list(items))

    @torch.inference_mode()
    def embed(self, modality: str, items: Sequence[Any]) -> list[np.ndarray]:
        """Prepared items of one modality -> one L2-normalised float32 vector each (one model call)."""
        x = self._stack(modality, items)
        if self.contrastive:
            emb = self.model.embed_text_ids(x) if modality == "text" else self.model.embed_image_tensor(x)
        else:
            emb = self.model.embed_modality(self.keys[modality], x)
        arr = emb.float().cpu().numpy()
        return [arr[i] for i in range(arr.shape[0])]

    @torch.inference_mode()
    def tokens(self, modality: str, items: Sequence[Any]) -> list[np.ndarray]:
        """Prepared items of one modality -> each its projected tokens (N, dim) float32: the fusion's input
        (MultiModalModel.modality_tokens, every row present; one encoder call). The encoder service's half of
        `classify`."""
        x = self._stack(modality, items, fixed_length=True).to(self.model.device)
        present = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        arr = self.model.modality_tokens(self.keys[modality], x, present).float().cpu().numpy()  # (B, N, dim)
        return [arr[i] for i in range(arr.shape[0])]

    def token_shape(self, modality: str) -> tuple[int, int]:
        """(N, dim) of `tokens(modality, ...)` rows; measured once on the placeholder input."""
        if modality not in self._token_shapes:
            self._token_shapes[modality] = self.tokens(modality, [self.placeholder(modality)])[0].shape
        return self._token_shapes[modality]

    @torch.inference_mode()
    def fuse(self, samples: Sequence[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
        """Samples (modality -> its tokens (N, dim), at least one) -> prediction dicts: fusion + head only
        (one call; absent modalities are zero rows masked out, as in MultiModalModel._encode). The fusion
        service's half of `classify`."""
        device = self.model.device
        feats, masks = {}, {}
        for m in self.modalities:
            present = torch.tensor([m in s for s in samples], dtype=torch.bool, device=device)
            rows = np.zeros((len(samples), *self.token_shape(m)), dtype=np.float32)
            for i, s in enumerate(samples):
                if m in s:
                    rows[i] = s[m]
            feats[self.keys[m]] = torch.from_numpy(rows).to(device)  # (B, N_m, dim)
            masks[self.keys[m]] = present  # (B,) True = present
        logits = self.model.logits_from_tokens(feats, masks)
        return self.predictions(logits)

    @torch.inference_mode()
    def classify(self, samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Samples (modality -> prepared item, at least one) -> prediction dicts (one model call)."""
        data, mask = {}, {}
        for m in self.modalities:
            present = [m in s for s in samples]
            fill = next((s[m] for s in samples if m in s), None)
            if fill is None:
                fill = self.placeholder(m)
            data[self.keys[m]] = self._stack(m, [s.get(m, fill) for s in samples], fixed_length=True)
            mask[self.keys[m]] = torch.tensor(present, dtype=torch.bool)
        if self.prune_threshold is None:
            return self.predictions(self.model.logits(Batch(data, mask))[0])
        from ..eval.pruning import logits_pruned

        logits, skipped = logits_pruned(self.model, self.prune_means, Batch(data, mask), self.prune_threshold)
        out = self.predictions(logits)
        for i, p in enumerate(out):
            p["pruned"] = [
                m for m in self.modalities if self.keys[m] in skipped and bool(skipped[self.keys[m]][i])
            ]
        return out

    def predictions(self, logits: torch.Tensor) -> list[dict[str, Any]]:
        """Head output ((B,) match logits or (B, C) class logits) -> one dict each: label, score, logits
        (and class probabilities)."""
        logits = logits.float().cpu()
        out = []
        if self.model.config.head == "match":
            for z in logits.tolist():
                p = 1.0 / (1.0 + math.exp(-z))
                out.append({"label": int(p > 0.5), "score": p, "logits": [z]})
        else:
            for z in logits:
                p = torch.softmax(z, dim=-1)
                out.append(
                    {
                        "label": int(p.argmax()),
                        "score": float(p.max()),
                        "probabilities": p.tolist(),
                        "logits": z.tolist(),
                    }
                )
        return out


__all__ = ["Engine", "check_text", "model_fingerprint"]
