"""ONNX export of a contrastive model's two towers (I1), checked against PyTorch with onnxruntime.

Each tower is exported with its L2 normalisation, so an ONNX session returns the same embedding as
`ContrastiveModel.embed_text_ids` / `embed_image_tensor`. The safetensors format needs no exporter:
it is `ContrastiveModel.save_pretrained`.

We use the torch.export-based exporter (`dynamo=True`, the default since torch 2.9, needs `onnxscript`):
the TorchScript one is deprecated, and it traces the text encoder's context-length check into a
constant, where torch.export keeps it as a bound on the dynamic `length` axis.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..models.contrastive import ContrastiveModel

OPSET = 18
ONNX_FILES = {"text": "text_encoder.onnx", "image": "image_encoder.onnx"}
INPUT_NAMES = {"text": "ids", "image": "images"}
OUTPUT_NAME = "unit_embedding"  # not "embedding": the exporter already names the aten::embedding output so


class Normalised(nn.Module):
    """An encoder followed by L2 normalisation: (batch, ...) -> (batch, embed_dim) unit vectors."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(x), dim=-1)


def resolve_model(model_dir_or_model: str | Path | ContrastiveModel) -> ContrastiveModel:
    """A ContrastiveModel as given, or loaded from a saved model folder (or a run directory)."""
    if isinstance(model_dir_or_model, ContrastiveModel):
        return model_dir_or_model
    path = Path(model_dir_or_model)
    if not path.is_dir():
        raise CheckpointError(
            f"model folder {path} not found: pass a folder written by save_pretrained or a run directory"
        )
    from .. import load_model

    return load_model(path)


def example_inputs(
    model: ContrastiveModel, batch: int, length: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random valid inputs: right-padded ids (batch, length) ending in [EOT] with varied real lengths,
    and images (batch, 3, H, W) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    tok = model.tokenizer
    ids = torch.randint(3, tok.vocab_size, (batch, length), generator=g)
    real = torch.randint(1, length + 1, (batch,), generator=g)
    real[0] = length  # one row fills the whole length
    pos = torch.arange(length)
    ids[pos[None] == (real - 1)[:, None]] = tok.eot_id
    ids[pos[None] >= real[:, None]] = tok.pad_id
    size = model.image_size
    images = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    return {"text": ids, "image": images}


def export_onnx(
    model_dir_or_model: str | Path | ContrastiveModel, out_dir: str | Path, opset: int = OPSET
) -> dict[str, Path]:
    """Write text_encoder.onnx (ids (batch, length) int64 -> (batch, D)) and image_encoder.onnx
    (images (batch, 3, H, W) float32 -> (batch, D)) into `out_dir`; both output L2-normalised embeddings.

    `batch` is dynamic in both, `length` in the text encoder (1 .. context_length). Returns {"text", "image"} -> path.
    """
    if opset < 17:
        raise ValueError(f"opset {opset} is too old: LayerNormalization needs opset >= 17")
    model = resolve_model(model_dir_or_model)
    require("onnx", "onnxscript")
    if model.device.type != "cpu":
        model = copy.deepcopy(model).cpu()
    model = model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = model.text_encoder.context_length
    # example batch and length of 2+: torch.export specialises a dimension seen as 0 or 1
    ex = example_inputs(model, batch=2, length=min(4, ctx))
    batch = torch.export.Dim("batch", min=1)
    dims = {"text": {0: batch, 1: torch.export.Dim("length", min=1, max=ctx)}, "image": {0: batch}}
    towers = {"text": model.text_encoder, "image": model.image_encoder}
    paths = {}
    for name, encoder in towers.items():
        path = out / ONNX_FILES[name]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch-internal pytree deprecations
            torch.onnx.export(
                Normalised(encoder).eval(),
                (ex[name],),
                str(path),
                input_names=[INPUT_NAMES[name]],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"x": dims[name]},
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        strip_debug_metadata(path)
        paths[name] = path
    return paths


def strip_debug_metadata(path: Path) -> None:
    """Drop the exporter's per-node debug records (FX node, module path, source stack trace): they
    outweigh the weights of a small model and expose local source paths; inference never reads them."""
    import onnx

    proto = onnx.load(str(path))
    for node in proto.graph.node:
        del node.metadata_props[:]
    onnx.save(proto, str(path))


def require(*packages: str) -> None:
    """Raise ImportError naming the install command when an optional serving package is missing."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportError(f"{', '.join(missing)} not installed: pip install 'mmfusion[serve]'")


def onnx_session(path: str | Path, threads: int = 1):
    """An onnxruntime CPU InferenceSession for one exported encoder."""
    require("onnxruntime")
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ONNX file {path} not found")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxEncoders:
    """ONNX sessions behind the embedding verbs of ContrastiveModel, so evaluation code
    (`eval.retrieval.embed_dataset`) runs unchanged on an exported (or quantized) model."""

    def __init__(self, model: ContrastiveModel, paths: dict[str, Path], threads: int = 1):
        self.tokenizer = model.tokenizer
        self.image_size = model.image_size
        self.sessions = {name: onnx_session(p, threads) for name, p in paths.items()}

    def eval(self) -> OnnxEncoders:
        return self

    def run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        (y,) = self.sessions[name].run(None, {INPUT_NAMES[name]: x.cpu().numpy()})
        return torch.from_numpy(y)

    def embed_text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.run("text", ids.long())

    def embed_image_tensor(self, images: torch.Tensor) -> torch.Tensor:
        return self.run("image", images.float())


@torch.no_grad()
def compare_onnx(
    model: ContrastiveModel,
    paths: dict[str, Path],
    batch_sizes: Sequence[int] = (1, 5),
    lengths: Sequence[int] | None = None,
    seed: int = 1,
) -> dict[str, dict[str, Any]]:
    """Embeddings of PyTorch and of the ONNX files on fresh random inputs (every batch size x text length):
    {"text": {"torch": (N, D), "onnx": (N, D)}, "image": {...}} with all cases stacked."""
    model = model.eval()
    onnx = OnnxEncoders(model, paths)
    ctx = model.text_encoder.context_length
    lengths = lengths or sorted({min(3, ctx), ctx})
    ref = {"text": model.embed_text_ids, "image": model.embed_image_tensor}
    got: dict[str, dict[str, list]] = {n: {"torch": [], "onnx": []} for n in paths}
    for i, b in enumerate(batch_sizes):
        for j, length in enumerate(lengths):
            inputs = example_inputs(model, b, length, seed=seed + 100 * i + j)
            for name in paths:
                if name == "image" and j:  # images have no length axis
                    continue
                got[name]["torch"].append(ref[name](inputs[name]).float().cpu())
                got[name]["onnx"].append(onnx.run(name, inputs[name]))
    return {n: {k: torch.cat(v) for k, v in d.items()} for n, d in got.items()}


def verify_onnx(
    model: ContrastiveModel,
    paths: dict[str, Path],
    batch_sizes: Sequence[int] = (1, 5),
    lengths: Sequence[int] | None = None,
) -> dict[str, float]:
    """Max |ONNX - PyTorch| over the embedding entries per encoder, on random inputs of several batch
    sizes and text lengths (default: 3 tokens and the full context length)."""
    emb = compare_onnx(model, paths, batch_sizes, lengths)
    return {n: float(np.abs((e["onnx"] - e["torch"]).numpy()).max()) for n, e in emb.items()}
