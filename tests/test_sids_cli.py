"""``sidvid-rec embed`` and ``sidvid-rec sids build|report|compare`` end to end, in-process.

Runs on the embedded ml-latest-small (9,724 items) with the weight-free tfidf encoder and a
small codebook so that the whole file stays within a few seconds.
"""

import json
import os

import numpy as np
import pytest

from sidvid_rec.cli import main
from sidvid_rec.semantic_ids import load_sid_artifacts
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
