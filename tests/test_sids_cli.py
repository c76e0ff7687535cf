"""``sidvid-rec embed`` and ``sidvid-rec sids build|report|compare`` end to end, in-process.

Runs on the embedded ml-latest-small (9,724 items) with the weight-free tfidf encoder and a
small codebook so that the whole file stays within a few seconds.
"""

import json
import os

import numpy as np
import pytest

from sidvid_rec.cli import main
from sidvid_rec.semantic_ids import SemanticIdCodebook, load_sid_artifacts
from sidvid_rec.text import load_embeddings, save_embeddings

NUM_ITEMS = 9724


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("sids_cli")


def common(workdir):
    return [f"data.cache_dir={workdir}/cache", "sids.encoder=tfidf", "sids.tfidf_dim=16", "sids.layers=2",
            "sids.codebook_size=16", "sids.balance_iters=10", "sids.kmeans_iters=10"]


@pytest.fixture(scope="module")
def embeddings(workdir):
    out = str(workdir / "emb.safetensors")
    assert main(["embed", "--out", out, "--no-progress"] + common(workdir)) == 0
    return out


@pytest.fixture(scope="module")
def builds(workdir, embeddings):
    dirs = {}
    for balance in ("balanced", "none"):
        dirs[balance] = str(workdir / f"sids_{balance}")
        argv = ["sids", "build", "--out", dirs[balance], "--embeddings", embeddings, "--no-progress"]
        assert main(argv + common(workdir) + [f"sids.balance={balance}"]) == 0
    return dirs


def test_embed_output(embeddings):
    emb = load_embeddings(embeddings)
    assert emb.vectors.shape == (NUM_ITEMS + 1, 16) and not emb.vectors[0].any()
    assert emb.manifest["encoder"]["encoder"] == "tfidf" and emb.manifest["data_fingerprint"]


def test_build_report_json_and_files(builds, capsys):
    capsys.readouterr()
    assert main(["sids", "report", builds["balanced"], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["layers"]) == 2 and 0.0 <= report["collision_rate"] <= 1.0
    for row in report["layers"]:
        assert {"utilization", "entropy", "mse", "cosine"} <= set(row)
        assert row["entropy"] >= 0.99 and row["utilization"] == 1.0 and row["mse"] is not None
    for name in ("report.md", "code_usage.png"):
        assert os.path.getsize(os.path.join(builds["balanced"], name)) > 100
    art = load_sid_artifacts(builds["balanced"])
    assert art.num_items == NUM_ITEMS and art.codes.shape == (NUM_ITEMS + 1, 2)
    assert art.manifest["params"]["balance"] == "balanced" and art.manifest["encoder"]["encoder"] == "tfidf"


def test_balanced_beats_plain_on_entropy(builds, capsys):
    capsys.readouterr()
    assert main(["sids", "compare", builds["none"], builds["balanced"], "--json"]) == 0
    both = json.loads(capsys.readouterr().out)
    for plain, balanced in zip(both["a"]["layers"], both["b"]["layers"]):
        assert balanced["entropy"] > plain["entropy"]
    assert main(["sids", "compare", builds["none"], builds["balanced"]]) == 0
    table = capsys.readouterr().out
    assert "sids_none" in table and "sids_balanced" in table and "collision rate" in table


def test_build_without_embeddings_reuses_the_cache(workdir, embeddings, monkeypatch):
    """`embed` filled the cache: `sids build` must not encode a single text."""
    from sidvid_rec.text.encoders import TfidfEncoder

    def refuse(self, texts):
        raise AssertionError(f"encoded {len(texts)} texts despite the cache")

    monkeypatch.setattr(TfidfEncoder, "encode", refuse)
    out = str(workdir / "sids_cached")
    assert main(["sids", "build", "--out", out, "--no-progress"] + common(workdir)) == 0
    emb = load_embeddings(embeddings)
    art = load_sid_artifacts(out)
    assert art.manifest["embeddings_sha256"] == emb.manifest["vectors_sha256"]


def one_line_error(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error:" in err
    return err


def test_bad_inputs(workdir, embeddings, capsys):
    out = str(workdir / "never")
    err = one_line_error(capsys, ["sids", "build", "--out", out, "--embeddings", embeddings, "--no-progress"]
                         + common(workdir) + ["sids.codebook_size=20000"])
    assert "larger than the number of items" in err and not os.path.exists(out)
    err = one_line_error(capsys, ["sids", "build", "--out", out, "--no-progress"]
                         + common(workdir) + ["sids.encoder=/no/such/model"])
    assert "available encoders" in err and "minilm" in err and not os.path.exists(out)
    wrong = str(workdir / "wrong.safetensors")
    save_embeddings(wrong, np.zeros((11, 4), np.float32), {"data_fingerprint": "x"})
    err = one_line_error(capsys, ["sids", "build", "--out", out, "--embeddings", wrong] + common(workdir))
    assert "holds 10 items" in err and not os.path.exists(out)
    err = one_line_error(capsys, ["sids", "report", str(workdir)])
    assert "not a semantic-ID artifact" in err
    for argv in (["embed", "--out", str(workdir)], ["sids", "build", "--out", str(workdir)]):
        err = one_line_error(capsys, argv + common(workdir))
        assert "refusing to replace" in err and os.path.exists(embeddings)


# ----------------------------------------------------------------------------- RQ-VAE

RQVAE = ["sids.method=rqvae", "sids.rqvae_hidden=32", "sids.rqvae_latent=8", "sids.rqvae_epochs=8",
         "sids.rqvae_patience=3", "sids.rqvae_batch_size=512"]


@pytest.fixture(scope="module")
def rqvae_build(workdir, embeddings):
    out = str(workdir / "sids_rqvae")
    argv = ["sids", "build", "--out", out, "--embeddings", embeddings, "--no-progress"]
    assert main(argv + common(workdir) + RQVAE) == 0
    return out


def test_rqvae_build_artifacts_and_compare(rqvae_build, builds, embeddings, capsys):
    art = load_sid_artifacts(rqvae_build)
    assert art.method == "rqvae" and art.manifest["params"]["method"] == "rqvae"
    assert art.codes.shape == (NUM_ITEMS + 1, 2) and art.codebooks.shape == (2, 16, 8)
    assert load_sid_artifacts(builds["balanced"]).method == "rqkmeans"
    book = SemanticIdCodebook.from_artifacts(art, use_dedup=True)
    assert book.num_sids == NUM_ITEMS  # the disambiguation code makes every SID unique, as for RQ-KMeans
    capsys.readouterr()
    assert main(["sids", "compare", builds["balanced"], rqvae_build, "--json"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert both["a"]["method"] == "rqkmeans" and both["b"]["method"] == "rqvae"
    assert all(row["mse"] is not None and row["utilization"] > 0 for row in both["b"]["layers"])
    assert main(["sids", "compare", builds["balanced"], rqvae_build]) == 0
    table = capsys.readouterr().out
    assert "| method | rqkmeans | rqvae |" in table and "collision rate" in table
    stored = json.loads(open(os.path.join(rqvae_build, "report.json")).read())
    assert main(["sids", "report", rqvae_build, "--json", "--embeddings", embeddings]) == 0
    recomputed = json.loads(capsys.readouterr().out)  # decoded through the stored RQ-VAE weights
    assert recomputed["layers"][-1]["mse"] == pytest.approx(stored["layers"][-1]["mse"], rel=1e-5)


def test_sid_id_trains_on_rqvae_sids(workdir, rqvae_build, capsys):
    run = str(workdir / "run_rqvae")
    argv = ["train", "--run-dir", run, f"data.cache_dir={workdir}/cache", f"sids.dir={rqvae_build}",
            "model.mode=sid_id", "model.sid_dedup=true", "data.max_len=20", "model.dim=8", "model.dqk=8",
            "model.dv=8", "model.num_blocks=1", "loss.num_negatives=16", "train.epochs=1", "train.max_steps=2",
            "eval.batch_size=610", "eval.ks=[10,50]"]
    capsys.readouterr()
    rc = main(argv)
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert os.path.exists(os.path.join(run, "config.yaml"))


@pytest.mark.parametrize("override, message", [
    ("sids.method=vqvae", "sids.method: 'vqvae' is not one of 'rqkmeans', 'rqvae'"),
    ("sids.rqvae_lr=0", "sids.rqvae_lr must be positive and finite"),
    ("sids.rqvae_beta=-1", "sids.rqvae_beta must be >= 0 and finite"),
    ("sids.rqvae_hidden=0", "sids.rqvae_hidden must be positive"),
    ("sids.rqvae_latent=-3", "sids.rqvae_latent must be positive"),
    ("sids.rqvae_epochs=0", "sids.rqvae_epochs must be positive"),
    ("sids.rqvae_patience=0", "sids.rqvae_patience must be positive"),
    ("sids.rqvae_batch_size=0", "sids.rqvae_batch_size must be positive"),
    ("sids.rqvae_val_fraction=1", "sids.rqvae_val_fraction must lie in (0, 1)"),
    ("sids.rqvae_restarts=maybe", "sids.rqvae_restarts: expected true or false"),
    ("sids.codebook_size=9000", "larger than the number of RQ-VAE training items"),
])
def test_rqvae_bad_values(workdir, embeddings, capsys, override, message):
    out = str(workdir / "never_rqvae")
    err = one_line_error(capsys, ["sids", "build", "--out", out, "--embeddings", embeddings, "--no-progress"]
                         + common(workdir) + RQVAE + [override])
    assert message in err and not os.path.exists(out), err
