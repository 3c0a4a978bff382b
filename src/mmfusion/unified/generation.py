"""Autoregressive generation for `UnifiedDecoder`: KV cache, greedy / top-k / top-p sampling, CFG, constraints.

`generate(model, prompt_ids (batch, T), prompt_modality (batch, T), max_new_tokens)` -> new ids (batch, n_new).

Per step the next-token logits (batch, vocab) are
1. guided (classifier-free guidance, Ho & Salimans 2022; used for text->image by Make-A-Scene / Chameleon):
   `uncond + cfg_scale * (cond - uncond)`, where `uncond` comes from a second run on `uncond_ids` (e.g. the
   prompt without its text), each run with its own KV cache;
2. restricted by a `SpanConstraint` (disallowed ids -> -inf), which also names the modality of the next token;
3. decoded greedily, or sampled after temperature, top-k (Fan et al. 2018) and top-p / nucleus (Holtzman et
   al. 2020) filtering, from a seeded `torch.Generator` (the same seed gives the same tokens).

Rows of a batch share positions (no left padding): prompts in one call have the same length. A row that has
produced one of `stop_ids` is finished; it is padded with that stop id while the other rows continue, and
generation ends when every row is finished or after `max_new_tokens`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..errors import ConfigError, DataError
from .model import IMAGE, TEXT, KVCache, UnifiedDecoder


@dataclass
class SamplingConfig:
    """How the next token is picked: "greedy" (argmax) or "sample" (temperature, then top-k, then top-p)."""

    strategy: str = "greedy"
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in ("greedy", "sample"):
            raise ConfigError(f"SamplingConfig.strategy = {self.strategy!r}: expected 'greedy' or 'sample'")
        if self.temperature <= 0:
            raise ConfigError(f"SamplingConfig.temperature = {self.temperature}: expected > 0")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"SamplingConfig.top_k = {self.top_k}: expected None or >= 1")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"SamplingConfig.top_p = {self.top_p}: expected None or in (0, 1]")


@runtime_checkable
class SpanConstraint(Protocol):
    """Constrained decoding: which ids may come next, given the ids generated so far (prompt excluded)."""

    def allowed(self, generated: list[int]) -> tuple[torch.Tensor, int]:
        """(allowed-id mask, bool (vocab,), True = allowed; modality id of the next token)."""
        ...


def _id_mask(vocab_size: int, ids: Iterable[int] | range | torch.Tensor, what: str) -> torch.Tensor:
    idx = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids, dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= vocab_size):
        raise ConfigError(
            f"{what} ids must lie in [0, {vocab_size}); got [{int(idx.min())}, {int(idx.max())}]"
        )
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[idx] = True
    return mask


class ImageSpanConstraint:
    """Text spans yield text ids; an image span (opened by `boi`) yields exactly `tokens_per_image` image codes,
    then `eoi`.

    text_ids: the ids allowed in text (include the end-of-sequence / stop ids there); image_ids: the image
    code ids; boi / eoi: begin / end-of-image ids. `allow_images=False` forbids opening image spans (text-only
    answers, e.g. captions); `start_in_image=True` when the prompt ends with `boi` (text -> image);
    `max_images` (None = unlimited) closes the door to further image spans once that many are complete.
    Boundary tokens have modality TEXT, codes IMAGE.
    """

    def __init__(
        self,
        vocab_size: int,
        text_ids: Sequence[int] | range | torch.Tensor,
        image_ids: Sequence[int] | range | torch.Tensor,
        boi: int,
        eoi: int,
        tokens_per_image: int,
        allow_images: bool = True,
        start_in_image: bool = False,
        max_images: int | None = None,
    ):
        if tokens_per_image < 1:
            raise ConfigError(f"tokens_per_image = {tokens_per_image}: expected >= 1")
        self.text = _id_mask(vocab_size, text_ids, "text")
        self.image = _id_mask(vocab_size, image_ids, "image")
        if (self.text & self.image).any():
            raise ConfigError("text_ids and image_ids overlap: a token must belong to one span kind")
        for name, i in (("boi", boi), ("eoi", eoi)):
            if not 0 <= i < vocab_size or self.image[i]:
                raise ConfigError(f"{name} = {i}: expected an id in [0, {vocab_size}) outside image_ids")
        self.boi, self.eoi, self.tokens_per_image = boi, eoi, tokens_per_image
        self.allow_images, self.start_in_image, self.max_images = allow_images, start_in_image, max_images
        self._eoi_only = _id_mask(vocab_size, [eoi], "eoi")
        self._text_or_boi = self.text | _id_mask(vocab_size, [boi], "boi")

    def state(self, generated: list[int]) -> tuple[bool, int, int]:
        """(inside an image span, codes so far in the open span, completed image spans)."""
        inside, codes, done = self.start_in_image, 0, 0
        for t in generated:
            if t == self.boi:
                inside, codes = True, 0
            elif t == self.eoi:
                inside, done = False, done + 1
            elif inside:
                codes += 1
        return inside, codes, done

    def allowed(self, generated: list[int]) -> tuple[torch.Tensor, int]:
        inside, codes, done = self.state(generated)
        if inside:
            return (self.image, IMAGE) if codes < self.tokens_per_image else (self._eoi_only, TEXT)
        may_open = self.allow_images and (self.max_images is None or done < self.max_images)
        return (self._text_or_boi if may_open else self.text), TEXT


def filter_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on logits (batch, vocab); removed ids get -inf."""
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor | None, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + cfg_scale * (cond - uncond); `cond` when there is no uncond run."""
    return cond if uncond is None else uncond + cfg_scale * (cond - uncond)


class _Stream:
    """One conditioning stream (cond or uncond): its KV cache, or its whole sequence when decoding without one."""

    def __init__(self, model: UnifiedDecoder, ids: torch.Tensor, modality: torch.Tensor, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        self.ids, self.modality = ids, modality
        out = model(ids, modality, use_cache=use_cache, attn_logit=False)
        self.cache: KVCache | None = out.cache
        self.last = out.logits[:, -1].float()  # (batch, vocab)

    def step(self, new_ids: torch.Tensor, new_modality: torch.Tensor) -> None:
        # new_ids, new_modality: (batch, 1)
        if self.use_cache:
            out = self.model(new_ids, new_modality, cache=self.cache, use_cache=True, attn_logit=False)
            self.cache = out.cache
        else:  # full recomputation of the whole sequence (reference path / benchmark baseline)
            self.ids = torch.cat([self.ids, new_ids], dim=1)
            self.modality = torch.cat([self.modality, new_modality], dim=1)
            out = self.model(self.ids, self.modality, attn_logit=False)
        self.last = out.logits[:, -1].float()


def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.long)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] == 0:
        raise DataError(f"{name} must be (batch, T) with T >= 1; got shape {tuple(x.shape)}")
    return x


@torch.no_grad()
def generate(
    model: UnifiedDecoder,
    prompt_ids: torch.Tensor,
    prompt_modality: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    constraint: SpanConstraint | None = None,
    cfg_scale: float = 1.0,
    uncond_ids: torch.Tensor | None = None,
    uncond_modality: torch.Tensor | None = None,
    use_cache: bool = True,
    stop_ids: Iterable[int] = (),
    vocab_modality: torch.Tensor | None = None,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Generate up to `max_new_tokens` ids after the prompt; returns LongTensor (batch, n_new).

    prompt_ids / prompt_modality: (batch, T) or (T,). uncond_ids / uncond_modality: the unconditional prompt
    for classifier-free guidance (same batch size, any length), used when given. The modality of each new
    token comes from the constraint, else from `vocab_modality` (vocab,) (a modality id per token id), else
    TEXT. `return_logits=True` also returns the guided logits each token was picked from (batch, n_new,
    vocab), before the constraint and sampling filters. The model is run in eval mode and left so.
    """
    sampling = sampling or SamplingConfig()
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens = {max_new_tokens}: expected >= 1")
    device = next(model.parameters()).device
    ids = _as_batch(prompt_ids, "prompt_ids").to(device)
    mod = _as_batch(prompt_modality, "prompt_modality").to(device)
    if mod.shape != ids.shape:
        raise DataError(f"prompt_modality {tuple(mod.shape)} must match prompt_ids {tuple(ids.shape)}")
    batch = ids.shape[0]
    longest = (
        ids.shape[1]
        if uncond_ids is None
        else max(ids.shape[1], _as_batch(uncond_ids, "uncond_ids").shape[1])
    )
    if longest + max_new_tokens - 1 > model.cfg.max_len:
        raise ConfigError(
            f"prompt length {longest} + max_new_tokens {max_new_tokens} exceeds the model's max_len "
            f"{model.cfg.max_len} (+1)"
        )
    if cfg_scale != 1.0 and uncond_ids is None:
        raise ConfigError(
            f"cfg_scale = {cfg_scale} needs uncond_ids / uncond_modality (the unconditional prompt)"
        )
    model.eval()
    streams = [_Stream(model, ids, mod, use_cache)]
    if uncond_ids is not None:
        if uncond_modality is None:
            raise ConfigError("uncond_ids given without uncond_modality")
        u_ids = _as_batch(uncond_ids, "uncond_ids").to(device)
        u_mod = _as_batch(uncond_modality, "uncond_modality").to(device)
        if u_ids.shape[0] != batch or u_mod.shape != u_ids.shape:
            raise DataError(
                f"uncond_ids {tuple(u_ids.shape)} / uncond_modality {tuple(u_mod.shape)} must be "
                f"(batch={batch}, T) like each other"
            )
        streams.append(_Stream(model, u_ids, u_mod, use_cache))
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    if vocab_modality is not None:
        vocab_modality = torch.as_tensor(vocab_modality, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(sampling.seed)
    generated: list[list[int]] = [[] for _ in range(batch)]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    pad = torch.zeros(batch, dtype=torch.long, device=device)
    out_ids, out_logits = [], []
    for step in range(max_new_tokens):
        logits = guided_logits(streams[0].last, streams[1].last if len(streams) > 1 else None, cfg_scale)
        if return_logits:
            out_logits.append(logits)
        next_mod = torch.full((batch,), TEXT, dtype=torch.long, device=device)
        if constraint is not None:
            masks = []
            for b in range(batch):
                allowed, m = constraint.allowed(generated[b])
                masks.append(allowed)
                next_mod[b] = m
            logits = logits.masked_fill(~torch.stack(masks).to(device), float("-inf"))
        if sampling.strategy == "greedy":
            nxt = logits.argmax(dim=-1)
        else:
            probs = filter_logits(logits, sampling).softmax(dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        nxt = torch.where(finished, pad, nxt)
        if constraint is None and vocab_modality is not None:
            next_mod = vocab_modality[nxt]
        out_ids.append(nxt)
        for b, t in enumerate(nxt.tolist()):
            generated[b].append(t)
        if stop.numel():
            newly = torch.isin(nxt, stop) & ~finished
            pad = torch.where(newly, nxt, pad)
            finished |= newly
            if bool(finished.all()):
                break
        if step + 1 < max_new_tokens:
            for s in streams:
                s.step(nxt[:, None], next_mod[:, None])
    tokens = torch.stack(out_ids, dim=1)
    return (tokens, torch.stack(out_logits, dim=1)) if return_logits else tokens
