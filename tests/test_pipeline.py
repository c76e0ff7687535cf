"""``sidvid-rec pipeline``: embed -> sids -> train -> evaluate -> export, skipping current steps."""

import json

from sidvid_rec.cli import main

# sid_id needs every step; the TF-IDF encoder needs no weights and takes seconds.
FAST = ["train.device=cpu", "model.mode=sid_id", "sids.encoder=tfidf", "sids.tfidf_dim=32", "sids.layers=2", "sids.codebook_size=16",
        "sids.kmeans_iters=5", "data.max_len=20", "model.dim=8", "model.dqk=8", "model.dv=8", "model.num_blocks=1",
        "loss.num_negatives=16", "train.epochs=1", "train.max_steps=2", "eval.batch_size=610", "eval.ks=[10,50]"]


def _pipeline(capsys, run, cache, *extra):
    capsys.readouterr()
    rc = main(["pipeline", "--run-dir", str(run), f"data.cache_dir={cache}", *FAST, *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    assert "(most popular, the same evaluation: HR@10 " in captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


def test_pipeline_runs_each_step_once_and_reruns_what_changed(tmp_path, capsys):
    run, cache = tmp_path / "run", str(tmp_path / "cache")
    first = _pipeline(capsys, run, cache)
    assert first["steps"] == {s: "ran" for s in ("embed", "sids", "train", "evaluate", "export")}
    assert first["test"]["count"] == 610
    # the most-popular baseline, measured by the same evaluation, beside the model's figures
    assert set(first["most_popular"]) == set(first["test"]) and first["most_popular"]["count"] == 610
    assert 0 < first["most_popular"]["hr@10"] < 1
    export = run / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["model"]["mode"] == "sid_id" and "sids/codes.safetensors" in manifest["files"]
    assert "sid_prefix" in manifest["tables"]

    again = _pipeline(capsys, run, cache)
    assert set(again["steps"].values()) == {"skipped (current)"}

    # Only an evaluation option changed: only the evaluation runs again.
    changed = _pipeline(capsys, run, cache, "eval.ks=[5,10]")
    assert changed["steps"] == {"embed": "skipped (current)", "sids": "skipped (current)",
                                "train": "skipped (current)", "evaluate": "ran", "export": "skipped (current)"}
    assert set(changed["test"]) >= {"hr@5", "ndcg@5"}

    capsys.readouterr()
    assert main(["retrieve", str(export), "--history", "1,50,260", "--k", "3"]) == 0
    items = json.loads(capsys.readouterr().out)["items"]
    assert len(items) == 3 and all(set(it) == {"item_id", "title", "score"} for it in items)


def test_pipeline_stops_at_a_failing_step(tmp_path, capsys):
    capsys.readouterr()
    rc = main(["pipeline", "--run-dir", str(tmp_path / "run"), f"data.cache_dir={tmp_path / 'cache'}", *FAST,
               "sids.encoder=/no/such/model"])
    err = capsys.readouterr().err
    assert rc == 2 and "embed: failed" in err
    assert not (tmp_path / "run" / "sids").exists()
