"""End to end through the CLI: train -> evaluate -> export -> retrieve, for ``data.protocol=gr``
(no validation split) and for ``model.mode=sid`` (items scored through their SID-prefix rows only).

Tiny runs on the embedded MovieLens data (a few optimizer steps each, seconds)."""

import json

import pytest

from sidvid_rec.cli import main

TINY = ["data.max_len=20", "model.dim=16", "model.dqk=8", "model.dv=8", "model.num_blocks=1",
        "loss.num_negatives=16", "train.batch_size=128", "train.epochs=1", "train.max_steps=3",
        "eval.batch_size=610", "eval.ks=[1,10,50]", "train.device=cpu"]
SIDS = ["sids.encoder=tfidf", "sids.tfidf_dim=16", "sids.codebook_size=8", "sids.layers=2", "sids.kmeans_iters=3",
        "sids.balance_iters=3"]
K = 10


def _stdout_json(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


def _check_metrics(metrics, count):
    assert set(metrics) >= {"hr@1", "hr@10", "hr@50", "ndcg@10", "ndcg@50", "mrr", "count"}
    assert metrics["count"] == count
    assert 0.0 <= metrics["hr@1"] <= metrics["hr@10"] <= metrics["hr@50"] <= 1.0
    assert 0.0 <= metrics["ndcg@10"] <= metrics["hr@10"] and 0.0 < metrics["mrr"] <= 1.0


def _check_retrieve(capsys, export_dir, data, history):
    """--k K items: distinct, in the catalogue, none from the history, best first."""
    got = _stdout_json(capsys, ["retrieve", str(export_dir), "--internal-ids", "--history",
                                ",".join(map(str, history)), "--k", str(K)])
    ids = [it["item_id"] for it in got["items"]]
    assert len(ids) == K and len(set(ids)) == K
    assert all(1 <= i <= data.num_items for i in ids) and not set(ids) & set(history)
    scores = [it["score"] for it in got["items"]]
    assert scores == sorted(scores, reverse=True)
    assert all(it["title"] == data.item_title[it["item_id"]] for it in got["items"])
    # the same query in raw ids gives the same items, reported as raw ids
    raw = _stdout_json(capsys, ["retrieve", str(export_dir), "--history",
                                ",".join(str(data.item_raw_ids[i]) for i in history), "--k", str(K)])
    assert [it["item_id"] for it in raw["items"]] == [int(data.item_raw_ids[i]) for i in ids]
    return ids, scores


def _data(run):
    from sidvid_rec.config import load_run_config
    from sidvid_rec.data import load_sequences

    return load_sequences(load_run_config(str(run)).data)


def test_gr_protocol_train_evaluate_export_retrieve(tmp_path, capsys):
    cache, run, out = str(tmp_path / "cache"), tmp_path / "run", tmp_path / "export"
    assert main(["train", "--run-dir", str(run), f"data.cache_dir={cache}", "data.protocol=gr", *TINY]) == 0
    written = json.loads((run / "metrics.json").read_text())
    assert "valid" not in written and written["best_epoch"] == 1  # gr: no validation split
    data = _data(run)
    _check_metrics(written["test"], data.num_users)
    evaluated = _stdout_json(capsys, ["evaluate", str(run), "--split", "test"])
    assert evaluated == pytest.approx(written["test"])  # the same checkpoint, the same numbers
    capsys.readouterr()
    assert main(["evaluate", str(run), "--split", "valid"]) == 2
    assert "no validation split" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["mode"] == "id"
    user = 3
    history = data.item_values[data.offsets[user]:data.offsets[user + 1]].tolist()[-20:]
    _check_retrieve(capsys, out, data, history)


def test_sid_mode_train_evaluate_export_retrieve(tmp_path, capsys):
    cache, sids, run, out = str(tmp_path / "cache"), str(tmp_path / "sids"), tmp_path / "run", tmp_path / "export"
    common = [f"data.cache_dir={cache}", *SIDS]
    assert main(["sids", "build", "--out", sids, "--no-progress", *common]) == 0
    assert main(["train", "--run-dir", str(run), f"sids.dir={sids}", "model.mode=sid", *common, *TINY]) == 0
    written = json.loads((run / "metrics.json").read_text())
    data = _data(run)
    for split in ("valid", "test"):
        _check_metrics(written[split], data.num_users)
    assert _stdout_json(capsys, ["evaluate", str(run), "--split", "valid"]) == pytest.approx(written["valid"])
    assert main(["export", str(run), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["mode"] == "sid" and "item_id" not in manifest["tables"]  # SID-prefix rows only
    user = 5
    history = data.item_values[data.offsets[user]:data.offsets[user + 1]].tolist()[-20:]
    ids, scores = _check_retrieve(capsys, out, data, history)
    # The K items are the best of the whole catalogue (history removed). Items sharing a SID have
    # the same vector in this mode, so ties are compared by score, not by id order.
    from sidvid_rec.export.serving import load_export

    full = load_export(str(out)).retrieve(history, k=data.num_items, raw_ids=False)
    assert len(full.ids) == data.num_items - len(set(history))
    full_scores = [it["score"] for it in full.items]
    assert scores == pytest.approx(full_scores[:K], abs=1e-6)
    by_id = {int(i): it["score"] for i, it in zip(full.ids, full.items)}
    assert [by_id[i] for i in ids] == pytest.approx(scores, abs=1e-6)


def _one_line_error(capsys, argv):
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err


def test_sid_table_that_changed_size_is_named_as_such(tmp_path, capsys):
    """Semantic IDs rebuilt with another codebook size under the same sids.dir: resuming or
    evaluating the run says the SID table changed size (it used to blame column-wise sharding)."""
    from sidvid_rec.modules.embeddings import SID_FEATURE
    from sidvid_rec.train import checkpoint as ckpt

    assert ckpt._SID_TABLE == SID_FEATURE  # the name the message keys on is the table's
    cache, sids, run = str(tmp_path / "cache"), str(tmp_path / "sids"), tmp_path / "run"
    common = [f"data.cache_dir={cache}", *SIDS]
    assert main(["sids", "build", "--out", sids, "--no-progress", *common]) == 0
    train = ["train", "--run-dir", str(run), f"sids.dir={sids}", "model.mode=sid", *common, *TINY]
    assert main(train) == 0
    before = (run / "metrics.json").read_text()
    assert main(["sids", "build", "--out", sids, "--no-progress", *common, "sids.codebook_size=5"]) == 0
    for argv in (train + ["train.resume=true", "train.epochs=2"], ["evaluate", str(run), "--split", "valid"],
                 ["export", str(run), "--out", str(tmp_path / "export")]):
        err = _one_line_error(capsys, argv)
        assert "sid_prefix" in err and "semantic IDs changed size" in err, err
        assert "column" not in err, err
    assert (run / "metrics.json").read_text() == before  # nothing was trained or evaluated
    assert not (tmp_path / "export").exists()
