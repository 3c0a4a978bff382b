"""Fixtures shared by the server tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def multimodal(make_tiny_model):
    """A seeded MultiModalModel with all four encoders (width 16, cross-attention fusion, 3 classes), eval."""
    from mmfusion.models.multimodal import MultiModalModel

    tok = make_tiny_model().tokenizer
    torch.manual_seed(0)
    encoders = {
        "text": "tiny",
        "image": {"image_size": 16, "patch_size": 8},
        "audio": {"n_mels": 16, "max_frames": 51},
        "video": {"num_frames": 2, "image_size": 16, "patch_size": 8},
    }
    return MultiModalModel(encoders, head="classify", n_classes=3, dim=16, tokenizer=tok).eval()


def fuzz_openapi(app, max_examples: int) -> dict:
    """Fuzz every operation of `app`'s OpenAPI schema with schemathesis, in process (ASGI), positive and
    negative examples (derandomized: the same cases every run). Asserts no 5xx other than the documented 503
    and returns {operation: Counter(status)} so callers can check that valid calls got through too."""
    from collections import Counter

    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    seen: dict[str, Counter] = {}

    def run(op, mode) -> None:
        label = op.label
        counts = seen.setdefault(label, Counter())

        @settings(
            max_examples=max_examples,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=mode))
        def check(case):
            r = case.call()
            counts[r.status_code] += 1
            assert r.status_code < 500 or r.status_code == 503, (label, case.body, r.text[:300])
            if r.status_code >= 400:
                assert "error" in r.json(), r.text[:300]

        check()

    for result in schema.get_all_operations():
        op = result.ok()
        run(op, GenerationMode.POSITIVE)
        try:
            run(op, GenerationMode.NEGATIVE)
        except Unsatisfiable:  # nothing in its schema can be violated (no body, or a free string / bytes)
            seen[op.label]["no negative cases"] += 1
    return seen


@pytest.fixture(scope="session")
def fuzz():
    """The schemathesis fuzzer above, as a fixture (test modules do not import conftest)."""
    return fuzz_openapi
