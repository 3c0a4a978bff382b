"""Audio modality: waveform preprocessing (mono, resample, fixed length, log-mel), the audio encoder, and
AudioFrontEnd, the VQ tokenizer's view of a clip (its log-mel as a [-1, 1] spectrogram "image" for
mmfusion.models.vq.VQVAE).

Log-mel features are computed in torch: a Hann-windowed STFT (25 ms window, 10 ms hop at 16 kHz) whose power
is normalised by the window sum (a full-scale sine gives a peak bin power of 1/4), an HTK-formula mel
filterbank with unit-peak triangles (no Slaney area normalisation), ``log(mel + 1e-6)``, then a *fixed*
affine normalisation ``(log_mel - LOG_MEL_MEAN) / LOG_MEL_STD``. Fixed rather than per-utterance so that
loudness survives (in the synthetic world, object size is loudness) and padded silence is one constant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..errors import ConfigError, DataError
from ..layers import Transformer, init_transformer_
from .base import EncoderConfigBase, MediaError, ModalitySpec, as_source

WaveLike = Any  # np.ndarray | torch.Tensor, (n,) or (channels, n); int16/int32/uint8 PCM or float in [-1, 1]

LOG_MEL_EPS = 1e-6
LOG_MEL_MEAN = -7.0  # maps the log range [ln 1e-6, 0] ~ [-13.8, 0] to about [-1.7, 1.75]
LOG_MEL_STD = 4.0
MAX_CHANNELS = 16  # a 2-D array with more rows than this and <= 16 columns is read as (n, channels)
NO_SAMPLES = "audio has no samples"
NOT_FINITE = "audio contains NaN or infinite samples"


def to_mono_float(wave: WaveLike) -> torch.Tensor:
    """Waveform of any PCM dtype, (n,), (channels, n) or soundfile's (n, channels) -> mono float32 (n,)."""
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu().numpy()
    arr = np.asarray(wave)
    if arr.dtype == np.int16:
        arr = arr.astype(np.float32) / 32768.0
    elif arr.dtype == np.int32:
        arr = arr.astype(np.float32) / 2147483648.0
    elif arr.dtype == np.uint8:
        arr = (arr.astype(np.float32) - 128.0) / 128.0
    elif not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"audio has dtype {arr.dtype}; expected float, int16, int32 or uint8 samples")
    if arr.ndim == 2:
        if arr.shape[0] > MAX_CHANNELS and arr.shape[1] <= MAX_CHANNELS:
            arr = arr.T  # soundfile layout (n, channels)
        elif arr.shape[0] > MAX_CHANNELS:
            raise DataError(f"audio has shape {arr.shape}; expected (n,), (channels, n) or (n, channels)")
        arr = arr.mean(axis=0)
    if arr.ndim != 1 or arr.size == 0:
        raise DataError(f"audio has shape {arr.shape}; expected a non-empty (n,) or (channels, n) waveform")
    if not np.isfinite(arr).all():
        raise DataError(NOT_FINITE)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited resampling (..., n) -> (..., ceil(n * new / orig)) with libsoxr (the `soxr` package, "HQ").

    soxr handles any rate ratio in time and memory linear in the signal; a polyphase sinc kernel reduced by
    the gcd would need (new / gcd) x (orig / gcd) taps, gigabytes for a rate such as 44099 Hz.
    """
    import soxr

    if orig_rate <= 0 or new_rate <= 0:
        raise DataError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    if orig_rate == new_rate:
        return wave
    shape = wave.shape
    x = wave.detach().reshape(-1, shape[-1]).to(torch.float32).cpu().numpy().T  # (n, channels)
    y = soxr.resample(np.ascontiguousarray(x), orig_rate, new_rate, quality="HQ")  # (m, channels)
    out_len = math.ceil(new_rate * shape[-1] / orig_rate)
    y = np.pad(y[:out_len], ((0, max(0, out_len - y.shape[0])), (0, 0)))
    return torch.from_numpy(np.ascontiguousarray(y.T)).reshape(*shape[:-1], out_len).to(wave.dtype)


def hz_to_mel(hz: torch.Tensor | float) -> torch.Tensor:
    """HTK mel scale: 2595 * log10(1 + f / 700) (1000 Hz -> 1000 mel)."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(hz, dtype=torch.float64) / 700.0)


def mel_to_hz(mel: torch.Tensor | float) -> torch.Tensor:
    """Inverse of hz_to_mel: 700 * (10 ** (m / 2595) - 1)."""
    return 700.0 * (10.0 ** (torch.as_tensor(mel, dtype=torch.float64) / 2595.0) - 1.0)


def mel_filterbank(
    n_mels: int, n_fft: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> torch.Tensor:
    """HTK mel filterbank (n_mels, n_fft // 2 + 1) float32: unit-peak triangles in Hz between mel-spaced points.

    Filter m rises from point m to 1 at its centre (point m + 1) and falls to 0 at point m + 2, with
    n_mels + 2 points equally spaced in HTK mel from f_min to f_max (default Nyquist); no area normalisation
    (torchaudio ``melscale_fbanks(norm=None, mel_scale="htk")``, librosa ``htk=True, norm=None``).
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= {sample_rate / 2}, got f_min={f_min}, f_max={f_max}")
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    points = mel_to_hz(
        torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2, dtype=torch.float64)
    )
    lo, centre, hi = points[:-2, None], points[1:-1, None], points[2:, None]
    rising = (freqs - lo) / (centre - lo)
    falling = (hi - freqs) / (hi - centre)
    return torch.minimum(rising, falling).clamp(min=0).float()


def log_mel(
    wave: torch.Tensor, sample_rate: int, n_mels: int = 64, n_fft: int = 400, hop: int = 160
) -> torch.Tensor:
    """Mono waveform (n,) -> normalised log-mel (n_mels, 1 + n // hop); see the module docstring."""
    window = torch.hann_window(n_fft, dtype=torch.float32)
    spec = torch.stft(
        wave.float(), n_fft, hop, window=window, center=True, pad_mode="constant", return_complex=True
    )
    power = spec.abs().div_(window.sum()).pow_(2)  # (n_fft // 2 + 1, frames)
    mel = mel_filterbank(n_mels, n_fft, sample_rate) @ power
    return (torch.log(mel + LOG_MEL_EPS) - LOG_MEL_MEAN) / LOG_MEL_STD


def preprocess_audio(
    wave: WaveLike,
    sample_rate: int,
    target_rate: int = 16000,
    seconds: float | None = 1.0,
    n_mels: int = 64,
    n_fft: int = 400,
    hop: int = 160,
    max_seconds: float | None = None,
) -> torch.Tensor:
    """One waveform -> normalised log-mel (n_mels, frames), frames = 1 + round(seconds * target_rate) // hop.

    Mixes to mono, resamples `sample_rate` -> `target_rate`, then trims the end or zero-pads to `seconds`
    (None keeps the length; `max_seconds` then trims longer clips only).
    """
    x = resample(to_mono_float(wave), int(sample_rate), int(target_rate))
    if seconds is None and max_seconds is not None:
        x = x[: max(int(round(max_seconds * target_rate)), 1)]
    if seconds is not None:
        n = int(round(seconds * target_rate))
        if n < 1:
            raise DataError(f"seconds={seconds} gives no samples at {target_rate} Hz")
        x = F.pad(x[:n], (0, max(0, n - x.shape[0])))
    return log_mel(x, target_rate, n_mels, n_fft, hop)


def preprocess_audios(
    waves: Sequence[WaveLike], sample_rates: int | Sequence[int], **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of waveforms -> (log-mels (B, n_mels, frames), lengths (B,) int64 valid frames).

    `sample_rates` is one rate for all or one per wave; keyword arguments go to preprocess_audio. With
    ``seconds=None`` clips keep their lengths and are right-padded with silence to the longest; pass `lengths`
    to AudioEncoder so the padding is masked.
    """
    if isinstance(waves, (np.ndarray, torch.Tensor)) and np.ndim(waves) == 1:
        waves = [waves]
    rates = [sample_rates] * len(waves) if isinstance(sample_rates, int) else list(sample_rates)
    if len(rates) != len(waves):
        raise DataError(f"{len(waves)} waveforms but {len(rates)} sample rates")
    mels = [preprocess_audio(w, r, **kwargs) for w, r in zip(waves, rates)]
    lengths = torch.tensor([m.shape[1] for m in mels], dtype=torch.long)
    frames = int(lengths.max())
    silence = (math.log(LOG_MEL_EPS) - LOG_MEL_MEAN) / LOG_MEL_STD
    return torch.stack([F.pad(m, (0, frames - m.shape[1]), value=silence) for m in mels]), lengths


# ---- the VQ tokenizer's front end: clips as spectrogram "images" in [-1, 1] -------------------------------

# The project's log-mel (log_mel above) is (ln(mel + 1e-6) - LOG_MEL_MEAN) / LOG_MEL_STD. Its floor is
# digital silence (ln 1e-6 -> -1.70); mel power 1 (ln 1 = 0 -> +1.75) is above anything a [-1, 1] waveform
# reaches (full-scale sines at 220 Hz - 4 kHz peak at +1.29 to +1.46). That interval maps linearly onto [-1, 1].
SPEC_LOW = (math.log(LOG_MEL_EPS) - LOG_MEL_MEAN) / LOG_MEL_STD  # silence -> -1
SPEC_HIGH = (0.0 - LOG_MEL_MEAN) / LOG_MEL_STD  # mel power 1 -> +1


def normalize_log_mel(log_mels: torch.Tensor) -> torch.Tensor:
    """Project log-mel (any shape) -> [-1, 1]: linear map of [SPEC_LOW, SPEC_HIGH] onto [-1, 1], clamped."""
    return ((log_mels - SPEC_LOW) * (2.0 / (SPEC_HIGH - SPEC_LOW)) - 1.0).clamp(-1.0, 1.0)


def denormalize_log_mel(x: torch.Tensor) -> torch.Tensor:
    """Inverse of normalize_log_mel on [-1, 1]: back to the project's log-mel units (AudioEncoder's input)."""
    return (x.clamp(-1.0, 1.0) + 1.0) * ((SPEC_HIGH - SPEC_LOW) / 2.0) + SPEC_LOW


@dataclass(frozen=True)
class AudioFrontEnd:
    """Waveforms -> (B, 1, n_mels, frames) spectrogram "images" in [-1, 1] for
    `mmfusion.models.vq.VQVAE(in_channels=1, input_shape=front_end.shape)`.

    Each wave is mixed to mono, resampled to `sample_rate`, trimmed or zero-padded to `seconds`, turned into the
    project's log-mel by `preprocess_audios` (25 ms / 10 ms Hann STFT, HTK mel), mapped to [-1, 1] by
    `normalize_log_mel` (silence -> -1), and right-padded with silence (-1) to a multiple of 4 frames so the
    VQ-VAE's two stride-2 convs divide it (0.5 s at 16 kHz: 51 -> 52 frames). `inverse` gives back log-mels;
    no waveform is reconstructed (there is no vocoder: decoded tokens are spectrograms only).
    """

    sample_rate: int = 16000
    seconds: float = 0.5
    n_mels: int = 64
    hop: int = 160

    def __post_init__(self):
        if self.sample_rate < 1000 or self.seconds <= 0 or self.n_mels < 4 or self.n_mels % 4:
            raise ConfigError(
                "AudioFrontEnd needs sample_rate >= 1000, seconds > 0 and n_mels a positive multiple of 4; "
                f"got sample_rate={self.sample_rate}, seconds={self.seconds}, n_mels={self.n_mels}"
            )

    @property
    def frames(self) -> int:
        """Valid log-mel frames of one clip (before padding to a multiple of 4)."""
        return 1 + int(round(self.seconds * self.sample_rate)) // self.hop

    @property
    def shape(self) -> tuple[int, int]:
        """(n_mels, padded frames): the VQVAE `input_shape` to use."""
        return self.n_mels, -(-self.frames // 4) * 4

    def __call__(self, waves: Sequence[WaveLike], sample_rates: int | Sequence[int]) -> torch.Tensor:
        """waves (any PCM dtype, mono or multi-channel) -> (B, 1, n_mels, padded frames) float in [-1, 1]."""
        mels, _ = preprocess_audios(
            waves, sample_rates, target_rate=self.sample_rate, seconds=self.seconds, n_mels=self.n_mels,
            hop=self.hop,
        )  # fmt: skip
        x = normalize_log_mel(mels)
        return F.pad(x, (0, self.shape[1] - x.shape[-1]), value=-1.0)[:, None]

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, n_mels, padded frames) in [-1, 1] -> project log-mels (B, n_mels, frames) (padding dropped)."""
        return denormalize_log_mel(x[:, 0, :, : self.frames])

    def to_dict(self) -> dict[str, Any]:
        return {
            "sample_rate": self.sample_rate,
            "seconds": self.seconds,
            "n_mels": self.n_mels,
            "hop": self.hop,
        }


def _strided_length(lengths: torch.Tensor) -> torch.Tensor:
    """Output length of a kernel-3, stride-2, padding-1 convolution."""
    return (lengths - 1) // 2 + 1


class AudioEncoder(nn.Module):
    """Log-mel -> tokens by a strided Conv1d stem (as Whisper's) and a Transformer or bidirectional GRU.

    mels (batch, n_mels, frames) -> (batch, embed_dim) unnormalised embedding, mean-pooled over valid tokens.
    The stem is a kernel-3 conv then `downsample` kernel-3 stride-2 convs (tokens = frames / 2**downsample);
    activations past each clip's length are zeroed before every conv, so a padded clip encodes exactly as the
    same clip alone. The Transformer adds learned positions (up to `max_frames` input frames); the GRU does not.
    """

    def __init__(
        self,
        n_mels: int,
        width: int,
        depth: int,
        heads: int,
        embed_dim: int,
        max_frames: int = 101,
        downsample: int = 2,
        mlp_ratio: float = 4.0,
        backbone: str = "transformer",
    ):
        super().__init__()
        if backbone not in ("transformer", "gru"):
            raise ValueError(f"backbone must be 'transformer' or 'gru', got {backbone!r}")
        if backbone == "gru" and width % 2:
            raise ValueError(f"the bidirectional GRU needs an even width, got {width}")
        self.n_mels, self.max_frames, self.backbone = n_mels, max_frames, backbone
        self.stem = nn.ModuleList(
            [nn.Conv1d(n_mels, width, 3, padding=1)]
            + [nn.Conv1d(width, width, 3, stride=2, padding=1) for _ in range(downsample)]
        )
        max_tokens = max_frames
        for _ in range(downsample):
            max_tokens = (max_tokens - 1) // 2 + 1
        if backbone == "transformer":
            self.positional_embedding = nn.Parameter(torch.randn(max_tokens, width) * width**-0.5)
            self.ln_pre = nn.LayerNorm(width)
            self.transformer = Transformer(width, depth, heads, mlp_ratio)
            init_transformer_(self.transformer, width, depth)
        else:
            self.gru = nn.GRU(width, width // 2, num_layers=depth, batch_first=True, bidirectional=True)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=width**-0.5)

    def token_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid input frames (batch,) -> valid tokens (batch,)."""
        for conv in self.stem:
            if conv.stride[0] == 2:
                lengths = _strided_length(lengths)
        return lengths

    def forward_tokens(self, mels: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """mels (batch, n_mels, frames), lengths (batch,) valid frames or None -> tokens (batch, tokens, width).

        Tokens at or past `token_lengths(lengths)` are padding (zero for the GRU, unspecified otherwise).
        """
        if mels.ndim != 3 or mels.shape[1] != self.n_mels:
            raise DataError(
                f"log-mels have shape {tuple(mels.shape)}; expected (batch, {self.n_mels}, frames)"
            )
        if mels.shape[2] > self.max_frames:
            raise DataError(
                f"audio has {mels.shape[2]} frames; the encoder's max_frames is {self.max_frames}"
            )
        b, _, frames = mels.shape
        if lengths is None:
            lengths = torch.full((b,), frames, dtype=torch.long, device=mels.device)
        elif lengths.shape != (b,) or bool((lengths < 1).any() or (lengths > frames).any()):
            raise DataError(
                f"lengths must be ({b},) valid frame counts in [1, {frames}], got {lengths.tolist()}"
            )
        x, n = mels, lengths
        for conv in self.stem:
            x = F.gelu(conv(x * (torch.arange(x.shape[2], device=x.device) < n[:, None])[:, None]))
            if conv.stride[0] == 2:
                n = _strided_length(n)
        x = x.transpose(1, 2)  # (batch, tokens, width)
        valid = torch.arange(x.shape[1], device=x.device) < n[:, None]  # (batch, tokens), True = real
        if self.backbone == "gru":
            packed = nn.utils.rnn.pack_padded_sequence(x, n.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = self.gru(packed)
            return nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]
        x = self.ln_pre(x + self.positional_embedding[: x.shape[1]].to(x.dtype))
        attn_mask = None if bool(valid.all()) else valid[:, None, None, :]  # True = may attend
        return self.transformer(x, attn_mask=attn_mask)

    def forward(self, mels: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.forward_tokens(mels, lengths)
        if lengths is None:
            pooled = tokens.mean(dim=1)
        else:
            n = self.token_lengths(lengths.to(tokens.device))
            valid = (torch.arange(tokens.shape[1], device=tokens.device) < n[:, None]).to(tokens.dtype)
            pooled = (tokens * valid[..., None]).sum(dim=1) / n[:, None].to(tokens.dtype)
        return self.proj(self.ln_post(pooled))


class AudioEncoderConfig(EncoderConfigBase):
    """AudioEncoder over log-mels (n_mels, frames <= max_frames; 100 frames per second)."""

    kind: Literal["audio"] = "audio"
    n_mels: int = Field(64, ge=1)
    max_frames: int = Field(101, ge=1)
    downsample: int = Field(2, ge=0, le=8)
    backbone: Literal["transformer", "gru"] = "transformer"


def build_audio_encoder(cfg: AudioEncoderConfig) -> AudioEncoder:
    w = cfg.width
    return AudioEncoder(
        cfg.n_mels, w, cfg.depth, cfg.heads, w, cfg.max_frames, cfg.downsample, cfg.mlp_ratio, cfg.backbone
    )


def decode_audio(src: Any) -> tuple[np.ndarray, int]:
    """A WAV / FLAC / OGG path, file object or bytes -> (float32 mono samples in [-1, 1], sample rate): channels
    averaged. MediaError("corrupt_audio") when it cannot be read (chained to soundfile's error), has no samples
    (problem NO_SAMPLES) or has NaN / infinite samples (NOT_FINITE)."""
    import soundfile as sf

    try:
        data, sr = sf.read(as_source(src), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise MediaError("corrupt_audio", f"cannot decode audio: {e}") from e
    if data.shape[0] == 0:
        raise MediaError("corrupt_audio", NO_SAMPLES)
    if not np.isfinite(data).all():
        raise MediaError("corrupt_audio", NOT_FINITE)
    return np.clip(data.mean(axis=1, dtype=np.float32), -1.0, 1.0), int(sr)


def read_audio(sample: Mapping[str, Any], field: str) -> tuple[Any, int] | None:
    """A sample's (wave, sample rate) of `field` (its rate is `<field>_sr`), or None when absent."""
    wave = sample.get(field)
    if wave is None:
        return None
    rate = sample.get(f"{field}_sr")
    if not rate:
        raise DataError(f"sample {sample.get('id', '?')}: has {field} but no {field}_sr (its sample rate)")
    return wave, int(rate)


def audio_placeholder(cfg: Any) -> tuple[np.ndarray, int]:
    return np.zeros(1600, dtype=np.float32), 16000


def preprocess_clips(clips: Sequence[tuple[Any, int]], cfg: Any, tokenizer: Any = None) -> torch.Tensor:
    """(wave, rate) pairs -> log-mels (B, n_mels, frames): resampled to 16 kHz, clips longer than the encoder's
    max_frames cut, the batch right-padded with silence to its longest clip."""
    max_seconds = max(cfg.max_frames - 1, 1) / 100.0  # hop 160 at 16 kHz: 100 frames per second
    waves, rates = [c[0] for c in clips], [c[1] for c in clips]
    return preprocess_audios(waves, rates, seconds=None, max_seconds=max_seconds, n_mels=cfg.n_mels)[0]


AUDIO_EXTS = ("wav", "flac", "ogg")

SPEC = ModalitySpec(
    name="audio",
    encoder_config=AudioEncoderConfig,
    build_encoder=build_audio_encoder,
    preprocess=preprocess_clips,
    placeholder=audio_placeholder,
    decode=decode_audio,
    extensions=AUDIO_EXTS,
    read=read_audio,
)
