"""One vocabulary over text BPE ids, image codes, audio codes and special tokens; task sequences; temperature
task mixing.

Vocabulary layout (ids):
  [0, n_text)                      text BPE ids (the TextTokenizer's own ids, [PAD]/[UNK]/[EOT] included)
  [n_text, n_text + K)             image codes 0..K-1 (offset by n_text)
  [.., .. + n_audio)               audio codes (optional; 0 by default)
  then one id per special token:   <pad> <bos> <eos> <boi> <eoi> <caption> <gen_image> <vqa> <answer>
  then, only when n_audio > 0:     <boa> <eoa> <audio_caption>
The audio specials come last so that a vocabulary without audio (n_audio = 0) has exactly the ids it had before
audio existed: a vocab.json written then loads unchanged.

Sequences (one per task; "|" marks where the trained target starts):
  caption        <bos> <caption> <boi> codes <eoi> | caption <eos>
  image          <bos> <gen_image> caption <boi> | codes <eoi> <eos>
  vqa            <bos> <vqa> <boi> codes <eoi> question <answer> | answer <eos>
  audio_caption  <bos> <audio_caption> <boa> audio codes <eoa> | caption <eos>
Each token carries a modality id (image codes IMAGE, audio codes AUDIO, everything else TEXT) and a loss-mask
bit: True means "token t is a training target", i.e. the logits at t - 1 are scored against it (shifted
labels).

Task mixing (seed 003): p_i = n_i^(1/T) / sum_j n_j^(1/T); T = 1 samples in proportion to task sizes,
T -> inf uniformly (as the temperature sampling of multilingual MT, Arivazhagan et al. 2019).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .model import AUDIO, IMAGE, TEXT  # modality ids; special tokens count as TEXT

SPECIAL_TOKENS = (
    "<pad>",
    "<bos>",
    "<eos>",
    "<boi>",
    "<eoi>",
    "<caption>",
    "<gen_image>",
    "<vqa>",
    "<answer>",
)
AUDIO_SPECIAL_TOKENS = ("<boa>", "<eoa>", "<audio_caption>")  # present only when n_audio > 0
TASKS = ("caption", "image", "vqa", "audio_caption")
TASK_TOKENS = {
    "caption": "<caption>",
    "image": "<gen_image>",
    "vqa": "<vqa>",
    "audio_caption": "<audio_caption>",
}


@dataclass(frozen=True)
class UnifiedVocab:
    """The id layout of the unified vocabulary (see the module docstring); every special token is one id.

    n_audio / tokens_per_audio: audio codes and codes per clip (both 0 for a vocabulary without audio)."""

    n_text: int
    n_image: int
    tokens_per_image: int
    n_audio: int = 0
    tokens_per_audio: int = 0

    def __post_init__(self) -> None:
        for name in ("n_text", "n_image", "tokens_per_image"):
            if getattr(self, name) < 1:
                raise ConfigError(f"UnifiedVocab.{name} must be >= 1; got {getattr(self, name)}")
        if self.n_audio < 0:
            raise ConfigError(f"UnifiedVocab.n_audio must be >= 0; got {self.n_audio}")
        if (self.n_audio > 0) != (self.tokens_per_audio > 0) or self.tokens_per_audio < 0:
            raise ConfigError(
                "UnifiedVocab.tokens_per_audio must be >= 1 when n_audio > 0 and 0 when n_audio == 0; got "
                f"n_audio={self.n_audio}, tokens_per_audio={self.tokens_per_audio}"
            )

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """This vocabulary's special tokens in id order (the audio ones only when n_audio > 0)."""
        return SPECIAL_TOKENS + (AUDIO_SPECIAL_TOKENS if self.n_audio else ())

    @property
    def image_offset(self) -> int:
        return self.n_text

    @property
    def audio_offset(self) -> int:
        return self.n_text + self.n_image

    @property
    def special_offset(self) -> int:
        return self.n_text + self.n_image + self.n_audio

    @property
    def size(self) -> int:
        return self.special_offset + len(self.special_tokens)

    def __getitem__(self, token: str) -> int:
        """The id of a special token, e.g. vocab["<boi>"]."""
        specials = self.special_tokens
        if token in specials:
            return self.special_offset + specials.index(token)
        if token in AUDIO_SPECIAL_TOKENS:
            raise ConfigError(
                f"{token!r} exists only in a vocabulary with audio codes; this one has n_audio=0"
            )
        raise ConfigError(f"unknown special token {token!r}; expected one of {specials}")

    @property
    def pad(self) -> int:
        return self["<pad>"]

    @property
    def text_range(self) -> tuple[int, int]:
        """[lo, hi) of text ids."""
        return 0, self.n_text

    @property
    def image_range(self) -> tuple[int, int]:
        """[lo, hi) of image-code ids."""
        return self.image_offset, self.image_offset + self.n_image

    @property
    def audio_range(self) -> tuple[int, int]:
        """[lo, hi) of audio-code ids (empty when n_audio == 0)."""
        return self.audio_offset, self.audio_offset + self.n_audio

    def image_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ codes (any shape, ints in [0, n_image)) -> vocabulary ids of the same shape."""
        return _offset_codes(codes, self.image_range, "image")

    def audio_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Audio VQ codes (any shape, ints in [0, n_audio)) -> vocabulary ids of the same shape."""
        if not self.n_audio:
            raise ConfigError("this vocabulary has no audio codes (n_audio=0); build it with n_audio > 0")
        return _offset_codes(codes, self.audio_range, "audio")

    def codes_from_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids of image codes -> VQ codes; DataError if any id is outside the image range."""
        ids = torch.as_tensor(ids).long()
        lo, hi = self.image_range
        if ids.numel() and (ids.min() < lo or ids.max() >= hi):
            raise DataError(f"ids are not all image codes: expected ids in [{lo}, {hi})")
        return ids - lo

    def modality_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Modality id per token: IMAGE for image codes, AUDIO for audio codes, TEXT otherwise."""
        ids = torch.as_tensor(ids).long()
        mod = torch.full_like(ids, TEXT)
        lo, hi = self.image_range
        mod[(ids >= lo) & (ids < hi)] = IMAGE
        lo, hi = self.audio_range
        mod[(ids >= lo) & (ids < hi)] = AUDIO
        return mod

    def _columns(self, ids: Sequence[int], text_tokenizer, max_codes: int) -> list[tuple[int, str]]:
        """(position, name) of the tokens to show: runs of more than `max_codes` codes of one modality end in
        one `...`."""
        out: list[tuple[int, str]] = []
        run, kind = 0, None
        code_kinds = (("img", *self.image_range), ("aud", *self.audio_range))
        for pos, i in enumerate(int(v) for v in ids):
            now = next(((k, lo) for k, lo, hi in code_kinds if lo <= i < hi), None)
            run = run + 1 if now is not None and now == kind else int(now is not None)
            kind = now
            if run > max_codes + 1:
                continue
            if run == max_codes + 1:
                name = "..."
            elif now is not None:
                name = f"{now[0]}:{i - now[1]}"
            elif i >= self.special_offset:
                name = self.special_tokens[i - self.special_offset]
            elif text_tokenizer is not None:
                name = text_tokenizer.tokenizer.id_to_token(i)
            else:
                name = f"txt:{i}"
            out.append((pos, name))
        return out

    def describe(self, ids: Sequence[int], text_tokenizer=None, max_codes: int = 3) -> list[str]:
        """Readable names of ids (for the drawn example): specials as is, codes as `img:17` / `aud:5`, text as
        its BPE piece (or `txt:5` without a tokenizer); runs of more than `max_codes` codes are elided as
        `...`."""
        return [name for _, name in self._columns(ids, text_tokenizer, max_codes)]

    def to_dict(self) -> dict[str, int | list[str]]:
        return {**asdict(self), "special_tokens": list(self.special_tokens)}

    @classmethod
    def from_dict(cls, d: Mapping) -> UnifiedVocab:
        """Inverse of to_dict. A dict written before audio existed (no tokens_per_audio, n_audio 0) loads
        with the same ids for every token."""
        try:
            vocab = cls(
                int(d["n_text"]),
                int(d["n_image"]),
                int(d["tokens_per_image"]),
                int(d.get("n_audio", 0)),
                int(d.get("tokens_per_audio", 0)),
            )
        except KeyError as e:
            raise ConfigError(f"vocab is missing {e.args[0]!r}") from None
        if list(d.get("special_tokens", vocab.special_tokens)) != list(vocab.special_tokens):
            raise ConfigError(
                f"vocab special tokens {d.get('special_tokens')} differ from this version's "
                f"{list(vocab.special_tokens)} (n_audio={vocab.n_audio})"
            )
        return vocab

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> UnifiedVocab:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path} not found: a unified model folder needs its vocab.json")
        return cls.from_dict(json.loads(path.read_text()))


def _offset_codes(codes: torch.Tensor, id_range: tuple[int, int], what: str) -> torch.Tensor:
    """Codes in [0, hi - lo) -> ids in [lo, hi); DataError naming `what` when a code is out of range."""
    codes = torch.as_tensor(codes).long()
    lo, hi = id_range
    if codes.numel() and (codes.min() < 0 or codes.max() >= hi - lo):
        raise DataError(
            f"{what} codes must lie in [0, {hi - lo}); got [{codes.min().item()}, {codes.max().item()}]"
        )
    return codes + lo


@dataclass
class TokenSequence:
    """One training sequence: ids, modality and loss_mask, all (T,); loss_mask True = trained target."""

    task: str
    ids: torch.Tensor  # (T,) long
    modality: torch.Tensor  # (T,) long
    loss_mask: torch.Tensor  # (T,) bool

    @property
    def target_start(self) -> int:
        """Index of the first trained token (the first target)."""
        return int(self.loss_mask.nonzero()[0, 0])

    def prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, modality) before the first target: what generation starts from."""
        k = self.target_start
        return self.ids[:k], self.modality[:k]


class SequenceBuilder:
    """Builds the task sequences of the module docstring from text (via the BPE tokenizer) and VQ codes."""

    def __init__(self, vocab: UnifiedVocab, text_tokenizer):
        if text_tokenizer.vocab_size != vocab.n_text:
            raise ConfigError(
                f"text tokenizer has {text_tokenizer.vocab_size} ids but the vocab expects n_text={vocab.n_text}"
            )
        self.vocab, self.text_tokenizer = vocab, text_tokenizer

    def text_ids(self, text: str) -> list[int]:
        """BPE ids of `text` without [EOT] (the unified sequence has its own boundaries)."""
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"expected a non-empty text; got {text!r}")
        return self.text_tokenizer.tokenizer.encode(text).ids

    def _image(self, codes: torch.Tensor) -> list[int]:
        ids = self.vocab.image_ids(codes).reshape(-1).tolist()
        if len(ids) != self.vocab.tokens_per_image:
            raise DataError(f"an image has {len(ids)} codes; the vocab expects {self.vocab.tokens_per_image}")
        return ids

    def _audio(self, codes: torch.Tensor) -> list[int]:
        ids = self.vocab.audio_ids(codes).reshape(-1).tolist()
        if len(ids) != self.vocab.tokens_per_audio:
            raise DataError(
                f"an audio clip has {len(ids)} codes; the vocab expects tokens_per_audio="
                f"{self.vocab.tokens_per_audio}"
            )
        return ids

    def _make(self, task: str, parts: list[tuple[list[int], bool]]) -> TokenSequence:
        ids = [i for p, _ in parts for i in p]
        mask = [m for p, m in parts for _ in p]
        t = torch.tensor(ids, dtype=torch.long)
        return TokenSequence(task, t, self.vocab.modality_of(t), torch.tensor(mask, dtype=torch.bool))

    def caption(self, codes: torch.Tensor, caption: str | None = None) -> TokenSequence:
        """<bos><caption><boi> codes <eoi> | caption <eos> (prompt only when caption is None)."""
        v = self.vocab
        parts = [([v["<bos>"], v["<caption>"], v["<boi>"], *self._image(codes), v["<eoi>"]], False)]
        if caption is not None:
            parts.append(([*self.text_ids(caption), v["<eos>"]], True))
        return self._make("caption", parts)

    def image(self, caption: str | None, codes: torch.Tensor | None = None) -> TokenSequence:
        """<bos><gen_image> caption <boi> | codes <eoi> <eos> (prompt only when codes is None).

        caption None gives the unconditional sequence <bos><gen_image><boi> | codes <eoi> <eos>, the
        unconditional branch of classifier-free guidance (trained on a fraction of the image examples)."""
        v = self.vocab
        text = self.text_ids(caption) if caption is not None else []
        parts = [([v["<bos>"], v["<gen_image>"], *text, v["<boi>"]], False)]
        if codes is not None:
            parts.append(([*self._image(codes), v["<eoi>"], v["<eos>"]], True))
        return self._make("image", parts)

    def vqa(self, codes: torch.Tensor, question: str, answer: str | None = None) -> TokenSequence:
        """<bos><vqa><boi> codes <eoi> question <answer> | answer <eos> (prompt only when answer is None)."""
        v = self.vocab
        q = self.text_ids(question)
        parts = [
            ([v["<bos>"], v["<vqa>"], v["<boi>"], *self._image(codes), v["<eoi>"], *q, v["<answer>"]], False)
        ]
        if answer is not None:
            parts.append(([*self.text_ids(answer), v["<eos>"]], True))
        return self._make("vqa", parts)

    def audio_caption(self, audio_codes: torch.Tensor, caption: str | None = None) -> TokenSequence:
        """<bos><audio_caption><boa> audio codes <eoa> | caption <eos> (prompt only when caption is None)."""
        v = self.vocab
        parts = [
            ([v["<bos>"], v["<audio_caption>"], v["<boa>"], *self._audio(audio_codes), v["<eoa>"]], False)
        ]
        if caption is not None:
            parts.append(([*self.text_ids(caption), v["<eos>"]], True))
        return self._make("audio_caption", parts)


def collate(seqs: Sequence[TokenSequence], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: ids (B, T) (pad_id), modality (B, T) (TEXT on padding), loss_mask (B, T)
    (False on padding)."""
    if not seqs:
        raise DataError("collate got no sequences")
    t = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mod = torch.full((len(seqs), t), TEXT, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.bool)
    for i, s in enumerate(seqs):
        n = len(s.ids)
        ids[i, :n], mod[i, :n], mask[i, :n] = s.ids, s.modality, s.loss_mask
    return ids, mod, mask


def mixture_probabilities(sizes: Mapping[str, int], temperature: float) -> dict[str, float]:
    """p_i = n_i^(1/T) / sum_j n_j^(1/T) (equal to (n_i/N)^(1/T) normalised)."""
    if temperature <= 0:
        raise ConfigError(f"mixing temperature must be > 0; got {temperature}")
    if not sizes or any(n <= 0 for n in sizes.values()):
        raise ConfigError(f"task sizes must be positive; got {dict(sizes)}")
    logw = {k: np.log(float(n)) / temperature for k, n in sizes.items()}
    top = max(logw.values())  # subtract the max before exp: n^(1/T) overflows for small T
    w = {k: float(np.exp(v - top)) for k, v in logw.items()}
    total = sum(w.values())
    return {k: x / total for k, x in w.items()}


class TaskMixture:
    """Draws task names with temperature-controlled probabilities, seeded (numpy Generator)."""

    def __init__(self, sizes: Mapping[str, int], temperature: float = 1.0, seed: int = 0):
        self.probabilities = mixture_probabilities(sizes, temperature)
        self.tasks = list(self.probabilities)
        self._p = np.array([self.probabilities[t] for t in self.tasks])
        self.rng = np.random.default_rng(seed)

    def draw(self, n: int) -> list[str]:
        """n task names, i.i.d. from the mixture."""
        return [self.tasks[i] for i in self.rng.choice(len(self.tasks), size=n, p=self._p)]


class MixedBatches:
    """Endless batches (ids, modality, loss_mask) of sequences: each row's task drawn from a TaskMixture
    over the tasks' example counts, then an example drawn uniformly within that task."""

    def __init__(
        self,
        examples: Mapping[str, Sequence[TokenSequence]],
        batch_size: int,
        pad_id: int,
        temperature: float = 1.0,
        seed: int = 0,
    ):
        empty = [k for k, v in examples.items() if not v]
        if empty or not examples:
            raise DataError(f"tasks without examples: {empty or 'all'}")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.mixture = TaskMixture({k: len(v) for k, v in examples.items()}, temperature, seed)
        self.rng = np.random.default_rng(seed + 1)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        while True:
            tasks = self.mixture.draw(self.batch_size)
            rows = [self.examples[t][int(self.rng.integers(len(self.examples[t])))] for t in tasks]
            yield collate(rows, self.pad_id)


def draw_sequence(seq: TokenSequence, vocab: UnifiedVocab, text_tokenizer=None, max_codes: int = 3) -> str:
    """An ASCII drawing of a sequence: token names, modality (T/I/A) and whether each is trained (^)."""
    cols = [
        (name, "TIA"[int(seq.modality[pos])], "^" if seq.loss_mask[pos] else " ")
        for pos, name in vocab._columns(seq.ids.tolist(), text_tokenizer, max_codes)
    ]
    widths = [len(c[0]) for c in cols]
    rows = [" ".join(c[j].ljust(w) for c, w in zip(cols, widths)).rstrip() for j in range(3)]
    return "\n".join(f"{label:<10}{row}" for label, row in zip(("token", "modality", "trained"), rows))


__all__ = [
    "AUDIO",
    "AUDIO_SPECIAL_TOKENS",
    "IMAGE",
    "SPECIAL_TOKENS",
    "TASKS",
    "TASK_TOKENS",
    "TEXT",
    "MixedBatches",
    "SequenceBuilder",
    "TaskMixture",
    "TokenSequence",
    "UnifiedVocab",
    "collate",
    "draw_sequence",
    "mixture_probabilities",
]
