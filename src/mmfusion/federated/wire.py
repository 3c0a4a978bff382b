"""Model state <-> the arrays Flower sends, optionally in a lower precision (`federated.compression`).

The payload is the model's state_dict values in order (parameters and buffers). fp16 / bf16 compression
(the precisions of the DDP comm hooks in mmfusion.train.comm) applies to float32 arrays only: an fp16 array
travels as float16, a bf16 one as its raw 16 bits (int16, numpy has no bfloat16). The receiver decodes by
the dtype it expects, so integer buffers and already-small arrays pass through unchanged. Aggregation
always runs in float32 on decoded arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError

Arrays = list[np.ndarray]


def state_arrays(model: nn.Module) -> Arrays:
    """The model's state_dict values as CPU numpy arrays (copies), in state_dict order."""
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def load_arrays(model: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    """Load `arrays` (state_dict order, already decoded) into `model`; a wrong count or shape is an error."""
    state = model.state_dict()
    if len(arrays) != len(state):
        raise ConfigError(
            f"the federation sent {len(arrays)} arrays for a model with {len(state)} state entries: the server "
            "and this client were built from different model configs"
        )
    new = {}
    for (name, ref), a in zip(state.items(), arrays):
        if tuple(a.shape) != tuple(ref.shape):
            raise ConfigError(
                f"federated parameter {name}: received shape {tuple(a.shape)}, the model has {tuple(ref.shape)}"
            )
        new[name] = torch.from_numpy(np.ascontiguousarray(a)).to(ref.dtype)
    model.load_state_dict(new)


def encode(arrays: Sequence[np.ndarray], compression: str) -> Arrays:
    """Arrays as they travel: float32 ones cast to `compression` ("none" | "fp16" | "bf16")."""
    if compression == "none":
        return list(arrays)
    out = []
    for a in arrays:
        if a.dtype != np.float32:
            out.append(a)
        elif compression == "fp16":
            out.append(a.astype(np.float16))
        else:
            bits = torch.from_numpy(np.ascontiguousarray(a)).to(torch.bfloat16).view(torch.int16)
            out.append(bits.numpy())
    return out


def decode(arrays: Sequence[np.ndarray], dtypes: Sequence[np.dtype]) -> Arrays:
    """Arrays back in the dtypes the model holds (`dtypes`, state_dict order)."""
    if len(arrays) != len(dtypes):
        raise ConfigError(f"received {len(arrays)} arrays, expected {len(dtypes)}")
    out = []
    for a, dt in zip(arrays, dtypes):
        if a.dtype == dt:
            out.append(a)
        elif dt == np.float32 and a.dtype == np.float16:
            out.append(a.astype(np.float32))
        elif dt == np.float32 and a.dtype == np.int16:
            out.append(torch.from_numpy(np.ascontiguousarray(a)).view(torch.bfloat16).float().numpy())
        else:
            out.append(a.astype(dt))
    return out


def payload_bytes(parameters) -> int:
    """Bytes of a Flower Parameters message's tensors (what the transport carries, before gRPC framing)."""
    return sum(len(t) for t in parameters.tensors)


__all__ = ["decode", "encode", "load_arrays", "payload_bytes", "state_arrays"]
