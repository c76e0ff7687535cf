"""``sidvid-rec recommend``: batch top-K from an export equals ``retrieve``, resumes, refuses bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sidvid_rec import storage
from sidvid_rec.cli import main

TINY = ["data.max_len=20", "model.dim=18", "model.dqk=8", "model.dv=8", "model.num_blocks=1",
        "loss.num_negatives=16", "train.batch_size=128", "train.epochs=1", "train.max_steps=3", "eval.batch_size=610",
        "train.device=cpu"]
COBRA_SIDS = ["sids.encoder=tfidf", "sids.tfidf_dim=16", "sids.codebook_size=8", "sids.layers=2",
              "sids.kmeans_iters=3", "sids.balance_iters=3"]
COBRA = ["model.mode=cobra", "model.sid_dedup=true", "data.max_len=12", "model.dim=14", "model.dqk=8", "model.dv=8",
         "model.num_blocks=1", "train.batch_size=128", "train.epochs=1", "train.max_steps=3", "eval.ks=[1,10]",
         "eval.batch_size=610", "eval.beam_size=3", "eval.beam_ann=20", "train.device=cpu"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("recommend")
    cache, run, out = str(root / "cache"), root / "run", root / "export"
    assert main(["train", "--run-dir", str(run), f"data.cache_dir={cache}", *TINY]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    return {"root": root, "out": str(out), "cache": cache}


def _rows(path):
    if path.endswith(".jsonl"):
        with open(path) as f:
            return [json.loads(line) for line in f]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _args(export, out, *extra):
    return ["recommend", export, "--out", str(out), "--k", "10", "--no-progress", *extra]


def _history(data, user):
    lo, hi = int(data.offsets[user]), int(data.offsets[user + 1])
    return [int(data.item_raw_ids[i]) for i in data.item_values[lo:hi]], data.timestamps[lo:hi].tolist()


def test_recommend_equals_retrieve_for_sampled_users(exported, tmp_path):
    from sidvid_rec.export.recommend import data_config
    from sidvid_rec.data import load_sequences
    from sidvid_rec.export.serving import load_export

    model = load_export(exported["out"])
    assert model.manifest["data"]["path"] == "" and model.manifest["data"]["format"] == "auto"
    jsonl, parquet = tmp_path / "top.jsonl", tmp_path / "top.parquet"
    assert main(_args(exported["out"], jsonl, "--batch-size", "64", "--chunk-users", "200")) == 0
    assert main(_args(exported["out"], parquet, "--batch-size", "100")) == 0
    rows = _rows(str(jsonl))
    assert rows == _rows(str(parquet))
    data = load_sequences(data_config(model.manifest, []))
    assert [r["user_id"] for r in rows] == data.user_raw_ids.tolist()  # every user, in id order
    assert not os.path.exists(tmp_path / ".top.jsonl.parts") and not os.path.exists(tmp_path / ".top.parquet.parts")
    for user in range(0, data.num_users, 61):
        history, times = _history(data, user)
        got = model.retrieve(history, k=10, timestamps=times)
        assert rows[user]["item_ids"] == [it["item_id"] for it in got.items], user
        assert rows[user]["scores"] == [it["score"] for it in got.items], user


def test_users_file_and_bad_input(exported, tmp_path, capsys):
    from sidvid_rec.export.recommend import data_config
    from sidvid_rec.data import load_sequences
    from sidvid_rec.export.serving import load_export

    data = load_sequences(data_config(load_export(exported["out"]).manifest, []))
    wanted = [int(data.user_raw_ids[i]) for i in (40, 3, 40, 500)]
    users = tmp_path / "users.txt"
    users.write_text("\n".join(map(str, wanted)) + "\n\n")
    out = tmp_path / "some.jsonl"
    assert main(_args(exported["out"], out, "--users", str(users))) == 0
    assert [r["user_id"] for r in _rows(str(out))] == [wanted[0], wanted[1], wanted[3]]  # file order, once each

    def error(argv):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    bad = tmp_path / "bad.jsonl"
    assert "must end in .parquet or .jsonl" in error(_args(exported["out"], tmp_path / "top.csv"))
    users.write_text(f"{wanted[0]}\n999999999\n")
    assert "line 2: user 999999999 is not in the data set" in error(_args(exported["out"], bad, "--users", str(users)))
    users.write_text(f"{wanted[0]}\nabc\n")
    assert "line 2: 'abc' is not an integer user id" in error(_args(exported["out"], bad, "--users", str(users)))
    assert "users file does not exist" in error(_args(exported["out"], bad, "--users", str(tmp_path / "nope.txt")))
    assert "--decoder applies to COBRA exports" in error(_args(exported["out"], bad, "--decoder", "beam"))
    assert "data.* overrides only" in error(_args(exported["out"], bad, "train.epochs=2"))
    assert "must be positive" in error(_args(exported["out"], bad, "--batch-size", "0"))
    users.write_text("\n\n")
    assert "holds no user ids" in error(_args(exported["out"], bad, "--users", str(users)))
    assert sorted(os.listdir(tmp_path)) == ["some.jsonl", "users.txt"]  # nothing half-written
    foreign = tmp_path / ".bad.jsonl.parts"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "was not written by `recommend`" in error(_args(exported["out"], bad))
    assert (foreign / "notes.txt").read_text() == "mine" and not bad.exists()


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_resume_after_a_kill_gives_the_same_output(exported, tmp_path):
    from sidvid_rec.export.recommend import make_job

    fresh = tmp_path / "fresh.jsonl"
    assert main(_args(exported["out"], fresh, "--chunk-users", "100", "--batch-size", "32")) == 0
    out = tmp_path / "top.jsonl"
    # A killed run: part 0 complete, part 1 a temporary its (dead) writer left half-written.
    job = make_job(exported["out"], "all", 10, str(out), batch_size=32, chunk_users=100, progress=False)
    assert job.open_parts() == 0
    job.write_part(0)
    done = os.stat(job.part_path(0)).st_mtime_ns
    parts = tmp_path / ".top.jsonl.parts"
    partial = parts / f".part-000001.jsonl.tmp-{_dead_pid()}-{storage._host_key()}-0123abcd"
    partial.write_text('{"user_id": 1, "item_ids": [')
    assert os.stat(job.part_path(0)).st_mtime_ns == done
    summary = job.key()
    rerun = make_job(exported["out"], "all", 10, str(out), batch_size=64, chunk_users=100, progress=False)
    assert rerun.key() == summary  # the batch size is not part of the job
    assert rerun.open_parts() == 1 and os.stat(job.part_path(0)).st_mtime_ns == done  # part 0 kept
    assert main(_args(exported["out"], out, "--chunk-users", "100", "--batch-size", "64")) == 0
    assert out.read_bytes() == fresh.read_bytes()
    assert not parts.exists()
    # Another job's parts (other K) are replaced, not mixed in.
    other = make_job(exported["out"], "all", 5, str(out), batch_size=64, chunk_users=100, progress=False)
    other.open_parts()
    other.write_part(0)
    # The finished output exists: replacing a file needs --overwrite (no manifest proves its writer).
    assert main(_args(exported["out"], out, "--chunk-users", "100")) == 2
    assert main(_args(exported["out"], out, "--chunk-users", "100", "--overwrite")) == 0
    assert out.read_bytes() == fresh.read_bytes()


def test_cobra_recommend_takes_any_decoder(tmp_path_factory):
    from sidvid_rec.export.serving import load_export
    from sidvid_rec.data import load_sequences
    from sidvid_rec.export.recommend import data_config

    root = tmp_path_factory.mktemp("recommend_cobra")
    cache, sids, run, export = str(root / "cache"), str(root / "sids"), root / "run", str(root / "export")
    common = [f"data.cache_dir={cache}", *COBRA_SIDS]
    assert main(["sids", "build", "--out", sids, "--no-progress", *common]) == 0
    assert main(["train", "--run-dir", str(run), f"sids.dir={sids}", *common, *COBRA]) == 0
    assert main(["export", str(run), "--out", export]) == 0
    model = load_export(export)
    data = load_sequences(data_config(model.manifest, []))
    users = root / "users.txt"
    picked = list(range(0, data.num_users, 97))
    users.write_text("\n".join(str(int(data.user_raw_ids[u])) for u in picked))
    for decoder in ("beam", "direct"):
        out = root / f"{decoder}.parquet"
        assert main(_args(export, out, "--users", str(users), "--decoder", decoder, "--batch-size", "3")) == 0
        rows = _rows(str(out))
        for row, user in zip(rows, picked):
            history, times = _history(data, user)
            got = model.retrieve(history, k=10, timestamps=times, decoder=decoder)
            assert row["item_ids"] == [it["item_id"] for it in got.items], (decoder, user)
            np.testing.assert_allclose(row["scores"], [it["score"] for it in got.items], atol=1e-5)
