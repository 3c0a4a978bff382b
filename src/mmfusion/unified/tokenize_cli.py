"""`mmfusion tokenize train|encode|decode`: VQ tokenizers for images and audio spectrograms on the command line.

An audio tokenizer folder holds `frontend.json` ({"modality": "audio", sample_rate, seconds, n_mels, hop}: the
AudioFrontEnd that turns waveforms into its input) beside config.json; a folder without it is an image one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..modalities.base import MediaError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
FRONTEND_FILE = "frontend.json"
# per-modality defaults of `tokenize train` (the audio ones are benchmarks/vq.py --modality audio's)
TRAIN_DEFAULTS = {
    "image": {"codebook_size": 256, "code_dim": 32, "channels": 32, "dead_sampling": "error"},
    "audio": {"codebook_size": 128, "code_dim": 16, "channels": 16, "dead_sampling": "uniform"},
}
# per-kind image recipes of benchmarks/vq.py (docs/unified.md, "VQ tokenizers"): (backend, commitment,
# FSQ noise dropout); audio always uses ("mmfusion", 0.25, 0.0), the audio calibration's settings
IMAGE_RECIPES = {
    "vq": ("mmfusion", 0.1, 0.0),
    "rvq": ("vqtorch", 0.25, 0.0),
    "fsq": ("vqtorch", 0.25, 0.5),
}


def add_tokenize_commands(sub: argparse._SubParsersAction) -> None:
    """Register `mmfusion tokenize ...`."""
    p = sub.add_parser(
        "tokenize",
        help="VQ tokenizers: train, encode images/audio to codes, decode codes to images/spectrograms",
        description="Discrete image and audio-spectrogram tokenizers (VQ-VAE with EMA VQ, residual VQ or FSQ; "
        "mmfusion.models.vq; audio front end: mmfusion.modalities.audio.AudioFrontEnd).",
    )
    tsub = p.add_subparsers(dest="tokenize_command", required=True, metavar="TOKENIZE_COMMAND")

    t = tsub.add_parser(
        "train",
        help="train a VQ-VAE and save it",
        description="Train a VQ-VAE tokenizer on synthetic-world images (default) or on your images "
        '(--images: a folder of PNG/JPEG files or a JSONL manifest with an "image" field); with --modality '
        "audio, on synthetic-world 0.5 s clips turned into 64-mel log-mel spectrograms in [-1, 1] (or on "
        "--audio: a folder of WAV/FLAC/OGG files). Saves it to --out (config.json + model.safetensors + "
        "metrics.json, + frontend.json for audio) and prints held-out codebook usage, perplexity and "
        "reconstruction PSNR.",
    )
    t.add_argument("--out", required=True, help="folder to write the tokenizer to")
    t.add_argument("--modality", default="image", choices=["image", "audio"], help="default image")
    t.add_argument(
        "--n-mels", type=int, help="audio: mel bands of the spectrogram, a multiple of 4 (default 64)"
    )
    t.add_argument("--hop", type=int, help="audio: STFT hop in samples (default 160 = 10 ms at 16 kHz)")
    t.add_argument(
        "--clip-seconds", type=float, help="audio: clip length the front end cuts or pads to (default 0.5)"
    )
    t.add_argument("--sample-rate", type=int, help="audio: rate clips are resampled to (default 16000)")
    t.add_argument("--kind", default="vq", choices=["vq", "rvq", "fsq"], help="quantizer (default vq)")
    t.add_argument("--steps", type=int, default=500, help="training steps (default 500)")
    t.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    t.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    t.add_argument(
        "--codebook-size", type=int, help="codes per codebook (vq/rvq; default 256 image, 128 audio)"
    )
    t.add_argument("--code-dim", type=int, help="code vector size (vq/rvq; default 32 image, 16 audio)")
    t.add_argument("--channels", type=int, help="conv width (default 32 image, 16 audio)")
    t.add_argument("--rvq-levels", type=int, default=4, help="residual levels for --kind rvq (default 4)")
    t.add_argument("--fsq-levels", default="8,6,5", help="comma-separated FSQ levels (default 8,6,5)")
    t.add_argument(
        "--dead-threshold", type=float, default=3.0, help="dead-code EMA count threshold (default 3)"
    )
    t.add_argument(
        "--backend", choices=["mmfusion", "vqtorch"],
        help="quantizers: mmfusion's own, or the vector-quantize-pytorch library's (default: vqtorch for "
        "image rvq and fsq, mmfusion otherwise: the calibrated recipes of benchmarks/vq.py)",
    )  # fmt: skip
    t.add_argument(
        "--fsq-noise-dropout", type=float,
        help="vqtorch backend, fsq: fraction of rounded values replaced by noise in training (default 0.5 "
        "for image fsq on vqtorch, else 0)",
    )  # fmt: skip
    t.add_argument(
        "--dead-sampling", choices=["uniform", "error"],
        help="mmfusion backend, vq/rvq: dead codes re-seeded from uniformly drawn or error-weighted batch "
        "vectors (default error image, uniform audio: the calibrated recipes of benchmarks/vq.py)",
    )  # fmt: skip
    t.add_argument(
        "--commitment", type=float, help="commitment loss weight (vq/rvq; default 0.1 image vq, else 0.25)"
    )
    t.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32)")
    t.add_argument(
        "--images", help="folder of PNG/JPEG files or a .jsonl manifest (default: synthetic world)"
    )
    t.add_argument(
        "--audio", help="--modality audio: folder of WAV/FLAC/OGG files (default: synthetic world)"
    )
    t.add_argument(
        "--train-images", type=int, default=2048, help="synthetic training images or clips (default 2048)"
    )
    t.add_argument(
        "--eval-images", type=int, default=256, help="held-out images or clips for the metrics (default 256)"
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    t.set_defaults(func=cmd_tokenize_train)

    e = tsub.add_parser(
        "encode",
        help="images or audio -> codes (.json or .npy)",
        description="Encode images (PNG/JPEG files or folders of them) or, with an audio tokenizer, audio "
        "(WAV/FLAC/OGG files or folders; mixed to mono, resampled, cut or padded to the tokenizer's clip length). "
        '--out codes.json writes {"shape", "images": [{"id", "path", "codes"}]}; --out codes.npy writes '
        "an int array (N, h, w) ((N, h, w, levels) for rvq) in the sorted order of the inputs.",
    )
    e.add_argument("--tokenizer", required=True, help="a folder from `mmfusion tokenize train`")
    e.add_argument("images", nargs="+", help="image (or audio) files or folders")
    e.add_argument("--out", required=True, help="codes.json or codes.npy")
    e.set_defaults(func=cmd_tokenize_encode)

    d = tsub.add_parser(
        "decode",
        help="codes -> PNG images (audio: log-mel .npy + PNG)",
        description="Decode codes written by `mmfusion tokenize encode` (.json or .npy) to PNGs in --out-dir. "
        "With an audio tokenizer each clip gives ID.npy, its log-mel spectrogram (n_mels, frames) float32 in "
        "the units of mmfusion.modalities.audio.log_mel, and ID.png (low frequencies at the bottom). No "
        "waveform is reconstructed (there is no vocoder).",
    )
    d.add_argument("--tokenizer", required=True, help="a folder from `mmfusion tokenize train`")
    d.add_argument("codes", help="codes.json or codes.npy")
    d.add_argument("--out-dir", required=True, help="folder for the PNGs")
    d.set_defaults(func=cmd_tokenize_decode)


def _threads(n: int) -> None:
    import torch

    if n < 0:
        raise ConfigError(f"--threads must be >= 0; got {n}")
    if n:
        torch.set_num_threads(n)


def load_images(paths: list[tuple[str, Any]], size: int):
    """(id, path or file object) pairs -> float images (N, 3, size, size) in [-1, 1] (the VQVAE's input range),
    read by the image modality's decoder. DataError "cannot read image P: why" when one cannot be decoded."""
    import torch

    from ..modalities.image import decode_image, preprocess_image

    out = []
    for _, p in paths:
        try:
            out.append(preprocess_image(decode_image(p), size))
        except MediaError as e:
            raise DataError(f"cannot read image {p}: {e.__cause__ or e.problem}") from None
    return torch.stack(out)


def list_image_inputs(items: list[str]) -> list[tuple[str, Path]]:
    """(id, path) of every image named: files, folders (sorted, recursive) and JSONL manifests."""
    from .image_files import IMAGE_SUFFIXES, list_images

    out: list[tuple[str, Path]] = []
    for item in items:
        p = Path(item)
        if p.is_dir() or p.suffix == ".jsonl":
            out += [(i, path) for i, path, _ in list_images(p)]
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(
                    f"{p}: expected an image ({', '.join(sorted(IMAGE_SUFFIXES))}), a folder or .jsonl"
                )
            out.append((p.stem, p))
        else:
            raise DataError(f"{p}: no such file or folder")
    return out


def list_audio_inputs(items: list[str]) -> list[tuple[str, Path]]:
    """(id, path) of every audio file named: files and folders (sorted, recursive)."""
    out: list[tuple[str, Path]] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES)
            out += [(str(f.relative_to(p).with_suffix("")), f) for f in found]
        elif p.is_file():
            if p.suffix.lower() not in AUDIO_SUFFIXES:
                raise DataError(f"{p}: expected an audio file ({', '.join(AUDIO_SUFFIXES)}) or a folder")
            out.append((p.stem, p))
        else:
            raise DataError(f"{p}: no such file or folder")
    return out


def load_audios(paths: list[tuple[str, Any]], frontend):
    """(id, path or file object) pairs -> AudioFrontEnd spectrograms (N, 1, n_mels, frames) in [-1, 1], read by
    the audio modality's decoder (channels averaged). DataError "cannot read audio P: why" (not decodable),
    "audio P has no samples", or "audio contains NaN or infinite samples"; `serve` maps these onto its HTTP
    errors."""
    from ..modalities.audio import NO_SAMPLES, decode_audio

    waves, rates = [], []
    for _, p in paths:
        try:
            wave, sr = decode_audio(p)
        except MediaError as e:
            if e.problem == NO_SAMPLES:
                raise DataError(f"audio {p} has no samples") from None
            if e.__cause__ is not None:  # soundfile could not read it
                raise DataError(f"cannot read audio {p}: {e.__cause__}") from None
            raise DataError(e.problem) from None
        waves.append(wave)
        rates.append(sr)
    return frontend(waves, rates)


def _synthetic_audio(world, split: str, n: int, frontend):
    from ..data.synthetic import make_split

    samples = make_split(world, split, n, ("audio",), True)
    return frontend([s["audio"] for s in samples], [s["audio_sr"] for s in samples])


def cmd_tokenize_train(args) -> int:
    import torch

    from ..data.synthetic import SyntheticWorld, WorldConfig, make_split
    from ..modalities.audio import AudioFrontEnd
    from ..models.vq import VQVAE
    from .train import evaluate_vqvae, images_to_tensor, train_vqvae

    _threads(args.threads)
    audio = args.modality == "audio"
    if audio and args.images:
        raise ConfigError("--images is for --modality image; give audio files with --audio")
    if not audio and args.audio:
        raise ConfigError("--audio needs --modality audio")
    for k, v in TRAIN_DEFAULTS[args.modality].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    backend, commitment, noise = ("mmfusion", 0.25, 0.0) if audio else IMAGE_RECIPES[args.kind]
    args.backend = backend if args.backend is None else args.backend
    args.commitment = commitment if args.commitment is None else args.commitment
    if args.fsq_noise_dropout is None:
        args.fsq_noise_dropout = noise if args.backend == "vqtorch" else 0.0
    if args.backend == "mmfusion" and args.fsq_noise_dropout:
        raise ConfigError("--fsq-noise-dropout needs --backend vqtorch")
    try:
        fsq = [int(v) for v in args.fsq_levels.split(",")]
    except ValueError:
        raise ConfigError(f"--fsq-levels must be comma-separated integers; got {args.fsq_levels!r}") from None
    for name in ("steps", "batch", "train_images", "eval_images"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    frontend_flags = {"n_mels": args.n_mels, "hop": args.hop, "seconds": args.clip_seconds,
                      "sample_rate": args.sample_rate}  # fmt: skip
    given_flags = {k: v for k, v in frontend_flags.items() if v is not None}
    if given_flags and not audio:
        raise ConfigError("--n-mels, --hop, --clip-seconds and --sample-rate need --modality audio")
    if given_flags.get("hop", 1) < 1:
        raise ConfigError(f"--hop must be >= 1; got {args.hop}")
    frontend = AudioFrontEnd(**given_flags) if audio else None
    if args.images or args.audio:
        given = args.audio or args.images
        if audio:
            imgs = load_audios(list_audio_inputs([given]), frontend)
        else:
            imgs = load_images(list_image_inputs([given]), args.image_size)
        if imgs.shape[0] < 2:
            flag = "--audio" if audio else "--images"
            raise DataError(f"{flag} {given}: need at least 2 inputs (one held out); got {imgs.shape[0]}")
        n_eval = max(1, min(args.eval_images, imgs.shape[0] // 10))
        perm = torch.randperm(imgs.shape[0], generator=torch.Generator().manual_seed(args.seed))
        held, train = imgs[perm[:n_eval]], imgs[perm[n_eval:]]
        source = f"{given} ({train.shape[0]} train / {n_eval} held out)"
    elif audio:
        world = SyntheticWorld(WorldConfig(seed=args.seed))
        train = _synthetic_audio(world, "train", args.train_images, frontend)
        held = _synthetic_audio(world, "test", args.eval_images, frontend)
        source = (
            f"synthetic world seed {args.seed} ({args.train_images} train / {args.eval_images} test clips)"
        )
    else:
        world = SyntheticWorld(WorldConfig(seed=args.seed, image_size=args.image_size))
        train = images_to_tensor(
            [s["image"] for s in make_split(world, "train", args.train_images, ("image",), True)]
        )
        held = images_to_tensor(
            [s["image"] for s in make_split(world, "test", args.eval_images, ("image",), True)]
        )
        source = (
            f"synthetic world seed {args.seed} ({args.train_images} train / {args.eval_images} test images)"
        )
    torch.manual_seed(args.seed)
    model = VQVAE(
        image_size=args.image_size,
        channels=args.channels,
        codebook_size=args.codebook_size,
        quantizer=args.kind,
        code_dim=args.code_dim,
        rvq_levels=args.rvq_levels,
        fsq_levels=fsq,
        dead_code_threshold=args.dead_threshold,
        commitment=args.commitment,
        backend=args.backend,
        **(
            dict(dead_code_sampling=args.dead_sampling)
            if args.backend == "mmfusion"
            else dict(fsq_noise_dropout=args.fsq_noise_dropout if args.kind == "fsq" else 0.0)
        ),
        **(dict(in_channels=1, input_shape=frontend.shape) if audio else {}),
    )
    train_vqvae(model, train, args.steps, args.batch, args.lr, args.seed, progress=True)
    metrics = evaluate_vqvae(model, held)
    out = model.save_pretrained(args.out)
    (Path(out) / "metrics.json").write_text(json.dumps({"source": source, **metrics}, indent=2) + "\n")
    if audio:
        meta = {"modality": "audio", **frontend.to_dict()}
        (Path(out) / FRONTEND_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    print(f"trained {args.kind} {args.modality} tokenizer ({args.backend} backend) on {source}: {out}")
    print(
        f"held-out: usage {metrics['usage']:.3f}, perplexity {metrics['perplexity']:.1f} "
        f"(normalised {metrics['normalized_perplexity']:.3f}), PSNR {metrics['psnr']:.2f} dB"
        f"{' (normalised log-mel)' if audio else ''}, K={metrics['codebook_size']}, "
        f"{metrics['tokens_per_image']} tokens/{'clip' if audio else 'image'}"
    )
    return 0


def _tokenizer(path: str):
    """(VQVAE, AudioFrontEnd or None for an image tokenizer) of a `tokenize train` folder."""
    from ..modalities.audio import AudioFrontEnd
    from ..models.vq import VQVAE

    if not (Path(path) / "config.json").is_file():
        raise DataError(
            f"--tokenizer {path}: not a tokenizer folder (make one with `mmfusion tokenize train`)"
        )
    frontend = None
    meta_path = Path(path) / FRONTEND_FILE
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if meta.pop("modality") != "audio":
                raise ValueError("modality is not 'audio'")
            frontend = AudioFrontEnd(**meta)
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{meta_path}: not an audio front-end file ({err})") from None
    return VQVAE.from_pretrained(path), frontend


def cmd_tokenize_encode(args) -> int:
    import numpy as np

    from .train import encode_images

    out = Path(args.out)
    if out.suffix not in (".json", ".npy"):
        raise ConfigError(f"--out {out}: expected a .json or .npy file name")
    model, frontend = _tokenizer(args.tokenizer)
    if frontend is not None:
        inputs = list_audio_inputs(args.images)
        codes = encode_images(model, load_audios(inputs, frontend))
    else:
        inputs = list_image_inputs(args.images)
        codes = encode_images(model, load_images(inputs, model.image_size))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, codes.numpy().astype(np.int32))
    else:
        rows = [{"id": i, "path": str(p), "codes": c.tolist()} for (i, p), c in zip(inputs, codes)]
        out.write_text(json.dumps({"shape": list(codes.shape[1:]), "images": rows}) + "\n")
    what = "clips" if frontend is not None else "images"
    print(f"encoded {len(inputs)} {what} to {tuple(codes.shape[1:])} codes each: {out}")
    return 0


def cmd_tokenize_decode(args) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from .train import tensor_to_images

    model, frontend = _tokenizer(args.tokenizer)
    src = Path(args.codes)
    if not src.is_file():
        raise DataError(f"{src}: no such codes file")
    if src.suffix == ".npy":
        arr = np.load(src, allow_pickle=False)
        ids = [f"{i:05d}" for i in range(len(arr))]
    elif src.suffix == ".json":
        try:
            rows = json.loads(src.read_text())["images"]
            arr = np.array([r["codes"] for r in rows])
            ids = [str(r.get("id", f"{i:05d}")) for i, r in enumerate(rows)]
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{src}: not a codes file from `mmfusion tokenize encode` ({err})") from None
    else:
        raise DataError(f"{src}: expected a .json or .npy codes file")
    expected = model.code_shape
    if arr.ndim != len(expected) + 1 or tuple(arr.shape[1:]) != expected:
        raise DataError(
            f"{src}: codes have shape {tuple(arr.shape[1:])} per image; this tokenizer needs {expected}"
        )
    if arr.size and (arr.min() < 0 or arr.max() >= model.codebook_size):
        raise DataError(
            f"{src}: codes must lie in [0, {model.codebook_size}); got [{arr.min()}, {arr.max()}]"
        )
    decoded = model.decode(torch.from_numpy(arr.astype(np.int64)))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if frontend is not None:
        mels = frontend.inverse(decoded).numpy().astype(np.float32)  # (N, n_mels, frames) log-mel
        grey = ((decoded[:, 0, :, : frontend.frames].flip(1) + 1) * 127.5).round().byte().numpy()
        for name, mel, im in zip(ids, mels, grey):
            np.save(out / f"{Path(name).name}.npy", mel)
            Image.fromarray(im).save(out / f"{Path(name).name}.png")
        print(f"decoded {len(mels)} log-mel spectrograms {mels.shape[1:]} (.npy + .png; no waveform): {out}")
        return 0
    images = tensor_to_images(decoded)
    for name, im in zip(ids, images):
        Image.fromarray(im).save(out / f"{Path(name).name}.png")
    print(f"decoded {len(images)} images: {out}")
    return 0
