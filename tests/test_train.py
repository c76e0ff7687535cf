"""End-to-end training on the embedded ml-latest-small with a tiny model (seconds, not minutes)."""

import json
import os

import pytest
import torch

from sidvid_rec.cli import main
from sidvid_rec.train.checkpoint import list_checkpoints

TINY = ["train.device=cpu", "data.max_len=20", "model.dim=16", "model.dqk=16", "model.dv=16", "model.num_blocks=1",
        "train.batch_size=128", "loss.num_negatives=32", "eval.batch_size=610"]


def _train(run_dir, cache_dir, *extra):
    return main(["train", "--run-dir", str(run_dir), f"data.cache_dir={cache_dir}", *TINY, *extra])


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)


def test_train_evaluate_and_resume(tmp_path, cache_dir, capsys):
    straight = tmp_path / "straight"
    assert _train(straight, cache_dir, "train.epochs=2") == 0
    metrics = _metrics(straight)
    assert set(metrics) >= {"valid", "test"} and metrics["valid"]["count"] == 610
    assert 0.0 < metrics["valid"]["hr@200"] <= 1.0 and metrics["valid"]["hr@10"] <= metrics["valid"]["hr@50"]
    assert [os.path.basename(p) for p in list_checkpoints(str(straight))] == ["epoch-1.pt", "epoch-2.pt"]
    assert os.path.isdir(straight / "tb") and os.path.isfile(straight / "config.yaml")

    # A run stopped after epoch 1 and resumed ends exactly where the uninterrupted run ended.
    resumed = tmp_path / "resumed"
    assert _train(resumed, cache_dir, "train.epochs=1") == 0
    assert _train(resumed, cache_dir, "train.epochs=2", "train.resume=true") == 0
    again = _metrics(resumed)
    for split in ("valid", "test"):
        for key, value in metrics[split].items():
            assert again[split][key] == pytest.approx(value, abs=1e-6), (split, key)

    # `evaluate` reproduces the stored metrics and prints them as JSON on the last line.
    capsys.readouterr()
    assert main(["evaluate", str(straight), "--split", "valid"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key, value in metrics["valid"].items():
        assert printed[key] == pytest.approx(value, abs=1e-6)


def test_resume_refuses_another_model(tmp_path, cache_dir, capsys):
    run = tmp_path / "run"
    assert _train(run, cache_dir, "train.epochs=1") == 0
    capsys.readouterr()
    assert _train(run, cache_dir, "train.epochs=2", "train.resume=true", "model.dim=8", "model.dqk=8",
                  "model.dv=8") == 2
    err = capsys.readouterr().err.strip()
    assert "another model" in err and len(err.splitlines()) == 1


def test_bad_inputs(tmp_path, cache_dir, capsys):
    empty = tmp_path / "empty"
    os.makedirs(empty)
    assert main(["evaluate", str(empty)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    run = tmp_path / "run"
    assert _train(run, cache_dir, "train.epochs=1", "train.max_steps=1") == 0
    os.remove(run / "checkpoints" / "best.pt")
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(run), "model.mode=transformer"]) == 2
    assert "model.mode" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(run), "model.mode=sid_id"]) == 2
    assert "needs semantic IDs" in capsys.readouterr().err


def test_item_id_beyond_table_is_rejected(cache_dir):
    from sidvid_rec.config import load_config
    from sidvid_rec.data import load_sequences
    from sidvid_rec.errors import UserError
    from sidvid_rec.models.build import build_model

    cfg = load_config(None, [f"data.cache_dir={cache_dir}", *TINY])
    model = build_model(cfg, load_sequences(cfg.data), table_device="cpu")
    with pytest.raises((UserError, ValueError), match="9725"):
        model.embeddings.embed(torch.tensor([1, 9725]))


def test_run_config_means_the_same_from_any_directory(tmp_path, monkeypatch, capsys):
    """Training stores relative paths as absolute ones, so `evaluate` works from elsewhere."""
    monkeypatch.chdir(tmp_path)
    assert _train("run", "cache", "train.epochs=1", "train.max_steps=1") == 0
    import yaml

    stored = yaml.safe_load(open(tmp_path / "run" / "config.yaml"))
    assert stored["data"]["cache_dir"] == str(tmp_path / "cache")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run")]) == 0
    assert not os.path.exists(elsewhere / "cache")  # the run's cache was found, not rebuilt here


def test_with_absolute_paths_resolves_local_paths_only(tmp_path, monkeypatch):
    from sidvid_rec.config import load_config, with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(load_config(None, ["sids.dir=sids", "data.path=data/ml", "data.cache_dir=~/c",
                                                 "sids.embed_cache_dir=s3://bucket/e"]))
    assert cfg.sids.dir == str(tmp_path / "sids") and cfg.data.path == str(tmp_path / "data" / "ml")
    assert cfg.data.cache_dir == "~/c" and cfg.sids.embed_cache_dir == "s3://bucket/e"
    assert with_absolute_paths(load_config(None, [])).data.path == ""  # the embedded default
