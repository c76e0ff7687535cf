import glob
import os

import pytest

from sidvid_rec.config import Config, config_from_dict, dump_config, load_config
from sidvid_rec.errors import ConfigError

import yaml

REPO = os.path.join(os.path.dirname(__file__), "..")


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.epochs=3", "model.mode=sid_id", "eval.ks=[1, 10]", "train.betas=[0.9, 0.99]"])
    assert cfg.train.epochs == 3 and cfg.model.mode == "sid_id" and cfg.eval.ks == [1, 10]
    assert cfg.train.betas == (0.9, 0.99) and cfg.data.max_len == 200


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.mode=transformer", "model.mode"),
        ("model.fusion=concat", "model.fusion"),
        ("train.nope=1", "unknown config key train.nope"),
        ("nope.x=1", "unknown config section"),
        ("train.epochs=1.5", "expected an integer"),
        ("train.resume=maybe", "expected true or false"),
        ("model.dropout=2", "must lie in [0, 1]"),
        ("model.cobra_sid_dropout=1", "model.cobra_sid_dropout must lie in [0, 1)"),
        ("epochs=3", "section.key"),
        ("train.epochs", "section.key=value"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_every_shipped_config_loads():
    files = sorted(glob.glob(os.path.join(REPO, "configs", "*", "*.yaml")))
    assert files, "no configs shipped"
    for path in files:
        cfg = load_config(path)
        assert isinstance(cfg, Config)


def test_dump_round_trip():
    cfg = load_config(None, ["model.mode=cobra", "loss.vid_weight=0.5"])
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="unknown config key train.epoch"):
        load_config(str(path))
