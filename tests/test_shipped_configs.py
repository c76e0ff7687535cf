"""The shipped Amazon Beauty configs are the rows benchmarks/sota_study.py chose on validation:
run as shipped (only ``data.path`` set, e.g. through ``sidvid-rec pipeline``) they train exactly
the study's command, and they build the SIDs the study trained on."""

import os
import sys

import pytest

from sidvid_rec.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from benchmarks.sota_study import ROWS, STUDY_SETTINGS  # noqa: E402

CONFIGS = os.path.join(REPO, "configs", "amazon-beauty")
SHIPPED = {"hstu.yaml": "id-all", "sid_id.yaml": "sid_id-all-d128", "cobra.yaml": "cobra-all",
           "sid_gen.yaml": "sid_gen-k256-ids-nodeout-d128"}
"""Shipped config -> the study row it must reproduce."""
CHOSEN_AFTER_TRAINING = {"eval": ("sid_gen_beam", "decoder", "alpha", "beam_size")}
"""Decoding settings the study chooses on validation after training (shipped as the choice)."""


def _sections(cfg):
    return {name: dict(vars(getattr(cfg, name))) for name in ("data", "model", "loss", "train", "eval")}


@pytest.mark.parametrize("shipped,row", sorted(SHIPPED.items()))
def test_shipped_config_is_the_study_row(shipped, row):
    config, overrides, sid_settings = next((c, o, s) for name, c, o, s in ROWS if name == row)
    study = _sections(load_config(os.path.join(CONFIGS, config), STUDY_SETTINGS + overrides + sid_settings))
    ship = _sections(load_config(os.path.join(CONFIGS, shipped)))
    for section, keys in CHOSEN_AFTER_TRAINING.items():
        for key in keys:
            study[section].pop(key), ship[section].pop(key)
    assert ship == study


@pytest.mark.parametrize("shipped,row", sorted((s, r) for s, r in SHIPPED.items() if s != "hstu.yaml"))
def test_shipped_config_builds_the_study_sids(shipped, row):
    """The study builds its SIDs from cobra.yaml's ``sids`` section plus the row's SID settings."""
    _, _, sid_settings = next((c, o, s) for name, c, o, s in ROWS if name == row)
    study = vars(load_config(os.path.join(CONFIGS, "cobra.yaml"), sid_settings).sids)
    ship = vars(load_config(os.path.join(CONFIGS, shipped)).sids)
    study.pop("dir"), ship.pop("dir")
    assert ship == study
