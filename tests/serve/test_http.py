"""The shared HTTP helpers of the server (serve/http.py)."""

import json

import numpy as np
import pytest

pytest.importorskip("fastapi")
from mmfusion.serve.http import vectors_response  # noqa: E402


def test_vectors_response_has_the_json_values_of_the_standard_path():
    vecs = [np.array([0.1, -2.5e-5, 3.0], dtype=np.float32), np.array([1e-8, 0.0, -0.333], dtype=np.float32)]
    r = vectors_response({"modality": "text", "dim": 3}, vecs)
    assert r.media_type == "application/json" and r.headers["content-type"] == "application/json"
    body = json.loads(r.body)
    # what FastAPI's default rendering (json.dumps of float32 -> float) gave: the same doubles, same order
    assert body == {"modality": "text", "dim": 3, "embeddings": [v.tolist() for v in vecs]}
    assert body["embeddings"][0][1] == float(np.float32(-2.5e-5))
    assert np.array_equal(np.asarray(body["embeddings"], dtype=np.float32), np.stack(vecs))


def test_a_vector_that_is_not_finite_is_refused_as_json_refuses_it():
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        vectors_response({}, [np.array([0.5, np.nan], dtype=np.float32)])
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        vectors_response({}, [np.array([np.inf], dtype=np.float32)])
