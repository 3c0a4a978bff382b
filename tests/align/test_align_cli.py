"""`mmfusion align` end to end on a tiny budget, and its config errors (mmfusion.cli_align / align.pipeline)."""

import json

from mmfusion.cli import main
from mmfusion.unified.model import UnifiedDecoder

TINY = [
    "data.n_sft=200",
    "data.n_labelled=64",
    "data.n_ppo_prompts=64",
    "data.n_eval=32",
    "policy.dim=16",
    "policy.steps=5",
    "scorer.dim=16",
    "scorer.steps=5",
    "ppo.steps=2",
    "ppo.batch_prompts=8",
    "ppo.budget=2",
]


def _args(*sets):
    return [x for s in (*TINY, *sets) for x in ("--set", s)]


def test_align_writes_the_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            ["align", "--config", "configs/ppo_cs.yaml", "--out", str(out), *_args("ppo.mechanism=resample")]
        )
        == 0
    )
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1.0, 2.0]
    assert {"resample_rate", "dropped", "dropped_total", "harmful", "complete"} <= set(lines[0])
    results = json.loads((out / "results.json").read_text())
    assert results["mechanism"] == "resample" and set(results["before"]) == set(results["after"])
    assert results["dropped_prompts"] == lines[-1]["dropped_total"]
    assert {"complete", "harmful", "cost_model_agreement"} <= set(results["after"])
    dec = UnifiedDecoder.from_pretrained(out / "model" / "decoder")
    assert dec.cfg.dim == 16
    assert (out / "model" / "vocab.json").is_file() and (out / "cost_model" / "model.safetensors").is_file()
    assert (out / "ppo.png").is_file()
    assert "resample: harmful" in capsys.readouterr().out


def test_align_config_errors_exit_2_and_name_the_key(capsys):
    assert main(["align", "--set", "ppo.mechanism=bogus"]) == 2
    assert "ppo.mechanism" in capsys.readouterr().err
    assert main(["align", "--set", "ppo.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'ppo.stepz'" in err and "steps" in err


def test_align_trains_its_scorers_on_a_users_jsonl(tmp_path, capsys):
    rows = [
        {
            "prompt": "small red circle | large blue square",
            "response": "a small circle to the left of a large blue square",
            "reward": 0.5,
            "cost": 0,
        },
        {
            "prompt": "small red circle | large blue square",
            "response": "a small red circle to the left of a large blue square",
            "reward": 1.0,
            "cost": 1,
        },
        {
            "prompt": "small green cross | small red diamond",
            "chosen": "a small green cross to the left of a small diamond",
            "rejected": "a small green cross to the left of a small red diamond nasty",
        },
    ]
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = _args("ppo.mechanism=lagrangian", "ppo.steps=1", f"data.labels={labels}")
    assert main(["align", "--config", "configs/ppo_cs.yaml", "--out", str(out), *args]) == 0
    words = json.loads((out / "model" / "vocab.json").read_text())["words"]
    assert "nasty" in words  # the vocabulary covers the user's texts
    assert "lambda" in json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    labels.write_text('{"prompt": "x", "response": "y"}\n')
    assert main(["align", "--out", str(out), *args]) == 1
    assert "labels.jsonl:1: a row needs 'response'" in capsys.readouterr().err


def _user_files(root):
    """A tiny text domain of the user's own: SFT demonstrations, PPO / evaluation prompts and labels."""
    fruits = ("apple", "pear", "plum", "fig")
    sft = [{"prompt": f"describe the {f}", "response": f"the {f} is sweet"} for f in fruits]
    sft += [{"prompt": f"describe the {f}", "response": f"the {f} is poison"} for f in fruits[:2]]
    labels = [
        {"prompt": f"describe the {f}", "response": f"the {f} is sweet", "reward": 1.0, "cost": 0}
        for f in fruits
    ]
    labels += [
        {"prompt": f"describe the {f}", "response": f"the {f} is poison", "reward": 0.8, "cost": 1}
        for f in fruits
    ]
    files = {
        "sft": sft,
        "prompts": [{"prompt": f"describe the {f}"} for f in fruits],
        "eval": [{"prompt": "describe the apple"}, {"prompt": "describe the kiwi"}],
        "labels": labels,
    }
    out = {}
    for name, rows in files.items():
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_align_runs_on_a_users_text(tmp_path, capsys):
    f = _user_files(tmp_path)
    out = tmp_path / "run"
    data = [f"data.sft={f['sft']}", f"data.prompts={f['prompts']}", f"data.labels={f['labels']}",
            f"data.eval_prompts={f['eval']}"]  # fmt: skip
    args = _args("ppo.mechanism=lagrangian", "ppo.max_new_tokens=6", *data)
    assert main(["align", "--config", "configs/ppo_cs.yaml", "--out", str(out), *args]) == 0
    words = json.loads((out / "model" / "vocab.json").read_text())["words"]
    # the vocabulary is the user's words and nothing of the synthetic world
    assert words == sorted(
        {"describe", "the", "is", "sweet", "poison", "apple", "pear", "plum", "fig", "kiwi"}
    )
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1.0, 2.0]
    assert "lambda" in lines[0] and "harmful" not in lines[0]  # no exact judge on user text
    results = json.loads((out / "results.json").read_text())
    assert results["world"] is None and "no exact judge" in results["judge"]
    for when in ("before", "after"):
        r = results[when]
        assert set(r) == {"reward_model_mean", "cost_model_mean", "harmful_by_cost_model", "n"}
        assert r["n"] == 2 and r["harmful_by_cost_model"] in (0.0, 0.5, 1.0) and 0 < r["cost_model_mean"] < 1
    assert (out / "cost_model" / "model.safetensors").is_file() and (out / "ppo.png").is_file()
    assert "harmful by the cost model" in capsys.readouterr().out
    # a data error names the file, the line and the field
    f["sft"].write_text('{"prompt": "describe the fig", "response": "the fig is sweet"}\n{"prompt": "x"}\n')
    assert main(["align", "--out", str(out), *args]) == 1
    assert "sft.jsonl:2: 'response' must be a non-empty string" in capsys.readouterr().err


def test_align_user_text_config_errors_exit_2_and_name_the_key(tmp_path, capsys):
    f = _user_files(tmp_path)
    assert main(["align", "--set", f"data.prompts={f['prompts']}", "--set", f"data.sft={f['sft']}"]) == 2
    assert "data.labels is required with data.prompts" in capsys.readouterr().err
    assert main(["align", "--set", f"data.sft={f['sft']}", "--set", f"data.labels={f['labels']}"]) == 2
    assert "data.sft is set but data.prompts is not" in capsys.readouterr().err
    assert main(["align", "--set", f"data.eval_prompts={f['eval']}"]) == 2
    assert "data.eval_prompts goes with data.prompts" in capsys.readouterr().err
    assert main(["align", "--set", f"data.promts={f['prompts']}"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'data.promts'" in err and "prompts" in err
