"""End-to-end training on the embedded ml-latest-small with a tiny model (seconds, not minutes)."""

import json
import math
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


# ----------------------------------------------------------------------------- lr schedule


def test_lr_factor_warmup_then_cosine_or_constant():
    from sidvid_rec.train.schedule import lr_factor

    assert [lr_factor(s, 10, warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = [lr_factor(s, 10, 4, "cosine", min_lr_ratio=0.1) for s in range(12)]
    assert cosine[:4] == [0.25, 0.5, 0.75, 1.0]  # warm-up, then from 1 at step 4 ...
    assert cosine[9] == pytest.approx(0.1) and cosine[11] == pytest.approx(0.1)  # ... to the floor at the last
    assert cosine[4] == 1.0 and all(a > b for a, b in zip(cosine[4:9], cosine[5:10]))
    assert lr_factor(6, 10, 4, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 5)))
    assert lr_factor(0, 1, 0, "cosine") == 1.0  # a one-step plan never divides by zero


def test_schedule_drives_dense_and_fused_table_lr(cache_dir):
    """The factor reaches both optimizers: at factor 0 a training step moves no weight at all
    (torchrec's fused table optimizer takes its lr from param_groups), at factor 1 both move."""
    from sidvid_rec.config import load_config
    from sidvid_rec.data import load_sequences, make_split
    from sidvid_rec.data.batches import BatchIterator
    from sidvid_rec.process_group import init_distributed
    from sidvid_rec.train.distributed import build_sharded_model
    from sidvid_rec.train.optimizers import build_optimizers
    from sidvid_rec.train.schedule import build_schedule

    cfg = load_config(None, [f"data.cache_dir={cache_dir}", *TINY, "train.lr_schedule=cosine", "train.epochs=1",
                             "train.max_steps=2", "train.embedding_optimizer=sgd", "train.embedding_lr=0.5"])
    ctx = init_distributed("cpu")
    data = load_sequences(cfg.data)
    model = build_sharded_model(cfg, data, ctx)
    optimizers = build_optimizers(model, cfg.train)
    schedule = build_schedule(optimizers, cfg.train, batches_per_epoch=5)
    assert schedule is not None and schedule.planned_steps == 2 and schedule.scales_tables
    batch = next(iter(BatchIterator(make_split(data, "train", "loo", cfg.data.max_len), 64, shuffle=False)))

    def step(at: int):
        before = {k: v.clone() for k, v in _plain_weights(model).items()}
        assert schedule.apply(at) == pytest.approx(1.0 if at == 0 else 0.0)
        out = model(batch, generator=torch.Generator().manual_seed(0))
        optimizers.zero_grad()
        out.loss.backward()
        optimizers.step()
        after = _plain_weights(model)
        return {k for k in before if not torch.equal(before[k], after[k])}

    moved = step(0)
    assert any("embedding_bags" in k for k in moved) and any("embedding_bags" not in k for k in moved)
    assert optimizers.fused.param_groups[0]["lr"] == pytest.approx(0.5)
    assert step(1) == set()  # cosine's end, min_lr_ratio 0: lr 0 for the tables and the dense part
    assert optimizers.fused.param_groups[0]["lr"] == 0.0 and optimizers.dense.param_groups[0]["lr"] == 0.0
    assert build_schedule(optimizers, load_config(None, []).train, 5) is None  # constant lr: no schedule


def _plain_weights(model):
    from sidvid_rec.train.distributed import gather_state_dict

    return {k: v for k, v in gather_state_dict(model.state_dict()).items() if torch.is_tensor(v) and v.is_floating_point()}


def test_scheduled_run_resumes_like_the_uninterrupted_one(tmp_path, cache_dir):
    """Warm-up + cosine planned over 2 epochs: stopped after epoch 1 and resumed, the run ends
    exactly where the uninterrupted one does (the plan travels in the checkpoint record)."""
    sched = ["train.lr_schedule=cosine", "train.warmup_steps=3", "train.min_lr_ratio=0.1", "train.schedule_epochs=2"]
    straight = tmp_path / "straight"
    assert _train(straight, cache_dir, "train.epochs=2", *sched) == 0
    resumed = tmp_path / "resumed"
    assert _train(resumed, cache_dir, "train.epochs=1", *sched) == 0
    # the resume says nothing about the schedule: the saved plan is used
    assert _train(resumed, cache_dir, "train.epochs=2", "train.resume=true", "train.lr_schedule=cosine",
                  "train.warmup_steps=3", "train.min_lr_ratio=0.1") == 0
    a, b = _metrics(straight), _metrics(resumed)
    for key, value in a["valid"].items():
        assert b["valid"][key] == pytest.approx(value, abs=1e-6), key
    constant = tmp_path / "constant"
    assert _train(constant, cache_dir, "train.epochs=2") == 0
    assert _metrics(constant)["valid"] != a["valid"]  # the schedule did change training


def test_reference_recipe_adam_tables_on_cpu(tmp_path, cache_dir):
    """train.embedding_optimizer=adam on CPU (no fused Adam kernel there): the tables take the
    dense data-parallel kernel and a second AdamW group at train.embedding_lr; every row moves
    like any other parameter; the run trains, checkpoints and resumes exactly."""
    from sidvid_rec.config import load_config
    from sidvid_rec.data import load_sequences
    from sidvid_rec.process_group import init_distributed
    from sidvid_rec.train.distributed import build_sharded_model
    from sidvid_rec.train.optimizers import build_optimizers

    recipe = ["train.embedding_optimizer=adam", "train.embedding_lr=0.002", "model.attention_scale=max_len"]
    cfg = load_config(None, [f"data.cache_dir={cache_dir}", *TINY, *recipe])
    model = build_sharded_model(cfg, load_sequences(cfg.data), init_distributed("cpu"))
    optimizers = build_optimizers(model, cfg.train)
    groups = optimizers.dense.param_groups
    assert [g["lr"] for g in groups] == [0.001, 0.002] and len(groups[1]["params"]) == 1
    table = groups[1]["params"][0]
    assert table.shape == (9725, 16) and 0.01 < float(table.detach().std()) < 0.03  # N(0, 0.02) rows
    assert list(optimizers.fused.param_groups) == []  # no fused optimizer left
    with pytest.raises(Exception, match="dense kernel"):
        build_sharded_model(load_config(None, [f"data.cache_dir={cache_dir}", *TINY, *recipe,
                                               "train.sharding=table_wise"]), load_sequences(cfg.data),
                            init_distributed("cpu"))

    straight = tmp_path / "straight"
    assert _train(straight, cache_dir, "train.epochs=2", *recipe) == 0
    resumed = tmp_path / "resumed"
    assert _train(resumed, cache_dir, "train.epochs=1", *recipe) == 0
    assert _train(resumed, cache_dir, "train.epochs=2", "train.resume=true", *recipe) == 0
    a, b = _metrics(straight), _metrics(resumed)
    assert a["valid"]["hr@200"] > 0.05  # it learns
    for key, value in a["valid"].items():
        assert b["valid"][key] == pytest.approx(value, abs=1e-6), key
