"""`mmfusion serve` refuses a non-loopback bind without an API key unless --insecure (serve/access.py)."""

import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from mmfusion.cli import main  # noqa: E402
from mmfusion.serve import commands  # noqa: E402
from mmfusion.serve.access import api_key, exposure_problem, is_loopback  # noqa: E402

DOCKERFILE = Path(__file__).parents[2] / "Dockerfile"


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("10.0.0.1", False),
        ("example.org", False),
        ("", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_exposure_rule():
    assert exposure_problem("127.0.0.1", None, False) is None  # loopback: no key needed
    assert exposure_problem("0.0.0.0", "k", False) is None
    assert exposure_problem("0.0.0.0", None, True) is None
    problem = exposure_problem("0.0.0.0", None, False)
    assert problem == (
        "--host 0.0.0.0 is reachable from other machines, and no API key is set: set $MMFUSION_API_KEY "
        "(or --api-key KEY), or pass --insecure to serve without one"
    )
    assert exposure_problem("::", "", False) is not None  # an empty key is no key


def test_key_from_flag_or_environment(monkeypatch):
    monkeypatch.delenv("MMFUSION_API_KEY", raising=False)
    assert api_key(None) is None and api_key("a") == "a"
    monkeypatch.setenv("MMFUSION_API_KEY", "env")
    assert api_key(None) == "env" and api_key("flag") == "flag"
    monkeypatch.setenv("MMFUSION_API_KEY", "")
    assert api_key(None) is None


@pytest.fixture
def bind(monkeypatch):
    """Replace uvicorn.run: record where the server would bind and the app, bind nothing."""
    calls = []
    monkeypatch.setattr(commands, "_run", lambda app, host, port, log_level: calls.append((host, port, app)))
    return calls


def test_cli_refuses_a_public_bind_without_a_key_before_loading_anything(bind, monkeypatch, capsys):
    monkeypatch.delenv("MMFUSION_API_KEY", raising=False)
    # the model path does not exist: the refusal comes first, so no model is loaded
    assert main(["serve", "/no/such/model", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mmfusion: config error: " + exposure_problem("0.0.0.0", None, False)]
    assert bind == []


def test_cli_serves_publicly_with_insecure_or_a_key_and_the_key_is_enforced(
    bind, monkeypatch, capsys, make_tiny_model, tmp_path
):
    folder = make_tiny_model().save_pretrained(tmp_path / "model")
    monkeypatch.delenv("MMFUSION_API_KEY", raising=False)
    assert main(["serve", str(folder), "--host", "0.0.0.0", "--insecure", "--port", "8123"]) == 0
    assert bind[-1][:2] == ("0.0.0.0", 8123)
    assert "WARNING: --insecure: 0.0.0.0 is served without an API key" in capsys.readouterr().err
    assert main(["serve", str(folder)]) == 0  # loopback (the default host): no key, no warning
    assert bind[-1][0] == "127.0.0.1" and "WARNING" not in capsys.readouterr().err

    monkeypatch.setenv("MMFUSION_API_KEY", "s3cret")
    assert main(["serve", str(folder), "--host", "::"]) == 0
    assert "WARNING" not in capsys.readouterr().err
    with TestClient(bind[-1][2]) as c:  # the app that would have been served requires the key
        body = {"text": ["a"]}
        assert c.post("/v1/embed", json=body).status_code == 401
        assert c.post("/v1/embed", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/healthz").status_code == 200


def test_dockerfile_entrypoint_needs_the_key_from_the_environment(monkeypatch, capsys):
    line = next(s for s in DOCKERFILE.read_text().splitlines() if s.startswith("ENTRYPOINT "))
    entry = json.loads(line.removeprefix("ENTRYPOINT "))
    assert entry[:2] == ["mmfusion", "serve"] and entry[entry.index("--host") + 1] == "0.0.0.0"
    monkeypatch.delenv("MMFUSION_API_KEY", raising=False)
    assert main([*entry[1:], "/no/such/model"]) == 2
    assert "no API key is set" in capsys.readouterr().err
    # with the key set the exposure check passes and the (missing) model is what fails
    monkeypatch.setenv("MMFUSION_API_KEY", "s3cret")
    assert main([*entry[1:], "/no/such/model"]) not in (0, 2)
    assert "API key" not in capsys.readouterr().err
