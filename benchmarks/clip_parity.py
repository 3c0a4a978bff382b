"""OpenCLIP -> mmfusion import parity, checked against the real open_clip (runs in .venv-bench: `make bench-env`).

For each architecture: build a random-init open_clip model (open_clip.create_model on a model config, no
pretrained download), save its state dict as safetensors with an open_clip_config.json, import it with
`mmfusion.models.clip_io.import_openclip`, and print the max |difference| of the L2-normalised image and text
embeddings (open_clip's encode_image / encode_text vs mmfusion's encode_image / encode_text) and of the logit
scale. Then export the mmfusion model back (`export_openclip`), load that state dict strictly into a fresh
open_clip model of the same config, and compare again.

Text goes through each library's own tokenizer: open_clip.tokenize vs the CLIP tokenizer mmfusion keeps (a
tokenizer.json built here from open_clip's bpe_simple_vocab_16e6.txt.gz with the pipeline of transformers'
CLIPTokenizer), so the token ids are compared too.

    make bench-clip-parity
    .venv-bench/bin/python benchmarks/clip_parity.py --archs tiny ViT-B-32 ViT-B-32-quickgelu
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

TINY = {  # a small custom config: 32 px images, patch 8, 2 layers per tower, OpenAI's 49,408-token vocabulary
    "embed_dim": 24,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
CAPTIONS = [
    "a photo of a cat",
    "Two small red circles, left of a large BLUE square!",
    "an astronaut riding a horse on the moon at night",
    "ok",
    " ".join(["a very long caption that is cut at the context length"] * 12),
]


def write_clip_tokenizer(folder: Path) -> None:
    """tokenizer.json of OpenAI's CLIP BPE (open_clip's vocabulary file), as transformers' CLIPTokenizer builds it."""
    from open_clip.tokenizer import SimpleTokenizer
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    simple = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(t, t): i for t, i in simple.encoder.items()}
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            unk_token="<|endoftext|>",
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pattern = (
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.enable_padding(pad_id=0, pad_token=simple.decoder[0])  # open_clip pads with id 0
    tok.save(str(folder / "tokenizer.json"))


def create_openclip(arch: str, folder: Path):
    """A random open_clip model and its model config (the built-in one, or TINY registered from a JSON file)."""
    import open_clip

    if arch == "tiny":
        (folder / "cfg").mkdir()
        (folder / "cfg" / "mmfusion-tiny.json").write_text(json.dumps(TINY))
        open_clip.add_model_config(folder / "cfg" / "mmfusion-tiny.json")
        arch = "mmfusion-tiny"
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None).eval()
    with torch.no_grad():  # open_clip initialises LayerNorms to 1 / 0: randomise them so they count
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith(("ln_", "visual.ln_")):
                p.add_(torch.randn_like(p) * 0.1)
    return model, open_clip.get_model_config(arch)


def compare(oc, mm, pixels: torch.Tensor, mean, std) -> dict[str, float]:
    import open_clip

    ids = open_clip.tokenize(CAPTIONS, context_length=oc.context_length)
    mm_ids = mm.tokenizer.encode(CAPTIONS, pad_to=ids.shape[1])
    with torch.no_grad():
        oc_img = F.normalize(oc.encode_image(pixels), dim=-1)
        oc_txt = F.normalize(oc.encode_text(ids), dim=-1)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    mm_img = mm.encode_image(
        (pixels * s + m) * 2 - 1
    )  # mmfusion's [-1, 1] scale; the tower normalises itself
    mm_txt = mm.encode_text(CAPTIONS)
    return {
        "token_ids_equal": bool(torch.equal(ids, mm_ids)),
        "image": (oc_img - mm_img).abs().max().item(),
        "text": (oc_txt - mm_txt).abs().max().item(),
        "logit_scale": abs(oc.logit_scale.item() - mm.logit_scale.item()),
    }


def run(arch: str, batch: int) -> dict:
    import open_clip
    from safetensors.torch import load_file, save_file

    from mmfusion.models.clip_io import export_openclip, import_openclip

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        oc, model_cfg = create_openclip(arch, folder)
        state = {k: v.contiguous() for k, v in oc.state_dict().items()}
        save_file(state, str(folder / "open_clip_model.safetensors"))
        pre = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}
        (folder / "open_clip_config.json").write_text(
            json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pre})
        )
        write_clip_tokenizer(folder)
        mm, assumed = import_openclip(folder)
        size = mm.image_size
        pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
        result = {"arch": arch, "params": sum(p.numel() for p in oc.parameters()), "assumed": assumed}
        result["import"] = compare(oc, mm, pixels, pre["mean"], pre["std"])
        out = export_openclip(mm, folder / "export")
        fresh = open_clip.create_model("mmfusion-tiny" if arch == "tiny" else arch, pretrained=None).eval()
        fresh.load_state_dict(load_file(str(out / "open_clip_model.safetensors")), strict=True)
        result["export"] = compare(fresh, mm, pixels, pre["mean"], pre["std"])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["tiny", "ViT-B-32"], help="open_clip model names, or tiny")
    p.add_argument("--batch", type=int, default=4, help="images per comparison (default 4)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import open_clip

    print(f"torch {torch.__version__}, open_clip {open_clip.__version__}")
    print("| architecture | parameters | token ids equal | max abs diff image | max abs diff text | logit scale | "
          "export -> open_clip: image / text | seconds |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for arch in args.archs:
        r = run(arch, args.batch)
        results.append(r)
        i, e = r["import"], r["export"]
        print(
            f"| {arch} | {r['params'] / 1e6:.1f} M | {i['token_ids_equal']} | {i['image']:.2e} | {i['text']:.2e} | "
            f"{i['logit_scale']:.1e} | {e['image']:.2e} / {e['text']:.2e} | {r['seconds']} |"
        )
        if r["assumed"]:
            print(f"  (assumed: {'; '.join(r['assumed'])})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
