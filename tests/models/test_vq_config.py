"""VQVAEConfig: the VQVAE constructor's arguments, typed; config.json written and read as before."""

import inspect
import json

import pytest
import torch

from mmfusion.errors import ConfigError
from mmfusion.models.vq import LATER_DEFAULTS, VQVAE, VQVAEConfig

# the "model" section of a default VQVAE's config.json as the first release wrote it
FIRST_RELEASE = {
    "image_size": 32,
    "channels": 64,
    "codebook_size": 256,
    "quantizer": "vq",
    "code_dim": 32,
    "num_res": 1,
    "rvq_levels": 4,
    "fsq_levels": [8, 6, 5],
    "decay": 0.99,
    "commitment": 0.25,
    "kmeans_init": True,
    "dead_code_threshold": 1.0,
    "dead_code_patience": None,
    "in_channels": 3,
    "input_shape": None,
}


def test_config_maps_one_to_one_onto_the_constructor():
    params = list(inspect.signature(VQVAE.__init__).parameters.values())[1:]
    assert [p.name for p in params] == list(VQVAEConfig.model_fields)
    for p in params:
        default = VQVAEConfig.model_fields[p.name].default
        assert (list(p.default) if isinstance(p.default, tuple) else p.default) == default, p.name
    assert set(LATER_DEFAULTS) <= set(VQVAEConfig.model_fields)


def test_config_json_keys_and_order_unchanged(tmp_path):
    assert VQVAEConfig().to_dict() == FIRST_RELEASE
    torch.manual_seed(0)
    VQVAE(channels=8, codebook_size=16, code_dim=4, input_shape=(8, 12)).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())["model"]
    expected = {**FIRST_RELEASE, "channels": 8, "codebook_size": 16, "code_dim": 4, "input_shape": [8, 12]}
    assert list(written.items()) == list(expected.items())
    rvq = VQVAEConfig(quantizer="rvq", backend="vqtorch", commitment_per_level="mean").to_dict()
    assert list(rvq)[len(FIRST_RELEASE) :] == ["backend", "commitment_per_level"]


def test_from_config_is_the_constructor_and_round_trips():
    cfg = VQVAEConfig(channels=8, codebook_size=16, code_dim=4, quantizer="rvq", rvq_levels=2)
    assert VQVAEConfig.from_dict(cfg.to_dict()) == cfg
    torch.manual_seed(0)
    a = VQVAE.from_config(cfg)
    torch.manual_seed(0)
    b = VQVAE(channels=8, codebook_size=16, code_dim=4, quantizer="rvq", rvq_levels=2)
    assert a.cfg == b.cfg and a.config == b.config and a.code_shape == (8, 8, 2)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bad_values_name_the_key(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^VQVAE config: channels = 0: Input should be greater than or equal to 1"
    ):
        VQVAE(channels=0)
    with pytest.raises(ConfigError, match=r"quantizer must be one of \('vq', 'rvq', 'fsq'\); got 'pq'"):
        VQVAEConfig.from_dict({"quantizer": "pq"})
    with pytest.raises(ConfigError, match=r"quantize_dropout_cutoff must be in \[1, rvq_levels=2\]; got 3"):
        VQVAEConfig.from_dict({"quantizer": "rvq", "rvq_levels": 2, "quantize_dropout_cutoff": 3})
    VQVAE(channels=4, codebook_size=8, code_dim=4).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    meta = json.loads(path.read_text())
    meta["model"]["chanels"] = 8
    path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="chanels = 8: Extra inputs are not permitted"):
        VQVAE.from_pretrained(tmp_path)
