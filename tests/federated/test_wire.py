"""What travels between server and clients (mmfusion.federated.wire) and FedProx's proximal gradient."""

import numpy as np
import pytest
import torch
from flwr.common import ndarrays_to_parameters

from mmfusion.errors import ConfigError
from mmfusion.federated.client import ProximalTerm
from mmfusion.federated.wire import decode, encode, load_arrays, payload_bytes, state_arrays


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32))
    return m


def test_state_round_trip_is_exact():
    a, b = _model(), _model()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    load_arrays(b, state_arrays(a))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert b.state_dict()["1.num_batches_tracked"].dtype == torch.int64  # integer buffers stay integer


@pytest.mark.parametrize("codec,tol,ratio", [("fp16", 1e-3, 0.5), ("bf16", 8e-3, 0.5)])
def test_compressed_payload_halves_the_bytes_and_decodes_close(codec, tol, ratio):
    arrays = state_arrays(_model())
    dtypes = [a.dtype for a in arrays]
    sent = encode(arrays, codec)
    full = payload_bytes(ndarrays_to_parameters(arrays))
    small = payload_bytes(ndarrays_to_parameters(sent))
    floats = sum(a.nbytes for a in arrays if a.dtype == np.float32)
    assert full - small == pytest.approx(floats * (1 - ratio), abs=0)  # float32 payload halves exactly
    back = decode(sent, dtypes)
    for a, b in zip(arrays, back):
        assert b.dtype == a.dtype
        if a.dtype == np.float32:
            assert np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-3)) < tol
        else:
            assert np.array_equal(a, b)
    assert encode(arrays, "none") == arrays


def test_mismatched_models_are_named():
    m = _model()
    arrays = state_arrays(m)
    with pytest.raises(ConfigError, match="sent 3 arrays for a model with 7 state entries"):
        load_arrays(m, arrays[:3])
    arrays[0] = np.zeros((2, 2), np.float32)
    with pytest.raises(ConfigError, match=r"0.weight: received shape \(2, 2\), the model has \(32, 64\)"):
        load_arrays(m, arrays)


def test_proximal_term_adds_mu_times_the_drift_to_each_gradient():
    m = torch.nn.Linear(3, 2)
    prox = ProximalTerm(m, mu=0.5)
    anchor = [p.detach().clone() for p in m.parameters()]
    with torch.no_grad():
        m.weight.add_(torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, 4.0]]))
    m.weight.grad = torch.ones(2, 3)
    m.bias.grad = None  # no gradient: left alone

    class T:
        module = m

    prox.on_before_optimizer_step(T())
    expected = torch.ones(2, 3) + 0.5 * (m.weight.detach() - anchor[0])
    assert torch.allclose(m.weight.grad, expected)
    assert torch.allclose(m.weight.grad, torch.tensor([[1.5, 0.0, 1.0], [1.25, 1.0, 3.0]]), atol=1e-6)
    assert m.bias.grad is None
