"""`mmfusion federate` (mmfusion.federated): a federation of edges with different data and sensors learns one
model; a run is reproducible; the global model is a model folder; a client killed mid-round does not stop it."""

import json

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters
from safetensors.numpy import load_file

from clirun import run_mmfusion
from mmfusion.cli import main
from mmfusion.config import load_config
from mmfusion.federated.federate import simulate
from mmfusion.federated.wire import encode, payload_bytes, state_arrays
from mmfusion.models.multimodal import MultiModalModel

RECIPE = "configs/federated.yaml"
SMALL = ["data.synthetic.n_train=240", "data.synthetic.n_test=40"]


def _cfg(tmp_path, name, *overrides):
    base = [
        f"out_dir={tmp_path}",
        f"name={name}",
        "data.synthetic.n_train=600",
        "data.synthetic.n_test=200",
        "federated.clients=3",
        "federated.modalities=[[audio, image], [audio], [image]]",
    ]
    return load_config(RECIPE, [*base, *overrides])


def _rows(path):
    return [json.loads(line) for line in (path / "federated.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """4 rounds x 8 local steps of 3 label-skewed edges: an audio+image one, an audio-only one, an image-only
    one (the recipe's model, 96 optimizer steps in all)."""
    tmp = tmp_path_factory.mktemp("fed")
    cfg = _cfg(tmp, "fed", "federated.rounds=4", "federated.local_steps=8")
    return simulate(cfg, log=lambda _m: None), tmp / "fed"


def test_edges_with_different_sensors_learn_one_model(federation):
    metrics, out = federation
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    chance = 1 / 8
    assert rows[0]["accuracy_all"] < 2 * chance  # the untrained global model
    final = metrics["final"]
    assert final["accuracy_all"] > 0.5  # 8 colours
    # the audio-only and image-only edges taught the shared model each modality on its own
    assert final["accuracy_without_audio"] > 2 * chance and final["accuracy_without_image"] > 2 * chance
    info = metrics["partition"]
    assert info["by"] == "label" and sum(info["sizes"]) == 600
    assert info["modalities"] == [["audio", "image"], ["audio"], ["image"]]
    # label skew: every client's label histogram, and they differ
    assert len({json.dumps(h, sort_keys=True) for h in info["labels"]}) == 3


def test_the_global_model_is_a_model_folder_with_per_round_checkpoints(federation):
    metrics, out = federation
    model = MultiModalModel.from_pretrained(out / "model")
    assert set(model.modalities) == {"audio", "image"}
    assert sorted(p.name for p in (out / "rounds").iterdir()) == [
        "round-003",
        "round-004",
    ]  # keep_checkpoints 2
    final = load_file(str(out / "model" / "model.safetensors"))
    last = load_file(str(out / "rounds" / "round-004" / "model.safetensors"))
    assert final.keys() == last.keys() and all((final[k] == last[k]).all() for k in final)
    assert (out / "plots" / "federated.png").stat().st_size > 1000
    # every round sent the global model to 3 clients and got 3 models back: equal payloads
    for r in _rows(out)[1:]:
        assert r["clients_ok"] == 3 and r["clients_failed"] == 0
        assert r["bytes_down"] == r["bytes_up"] > 0
    assert metrics["bytes_total"] == sum(r["bytes_down"] + r["bytes_up"] for r in _rows(out)[1:])


def test_a_federation_is_reproducible_and_fp16_halves_the_traffic(tmp_path):
    extra = [
        "federated.rounds=2",
        "federated.local_steps=2",
        "federated.strategy=fedprox",
        "federated.proximal_mu=0.1",
    ]
    a = simulate(_cfg(tmp_path, "a", *extra), log=lambda _m: None)
    b = simulate(_cfg(tmp_path, "b", *extra), log=lambda _m: None)
    wa, wb = (load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in ("a", "b"))
    assert all((wa[k] == wb[k]).all() for k in wa)
    drop = {"seconds"}  # wall time of the round
    assert {k: v for k, v in a["final"].items() if k not in drop} == {
        k: v for k, v in b["final"].items() if k not in drop
    }
    c = simulate(_cfg(tmp_path, "c", *extra, "federated.compression=fp16"), log=lambda _m: None)
    arrays = state_arrays(MultiModalModel.from_pretrained(tmp_path / "a" / "model"))
    fp32 = payload_bytes(ndarrays_to_parameters(arrays))
    fp16 = payload_bytes(ndarrays_to_parameters(encode(arrays, "fp16")))
    messages = 2 * 3 * 2  # rounds x clients x (down + up)
    assert (a["bytes_total"], c["bytes_total"]) == (messages * fp32, messages * fp16)
    assert 0.5 < fp16 / fp32 < 0.53  # float32 halves; .npy headers and integer buffers do not


@pytest.mark.timeout(420)
def test_processes_over_localhost_survive_a_client_killed_mid_round(tmp_path):
    kill = '[{target: "faults:KillFederatedClient", args: {client: 1, round: 2, step: 3}}]'
    proc = run_mmfusion(
        "federate",
        "--config",
        RECIPE,
        "--mode",
        "processes",
        "--clients",
        "3",
        "--rounds",
        "3",
        *("--set", f"out_dir={tmp_path}", "--set", "name=proc", "--set", "federated.local_steps=5"),
        *("--set", "data.synthetic.n_train=300", "--set", "data.synthetic.n_test=100"),
        *("--set", "federated.modalities=null", "--set", f"train.callbacks={kill}"),
        cwd=".",
        timeout=400,
    )
    rows = _rows(tmp_path / "proc")
    by_round = {r["round"]: r for r in rows}
    assert (by_round[1]["clients_ok"], by_round[1]["clients_failed"]) == (3, 0)
    assert (by_round[2]["clients_ok"], by_round[2]["clients_failed"]) == (2, 1)  # client 1 died mid-round
    assert by_round[2]["cids"] == [0, 2]
    assert (by_round[3]["clients_sampled"], by_round[3]["clients_ok"]) == (2, 2)  # the others carried on
    assert "client exit codes: 0=0, 1=-9, 2=0" in proc.stdout
    assert (tmp_path / "proc" / "model" / "model.safetensors").is_file()
    assert "round 2: a client failed" in proc.stdout


def test_config_errors_name_the_problem(tmp_path, capsys):
    assert main(["federate", "--config", "configs/quickstart.yaml", "--set", f"out_dir={tmp_path}"]) == 2
    assert "no federated: section" in capsys.readouterr().err
    args = ["federate", "--config", RECIPE, "--set", f"out_dir={tmp_path}"]
    assert main([*args, "--set", "federated.modalities=[[video]]"]) == 2
    assert "federated.modalities names ['video']" in capsys.readouterr().err
    small = ["--set", "data.synthetic.n_train=40", "--set", "data.synthetic.n_test=8"]
    assert main([*args, "--overwrite", *small, "--set", "federated.partition.min_samples=20"]) == 2
    assert "40 training samples cannot give 4 clients at least" in capsys.readouterr().err
    assert main([*args, "--connect", "127.0.0.1:1"]) == 2
    assert "--connect needs --client-id" in capsys.readouterr().err


def test_a_webdataset_stream_is_refused_with_a_config_error(tmp_path):
    from torch.utils.data import IterableDataset

    from mmfusion.errors import ConfigError
    from mmfusion.federated.server import Federation

    class Stream(IterableDataset):
        def __iter__(self):
            yield {}

    fed = Federation(_cfg(tmp_path, "wds"), tmp_path / "wds")
    for by in ("iid", "size", "label"):
        fed.cfg.federated.partition.by = by
        with pytest.raises(
            ConfigError, match=r"needs a map-style training split .* WebDataset stream \(Stream\)"
        ):
            fed.client_datasets(Stream(), [0])


def test_a_users_jsonl_is_partitioned_by_its_label_column(tmp_path):
    """Your own files: `mmfusion data synth` writes the task as JSONL + PNG/WAV; the federation splits the
    manifest by its label column, and the server names the classes from it (logged)."""
    for split, n in (("train", 240), ("test", 80)):
        assert main(["data", "synth", "--task", "paired_colour", "--out", str(tmp_path / "d"), "--n", str(n),
                     "--split", split]) == 0  # fmt: skip
    lines = []
    cfg = _cfg(
        tmp_path,
        "own",
        "data.source=jsonl",
        f"data.train={tmp_path / 'd' / 'train.jsonl'}",
        f"data.test={tmp_path / 'd' / 'test.jsonl'}",
        "federated.clients=2",
        "federated.modalities=null",
        "federated.partition.alpha=0.2",
        "federated.rounds=2",
        "federated.local_steps=4",
    )
    m = simulate(cfg, log=lines.append)
    assert any("the server reads the training split to name the classes" in line for line in lines)
    labels = [json.loads(x)["label"] for x in (tmp_path / "d" / "train.jsonl").read_text().splitlines()]
    info = m["partition"]
    assert sum(info["sizes"]) == len(labels) == 240
    total = {}
    for h in info["labels"]:
        for k, v in h.items():
            total[k] = total.get(k, 0) + v
    assert total == {str(k): labels.count(k) for k in set(labels)}
    assert m["final"]["accuracy_all"] > 0


def test_a_two_tower_recipe_federates_too(tmp_path):
    """Any fusion or two-tower recipe: the e2e tiny two-tower config with a federated section (iid, 2 edges);
    the server trains the BPE tokenizer (logged) and evaluates retrieval."""
    lines = []
    cfg = load_config(
        "tests/e2e/tiny.yaml",
        [f"out_dir={tmp_path}", "federated={clients: 2, rounds: 2, local_steps: 2, partition: {by: iid}}"],
    )
    m = simulate(cfg, log=lines.append)
    assert any("to train the BPE tokenizer" in line for line in lines)
    assert 0.0 <= m["final"]["t2i_recall@1"] <= 1.0 and "i2t_recall@5" in m["final"]
    assert any(line.startswith("round 2/2: t2i_recall@1 ") for line in lines)
    from mmfusion.models.contrastive import ContrastiveModel

    model = ContrastiveModel.from_pretrained(tmp_path / "tiny" / "model")
    assert (tmp_path / "tiny" / "model" / "tokenizer.json").is_file() and model is not None
    assert m["partition"]["sizes"] == [128, 128]
    assert json.loads((tmp_path / "tiny" / "federated.json").read_text())["final"] == m["final"]
    assert main(["eval", str(tmp_path / "tiny")]) == 0  # the run directory evaluates like any run's
    evaluated = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    assert evaluated["t2i_recall@1"] == pytest.approx(m["final"]["t2i_recall@1"])


def test_dp_clips_every_client_update_to_the_norm(tmp_path):
    """federated.dp (Flower's server-side fixed clipping, no noise here): one round moves the global model by
    at most clipping_norm in L2 over the whole state, however far the clients moved."""
    from mmfusion.federated.server import open_client_side

    cfg = _cfg(
        tmp_path,
        "dp",
        "federated.rounds=1",
        "federated.local_steps=3",
        "federated.dp={noise_multiplier: 0.0, clipping_norm: 0.01}",
    )
    simulate(cfg, log=lambda _m: None)
    start = open_client_side(tmp_path / "dp" / "config.yaml").new_model().state_dict()
    after = load_file(str(tmp_path / "dp" / "rounds" / "round-001" / "model.safetensors"))
    assert after.keys() == start.keys()
    moved = np.sqrt(sum(float(((after[k].astype(np.float64) - start[k].numpy()) ** 2).sum()) for k in after))
    assert 0.001 < moved <= 0.01 * (1 + 1e-5)


@pytest.mark.timeout(120)
def test_a_client_process_that_cannot_start_stops_the_server_with_its_log(tmp_path):
    """The clients here lack the test callbacks module on their path: each exits at config load; the server
    says which client, its exit code and the end of its log, instead of waiting connect_timeout_s."""
    from mmfusion.errors import MMFusionError
    from mmfusion.federated.federate import serve_processes

    kill = '[{target: "faults:KillFederatedClient", args: {client: 1, round: 2, step: 3}}]'
    cfg = _cfg(tmp_path, "early", *SMALL, "federated.clients=2", f"train.callbacks={kill}")
    with pytest.raises(
        MMFusionError, match=r"client \d exited with code 2 before joining:(.|\n)*cannot import 'faults'"
    ):
        serve_processes(cfg, log=lambda _m: None, client_env={"PYTHONPATH": ""})
