"""A word-level vocabulary for prompt -> response sequences of the unified decoder (alignment runs).

Sequence layout: `<bos> prompt words <sep> | response words <eos>` ("|" marks where the response starts); every
token has modality TEXT. Words are `world.words` tokens (lower-case words and single punctuation marks);
unknown words map to `<unk>`. Built from the texts it must cover (the synthetic world's words, or a user's
JSONL), saved as vocab.json beside the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..errors import DataError
from .world import words

SPECIALS = ("<pad>", "<bos>", "<sep>", "<eos>", "<unk>")


class WordVocab:
    """Ids 0..4 are SPECIALS, then the words in the given order."""

    def __init__(self, tokens: Sequence[str]):
        dup = [t for t in tokens if t in SPECIALS]
        if dup:
            raise DataError(f"vocabulary words {dup} collide with the special tokens {SPECIALS}")
        self.itos = list(SPECIALS) + list(dict.fromkeys(tokens))
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        self.pad, self.bos, self.sep, self.eos, self.unk = range(len(SPECIALS))

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> WordVocab:
        """Every word of `texts`, sorted."""
        return cls(sorted({w for t in texts for w in words(t)} - set(SPECIALS)))

    def __len__(self) -> int:
        return len(self.itos)

    def encode_words(self, text: str) -> list[int]:
        return [self.stoi.get(w, self.unk) for w in words(text)]

    def prompt_ids(self, prompt: str) -> list[int]:
        """<bos> prompt <sep>: what generation starts from."""
        return [self.bos, *self.encode_words(prompt), self.sep]

    def response_ids(self, response: str) -> list[int]:
        """response <eos>."""
        return [*self.encode_words(response), self.eos]

    def decode(self, ids: Iterable[int]) -> str:
        """Response ids -> text, stopping at <eos> (specials other than <unk> are skipped)."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos:
                break
            if i >= len(SPECIALS) or i == self.unk:
                out.append(self.itos[i])
        return " ".join(out)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"words": self.itos[len(SPECIALS) :]}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> WordVocab:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path} not found: an alignment model folder needs its vocab.json")
        return cls(json.loads(path.read_text())["words"])


def pack(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate prompt + response per row and right-pad.

    Returns ids (batch, T) and response_mask (batch, T) bool, True at the response tokens (the scored and
    trained positions; the prompt and the padding are False)."""
    if len(prompts) != len(responses) or not prompts:
        raise DataError(f"pack: {len(prompts)} prompts and {len(responses)} responses; need equal, >= 1")
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids[b, : len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        mask[b, len(p) : len(p) + len(r)] = True
    return ids, mask


__all__ = ["SPECIALS", "WordVocab", "pack"]
