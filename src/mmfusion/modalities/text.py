"""Text modality: a BPE tokenizer (Hugging Face `tokenizers`), a causal Transformer encoder and its SPEC."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch import nn

from ..errors import ConfigError, DataError
from ..layers import Transformer, init_transformer_
from .base import EncoderConfigBase, ModalitySpec

PAD, UNK, EOT = "[PAD]", "[UNK]", "[EOT]"
SPECIAL_TOKENS = (PAD, UNK, EOT)  # ids 0, 1, 2


def check_texts(texts: str | Sequence[str]) -> list[str]:
    """A list of strings (a lone string is one text); DataError naming the first text that is not a string."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise DataError(f"text #{i} is {type(t).__name__}; expected str")
    return texts


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, pad_to: int | None = None) -> torch.Tensor:
    """(N, pad_to or the longest row) long tensor of id rows, right-padded with `pad_id`."""
    length = pad_to or max(len(r) for r in rows)
    too_long = next((i for i, r in enumerate(rows) if len(r) > length), None)
    if too_long is not None:
        raise DataError(f"text #{too_long} has {len(rows[too_long])} tokens; the padded length is {length}")
    # one tensor from padded lists: a tensor per row costs ~10 us each, the serving path's largest
    # tokenization cost at batch 32
    return torch.tensor([[*r, *[pad_id] * (length - len(r))] for r in rows], dtype=torch.long).view(
        len(rows), length
    )


class TextTokenizer:
    """BPE tokenizer trained on captions; encodes a batch to padded ids ending in [EOT].

    Padding is on the right with id 0, so the [EOT] position of row i is `lengths[i] - 1`.
    """

    def __init__(self, tokenizer: Tokenizer, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.pad_id = tokenizer.token_to_id(PAD)
        self.eot_id = tokenizer.token_to_id(EOT)
        if self.pad_id != 0 or self.eot_id is None:
            raise DataError("tokenizer must define [PAD] as id 0 and an [EOT] token")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, context_length: int) -> TextTokenizer:
        """Train a BPE vocabulary of at most `vocab_size` entries on `texts`.

        Words (and runs of punctuation) are split off, then marked with a leading "▁" (Metaspace) rather than the
        trainer's end-of-word suffix: with the suffix, `tokenizers` numbers the word-final symbols in hash-map
        order, so ids (and tie-broken merges) differed from process to process; this way the same texts always
        give the same vocabulary and ids. Decoding puts a space before punctuation ("square ?").
        """
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Metaspace()])
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, context_length)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, texts: Sequence[str], pad_to: int | None = None) -> torch.Tensor:
        """Texts -> (batch, length) int64 ids; each row is truncated to fit [EOT] in `context_length`.

        Rows are padded to the longest row in the batch (or to `pad_to`).
        """
        texts = check_texts(texts)
        rows = [
            e.ids[: self.context_length - 1] + [self.eot_id] for e in self.tokenizer.encode_batch(list(texts))
        ]
        return pad_rows(rows, self.pad_id, pad_to)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, dropping special tokens."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        self.tokenizer.save(str(Path(directory) / "tokenizer.json"))

    @classmethod
    def load(cls, directory: str | Path, context_length: int) -> TextTokenizer:
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{path} not found: a saved model needs its tokenizer.json")
        return cls(Tokenizer.from_file(str(path)), context_length)


class TextEncoder(nn.Module):
    """Causal Transformer over token ids, pooled at the [EOT] token (as CLIP).

    ids (batch, length) int64 -> (batch, embed_dim) unnormalised embedding.
    eot_id None: the [EOT] is the last non-padding token (padding id 0, on the right: mmfusion's tokenizer);
    an int: the first position holding that id (CLIP's <|endoftext|>; the last position when a row has none).
    act: the MLP activation (mmfusion.layers.ACTIVATIONS; "quick_gelu" for OpenAI's CLIP checkpoints).
    """

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int,
        depth: int,
        heads: int,
        embed_dim: int,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        eot_id: int | None = None,
    ):
        super().__init__()
        self.context_length = context_length
        self.eot_id = eot_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, depth, heads, mlp_ratio, act)
        self.ln_final = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        init_transformer_(self.transformer, width, depth)
        nn.init.normal_(self.proj.weight, std=width**-0.5)

    def forward_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (batch, length) -> per-token features (batch, length, width)."""
        if ids.shape[1] > self.context_length:
            raise DataError(
                f"text has {ids.shape[1]} tokens; the encoder's context_length is {self.context_length}"
            )
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        # Causal attention: the [EOT] token sees every real token and no padding (padding is on the right).
        return self.ln_final(self.transformer(x, is_causal=True))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.forward_tokens(ids)
        if self.eot_id is None:
            eot = (ids != 0).sum(dim=1) - 1  # padding id is 0
        else:
            is_eot = ids == self.eot_id
            last = torch.full_like(ids[:, 0], ids.shape[1] - 1)
            eot = torch.where(is_eot.any(dim=1), is_eot.int().argmax(dim=1), last)
        return self.proj(x[torch.arange(x.shape[0], device=x.device), eot])


class TextEncoderConfig(EncoderConfigBase):
    """TextEncoder; `vocab_size` None = taken from the model's tokenizer."""

    kind: Literal["text"] = "text"
    vocab_size: int | None = Field(None, ge=4)
    context_length: int = Field(32, ge=4, le=4096)
    # a pretrained transformers encoder (folder or installed package; mmfusion.models.hf_text) instead of the
    # TextEncoder: its own tokenizer, width and depth; `MultiModalModel(encoders={"text": "hf:<path>"})`
    hf: str | None = None
    pooling: Literal["mean", "cls"] = "mean"
    freeze: bool | int = False


def build_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    if cfg.vocab_size is None:
        raise ConfigError(
            "the text encoder needs vocab_size: pass a tokenizer or set encoders.text.vocab_size"
        )
    w = cfg.width
    return TextEncoder(cfg.vocab_size, cfg.context_length, w, cfg.depth, cfg.heads, w, cfg.mlp_ratio)


def preprocess_texts(texts: Sequence[str], cfg: Any, tokenizer: TextTokenizer | None) -> torch.Tensor:
    """Strings -> (B, L) int64 ids (right-padded with 0, each ending in [EOT])."""
    if tokenizer is None:
        raise DataError("the samples have text: preprocessing it needs the model's tokenizer")
    return tokenizer.encode(list(texts))


def text_placeholder(cfg: Any) -> str:
    return ""


SPEC = ModalitySpec(
    name="text",
    encoder_config=TextEncoderConfig,
    build_encoder=build_text_encoder,
    preprocess=preprocess_texts,
    placeholder=text_placeholder,
)
