"""The CLIP tokenizer of models imported from CLIP checkpoints (`model.text.arch: clip`).

A byte-level BPE (OpenAI's 49,408-entry vocabulary, or any other with the same special tokens) held as a
Hugging Face `tokenizers` tokenizer.json, the file `CLIPTokenizer` (transformers) saves. Each text becomes
<|startoftext|> + its BPE ids (at most context_length - 2) + <|endoftext|>, right-padded: the ids
`CLIPTokenizer(texts, padding=True, truncation=True, max_length=context_length)` gives, and OpenCLIP's
`tokenize` up to the padding id. The text tower pools at the first <|endoftext|> (TextEncoder eot_id).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..errors import ConfigError, DataError
from .text import TextTokenizer, check_texts, pad_rows

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


class ClipTokenizer:
    """CLIP BPE ids with <|startoftext|> / <|endoftext|>; the same interface as TextTokenizer.

    vocab_size: the text tower's embedding rows (model.text.vocab_size; a checkpoint's may exceed the
    tokenizer's size, never fall short of it); None: the tokenizer's size.
    The padding id is the one set in the tokenizer.json's `padding` (CLIPTokenizer's pad_token), else
    <|endoftext|>'s; padding never changes an embedding (causal attention, pooled at the first <|endoftext|>).
    """

    def __init__(self, tokenizer: Tokenizer, context_length: int, vocab_size: int | None = None):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.bos_id, self.eot_id = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
        if self.bos_id is None or self.eot_id is None:
            raise DataError(
                f"not a CLIP tokenizer: it has no {BOS} / {EOS} tokens (text.arch clip needs a CLIP "
                "tokenizer.json; set model.text.tokenizer to one)"
            )
        padding = tokenizer.padding
        self.pad_id = int(padding["pad_id"]) if padding else self.eot_id
        tokenizer.no_padding()
        tokenizer.no_truncation()
        size = tokenizer.get_vocab_size()
        if vocab_size is not None and vocab_size < size:
            raise ConfigError(
                f"model.text.vocab_size {vocab_size} is smaller than the CLIP tokenizer's {size} tokens: "
                f"set model.text.vocab_size: {size} (a text.arch clip model has exactly that many embedding rows)"
            )
        self._vocab_size = vocab_size or size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, texts: Sequence[str], pad_to: int | None = None) -> torch.Tensor:
        """Texts -> (batch, length) int64 ids, <|startoftext|> ... <|endoftext|>, padded to the longest row."""
        texts = check_texts(texts)
        keep = self.context_length - 2
        rows = [
            [self.bos_id, *e.ids[:keep], self.eot_id]
            for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        ]
        return pad_rows(rows, self.pad_id, pad_to)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, dropping special tokens."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        """tokenizer.json, with the padding id recorded in its `padding` entry."""
        pad_token = self.tokenizer.id_to_token(self.pad_id)
        self.tokenizer.enable_padding(pad_id=self.pad_id, pad_token=pad_token)
        try:
            self.tokenizer.save(str(Path(directory) / "tokenizer.json"))
        finally:
            self.tokenizer.no_padding()

    @classmethod
    def load(cls, directory: str | Path, context_length: int, vocab_size: int | None = None) -> ClipTokenizer:
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{path} not found: a text.arch clip model needs its CLIP tokenizer.json")
        return cls(Tokenizer.from_file(str(path)), context_length, vocab_size)


def load_text_tokenizer(
    directory: str | Path, context_length: int, arch: str = "mmfusion", vocab_size: int | None = None
) -> TextTokenizer | ClipTokenizer:
    """The tokenizer.json in `directory` as the text tower of `arch` reads it (mmfusion's or CLIP's)."""
    if arch == "clip":
        return ClipTokenizer.load(directory, context_length, vocab_size)
    return TextTokenizer.load(directory, context_length)


__all__ = ["BOS", "EOS", "ClipTokenizer", "load_text_tokenizer"]
