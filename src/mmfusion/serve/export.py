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

from ..errors import CheckpointError, ConfigError
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


class FusionGraph(nn.Module):
    """MultiModalModel as one exportable graph: (one input per modality, then one bool mask per modality, in
    `model.modalities` order) -> head logits. Every row goes through every encoder (no data-dependent row
    selection); the fusion masks absent rows, so the outputs equal the model's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        m = self.model
        names = m.modalities
        inputs, masks = args[: len(names)], args[len(names) :]
        feats = {k: m.projections[k](m.encoders[k].forward_tokens(x)) for k, x in zip(names, inputs)}
        return m.logits_from_tokens(feats, dict(zip(names, masks)))


def export_fusion_onnx(model, out_dir: str | Path, opset: int = OPSET) -> Path:
    """Write fusion_model.onnx for a MultiModalModel: inputs `<modality>` (batch, ...) and `<modality>_mask`
    (batch,) bool, output `logits` ((batch, n_classes) classify, (batch,) match); batch is dynamic.

    The MoE fusion routes tokens with data-dependent shapes and is not exportable: ConfigError.
    """
    from ..models.multimodal import MultiModalModel

    if not isinstance(model, MultiModalModel):
        raise CheckpointError(f"export_fusion_onnx needs a MultiModalModel, got {type(model).__name__}")
    if model.config.fusion == "moe":
        raise ConfigError(
            "the moe fusion routes tokens with data-dependent shapes: it cannot be exported to ONNX"
        )
    require("onnx", "onnxscript")
    model = copy.deepcopy(model).cpu().eval()
    path = Path(out_dir) / "fusion_model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    example = fusion_example_inputs(model, batch=2)
    batch = torch.export.Dim("batch", min=1)
    names = model.modalities
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            FusionGraph(model).eval(),
            tuple(example),
            str(path),
            input_names=[*names, *(f"{k}_mask" for k in names)],
            output_names=["logits"],
            dynamic_shapes=(tuple({0: batch} for _ in example),),  # one entry: the *args tuple
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    strip_debug_metadata(path)
    return path


def fusion_example_inputs(model, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """Random inputs for FusionGraph: one tensor per modality (shapes from the encoder configs), then masks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in model.modalities:
        cfg = model.config.encoders[k]
        if cfg.kind == "text":
            out.append(torch.randint(3, cfg.vocab_size, (batch, min(8, cfg.context_length)), generator=g))
        elif cfg.kind == "image":
            out.append(torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1)
        elif cfg.kind == "audio":
            out.append(torch.randn(batch, cfg.n_mels, min(51, cfg.max_frames), generator=g))
        else:
            out.append(
                torch.rand(batch, cfg.num_frames, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
            )
    return out + [torch.ones(batch, dtype=torch.bool) for _ in model.modalities]


def fusion_check_inputs(model, batch: int = 5, seed: int = 1) -> list[torch.Tensor]:
    """fusion_example_inputs in which row r lacks modality r % M (each row keeps the others)."""
    inputs = fusion_example_inputs(model, batch=batch, seed=seed)
    names = model.modalities
    for i in range(len(names)):
        inputs[len(names) + i] = torch.tensor([r % len(names) != i for r in range(batch)])
    return inputs


def verify_fusion_onnx(model, path: str | Path, batch: int = 5, seed: int = 1) -> float:
    """Max |onnxruntime - PyTorch| of the exported fusion model's logits on random inputs in which every
    modality is absent from some rows (each row keeps at least one)."""
    from ..batch import Batch

    session = onnx_session(path)
    inputs = fusion_check_inputs(model, batch, seed)
    names = model.modalities
    feed = {spec.name: t.numpy() for spec, t in zip(session.get_inputs(), inputs)}
    got = session.run(None, feed)[0]
    data = dict(zip(names, inputs[: len(names)]))
    masks = dict(zip(names, inputs[len(names) :]))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ref = model.logits(Batch(data, masks))[0].cpu().numpy()
    model.train(was_training)
    return float(np.abs(got - ref).max())
