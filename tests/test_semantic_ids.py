"""Balanced residual k-means, SID artifacts and the quality report."""

import math
import os

import numpy as np
import pytest
import torch

from sidvid_rec.errors import ArtifactError, UserError
from sidvid_rec.semantic_ids.codebook import SemanticIdCodebook
from sidvid_rec.semantic_ids import (PAD_CODE, RqParams, RqVaeParams, build_semantic_ids, dedup_codes, load_report,
                                     load_sid_artifacts, quantize, residual_kmeans, sid_report, size_bounds,
                                     train_rqvae, write_semantic_ids)
from sidvid_rec.semantic_ids.rqvae import load_rqvae_model
from sidvid_rec.semantic_ids.kmeans import balanced_kmeans, group_rank, plain_kmeans, repair_assignment, search


def skewed(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors from a mixture with very unequal weights (plain k-means comes out unbalanced)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((12, dim)).astype(np.float32)
    weights = 1.0 / np.arange(1, 13) ** 1.5
    comp = rng.choice(12, size=n, p=weights / weights.sum())
    x = centers[comp] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------- k-means


def test_size_bounds():
    b = size_bounds(100, 4, 0.1)
    assert (b.lower, b.upper) == (23, 27)  # ceil(22.5), floor(27.5)
    b = size_bounds(9724, 128, 0.1)
    assert (b.lower, b.upper) == (math.ceil(9724 / 128 * 0.9), math.floor(9724 / 128 * 1.1)) == (69, 83)
    b = size_bounds(100, 4, 0.0)  # exact: 25 each
    assert (b.lower, b.upper) == (25, 25)
    b = size_bounds(10, 3, 0.0)  # infeasible at tol=0: widened to [floor, ceil]
    assert (b.lower, b.upper) == (3, 4)


def test_group_rank():
    groups = np.array([2, 0, 2, 0, 2, 1])
    keys = np.array([5.0, 1.0, 3.0, 0.5, 3.0, 9.0])
    # group 2: keys 5, 3, 3 -> ranks 2, 0, 1 (tie: lower index first); group 0: 1, 0.5 -> 1, 0
    assert group_rank(groups, keys).tolist() == [2, 1, 0, 0, 1, 0]


@pytest.mark.parametrize("tol, per_code", [(0.0, 256), (0.05, 256), (0.2, 256), (0.1, 20)])
def test_balanced_sizes_within_bounds(tol, per_code):
    """per_code=20: the rounds run on a 320-point sample, then on all 3000 points."""
    x = skewed(3000, 16, seed=1)
    k = 16
    plain = np.bincount(plain_kmeans(x, k, 10, seed=0).assign, minlength=k)
    bounds = size_bounds(3000, k, tol)
    assert plain.max() > bounds.upper or plain.min() < bounds.lower  # the data really is unbalanced
    result = balanced_kmeans(x, k, tol, kmeans_iters=10, balance_iters=10, seed=0, max_points_per_code=per_code)
    sizes = np.bincount(result.assign, minlength=k)
    assert sizes.min() >= bounds.lower and sizes.max() <= bounds.upper, (sizes, bounds)
    # centroids are the means of the returned clusters
    np.testing.assert_allclose(result.centroids[3], x[result.assign == 3].mean(0), atol=1e-5)


def test_repair_from_degenerate_assignment():
    """Every point nearest to one centroid: the repair must still meet both bounds."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 8)).astype(np.float32) * 0.01
    centroids = np.concatenate([np.zeros((1, 8)), 10 + rng.standard_normal((9, 8))]).astype(np.float32)
    bounds = size_bounds(500, 10, 0.1)
    dist, idx = search(x, centroids, 4)
    assert (idx[:, 0] == 0).all()
    sizes = np.bincount(repair_assignment(x, centroids, dist, idx, bounds), minlength=10)
    assert sizes.min() >= bounds.lower and sizes.max() <= bounds.upper


def test_residual_kmeans_deterministic_and_improving():
    x = skewed(1200, 12, seed=2)
    params = RqParams(layers=3, codebook_size=8, balance="balanced", tol=0.1, kmeans_iters=10, balance_iters=5,
                      max_points_per_code=50)  # sampled rounds + full rounds
    a = residual_kmeans(x, params, progress=False)
    b = residual_kmeans(x, params, progress=False)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.codebooks, b.codebooks)
    assert a.codes.shape == (1200, 3) and a.codebooks.shape == (3, 8, 12)
    mse = [r["mse"] for r in sid_report(a.codes, a.codebooks, x)["layers"]]
    assert mse[0] > mse[1] > mse[2]  # each residual layer reconstructs better


def test_quantize_reproduces_plain_codes():
    x = skewed(800, 8, seed=3)
    rq = residual_kmeans(x, RqParams(layers=2, codebook_size=6, balance="none", kmeans_iters=8), progress=False)
    np.testing.assert_array_equal(quantize(x, rq.codebooks), rq.codes)


def test_dedup_codes():
    codes = np.array([[0, 1], [2, 3], [0, 1], [0, 1], [2, 3], [1, 1]])
    assert dedup_codes(codes).tolist() == [0, 0, 1, 2, 1, 0]


# ----------------------------------------------------------------------------- report


def tiny():
    x = np.array([[1, 0], [0, 1], [1, 0], [0, -1]], dtype=np.float32)
    codebooks = np.array([[[1, 0], [0, 0.5]], [[0, 0.5], [0, -1.5]]], dtype=np.float32)
    codes = np.array([[0, 0], [1, 0], [0, 0], [1, 1]])
    return x, codebooks, codes


def test_report_matches_hand_computed_values():
    x, codebooks, codes = tiny()
    report = sid_report(codes, codebooks, x)
    l1, l2 = report["layers"]
    assert l1["utilization"] == 1.0 and l1["entropy"] == pytest.approx(1.0)
    # layer-1 errors (0,0) (0,.5) (0,0) (0,-1.5): 2.5 / (4 items * 2 dims); item 4 points the other way
    assert l1["mse"] == pytest.approx(0.3125) and l1["cosine"] == pytest.approx(0.5)
    assert (l1["min_size"], l1["max_size"]) == (2, 2)
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert l2["entropy"] == pytest.approx(h) and l2["utilization"] == 1.0
    # layer-2 errors: items 1, 3 are off by (0, -.5); cos(x, (1, .5)) = 1/sqrt(1.25)
    assert l2["mse"] == pytest.approx(0.0625)
    assert l2["cosine"] == pytest.approx(2 * (1 - 1 / math.sqrt(1.25)) / 4)
    assert (l2["min_size"], l2["max_size"]) == (1, 3)
    assert report["prefix_collision_rate"] == [1.0, 0.5] and report["collision_rate"] == 0.5
    assert report["unique_sids"] == 3 and report["max_items_per_sid"] == 2


# ----------------------------------------------------------------------------- artifacts


def build_tiny_artifacts(tmp_path, dedup=True):
    x = skewed(600, 8, seed=4)
    sids = build_semantic_ids(x, RqParams(layers=2, codebook_size=4, kmeans_iters=5, balance_iters=3),
                              use_dedup=dedup, progress=False)
    out = str(tmp_path / "sids")
    write_semantic_ids(out, sids, x, {"encoder": {"encoder": "test"}, "data_fingerprint": "abc"})
    return out, sids, x


def test_codes_round_trip_through_artifacts(tmp_path):
    out, sids, x = build_tiny_artifacts(tmp_path)
    art = load_sid_artifacts(out)
    assert art.codes.shape == (601, 2) and (art.codes[0] == PAD_CODE).all() and art.dedup[0] == PAD_CODE
    np.testing.assert_array_equal(art.codes[1:], sids.codes)
    np.testing.assert_array_equal(art.dedup[1:], sids.dedup)
    np.testing.assert_array_equal(art.codebooks, sids.codebooks)
    assert art.codebook_size == 4 and art.layers == 2 and art.num_items == 600 and art.dim == 8
    full = SemanticIdCodebook.from_artifacts(art, art.use_dedup).codes[1:]
    assert full.shape == (600, 3) and len({tuple(r) for r in full}) == 600  # dedup makes SIDs unique
    sid = tuple(art.codes[7])
    items = SemanticIdCodebook(art.codes).items_of(sid)
    assert 7 in items and all(tuple(art.codes[i]) == sid for i in items)
    assert art.manifest["data_fingerprint"] == "abc" and art.manifest["params"]["codebook_size"] == 4
    report = load_report(out)
    assert report["layers"][0]["entropy"] > 0.99
    assert "| layer |" in open(os.path.join(out, "report.md")).read()
    with open(os.path.join(out, "code_usage.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_tampered_or_incomplete_artifacts(tmp_path):
    out, _, _ = build_tiny_artifacts(tmp_path)
    codes_path = os.path.join(out, "codes.safetensors")
    blob = bytearray(open(codes_path, "rb").read())
    blob[-1] ^= 1
    open(codes_path, "wb").write(bytes(blob))
    with pytest.raises(ArtifactError, match="sha256 differs"):
        load_sid_artifacts(out)
    os.remove(codes_path)
    with pytest.raises(ArtifactError, match="missing"):
        load_sid_artifacts(out)
    with pytest.raises(ArtifactError, match="not a semantic-ID artifact"):
        load_sid_artifacts(str(tmp_path / "nothing"))


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    params = RqParams(layers=2, codebook_size=4)
    with pytest.raises(UserError, match="empty"):
        residual_kmeans(np.zeros((0, 8), np.float32), params, progress=False)
    with pytest.raises(UserError, match="larger than the number of items"):
        residual_kmeans(np.ones((3, 8), np.float32), params, progress=False)
    x = skewed(50, 8, seed=5)
    x[7, 2] = np.nan
    with pytest.raises(UserError, match="NaN"):
        residual_kmeans(x, params, progress=False)
    _, codebooks, codes = tiny()
    with pytest.raises(UserError, match="does not match the codebooks' dim"):
        sid_report(codes, codebooks, np.zeros((4, 3), np.float32))
    with pytest.raises(UserError, match="does not match the codebooks' dim"):
        quantize(np.zeros((4, 3), np.float32), codebooks)
    with pytest.raises(UserError, match="non-empty"):
        sid_report(np.zeros((0, 2), np.int64), codebooks)


def test_never_replaces_a_foreign_directory(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    x = skewed(100, 4, seed=6)
    sids = build_semantic_ids(x, RqParams(layers=1, codebook_size=2, kmeans_iters=2, balance_iters=1),
                              progress=False)
    with pytest.raises(UserError, match="refusing to replace"):
        write_semantic_ids(str(precious), sids, x, {})
    assert (precious / "notes.txt").read_text() == "keep me"
    out = str(tmp_path / "sids")
    write_semantic_ids(out, sids, x, {})
    write_semantic_ids(out, sids, x, {})  # an earlier build is replaced as a whole
    assert load_sid_artifacts(out).num_items == 100


@pytest.mark.parametrize("n, k, tol, per_code", [(1200, 8, 0.1, 256), (1200, 8, 0.05, 40), (997, 6, 0.0, 256)])
def test_balanced_bounds_hold_on_every_residual_layer(n, k, tol, per_code):
    """Each layer clusters the previous layer's residuals of *all* items with balanced k-means,
    so every layer's code sizes over the N items lie in size_bounds(N, K, tol), not only the
    first layer's (layer seeds differ; per_code=40 takes the sampled + full-rounds path;
    n=997, tol=0 needs the [floor, ceil] widening). Sizes *within* a parent prefix are not
    promised: a residual layer is one global clustering, not one per parent."""
    x = skewed(n, 12, seed=7)
    params = RqParams(layers=3, codebook_size=k, balance="balanced", tol=tol, kmeans_iters=8, balance_iters=6,
                      max_points_per_code=per_code)
    rq = residual_kmeans(x, params, progress=False)
    bounds = size_bounds(n, k, tol)
    assert len(rq.rounds) == len(rq.converged) == 3
    report = sid_report(rq.codes, rq.codebooks, x)
    for layer in range(3):
        sizes = np.bincount(rq.codes[:, layer], minlength=k)
        assert sizes.sum() == n and sizes.size == k
        assert sizes.min() >= bounds.lower and sizes.max() <= bounds.upper, (layer, sizes, bounds)
        assert (report["layers"][layer]["min_size"], report["layers"][layer]["max_size"]) == (sizes.min(), sizes.max())
        # each layer's codebook is the mean of its clusters' residuals (what the next layer clusters)
        residual = x - sum(rq.codebooks[j][rq.codes[:, j]] for j in range(layer))
        members = rq.codes[:, layer] == 1
        np.testing.assert_allclose(rq.codebooks[layer][1], residual[members].mean(0), atol=1e-4)
    # the unbalanced baseline on the same data breaks the bounds somewhere, so the check has teeth
    plain = residual_kmeans(x, RqParams(layers=3, codebook_size=k, balance="none", kmeans_iters=8), progress=False)
    plain_sizes = [np.bincount(plain.codes[:, j], minlength=k) for j in range(3)]
    assert any(s.min() < bounds.lower or s.max() > bounds.upper for s in plain_sizes)


# ----------------------------------------------------------------------------- RQ-VAE


def small_vae(**kw) -> RqVaeParams:
    base = dict(layers=3, codebook_size=32, rqvae_hidden=64, rqvae_latent=8, rqvae_epochs=40, rqvae_patience=10,
                rqvae_batch_size=256, kmeans_iters=10, seed=0)
    return RqVaeParams(**dict(base, **kw))


@pytest.fixture(scope="module")
def mixture():
    return skewed(3000, 32, seed=1)


@pytest.fixture(scope="module")
def vae(mixture):
    return train_rqvae(mixture, small_vae(), progress=False)


def test_rqvae_reconstructs_better_than_random_codebooks(mixture, vae):
    x = mixture
    assert vae.codes.shape == (3000, 3) and vae.codebooks.shape == (3, 32, 8)
    mse = [r["mse"] for r in sid_report(vae.codes, vae.codebooks, x, decode=vae.model.decode_numpy)["layers"]]
    assert mse[0] > mse[-1]  # residual layers refine the reconstruction
    # Baseline: the same encoder and decoder with random codebooks of the learned codebooks' scale.
    rng = np.random.default_rng(0)
    scale = vae.codebooks.std(axis=(1, 2), keepdims=True)
    books = (rng.standard_normal(vae.codebooks.shape) * scale).astype(np.float32)
    vae.model.codebooks.data = torch.from_numpy(books)
    try:
        random_codes = vae.model.encode_codes(x)
        random_mse = sid_report(random_codes, books, x, decode=vae.model.decode_numpy)["layers"][-1]["mse"]
    finally:
        vae.model.codebooks.data = torch.from_numpy(vae.codebooks.copy())
    mean_mse = float(((x - x.mean(0)) ** 2).mean())  # predicting the mean item
    assert mse[-1] < 0.5 * random_mse and mse[-1] < 0.25 * mean_mse, (mse, random_mse, mean_mse)
    assert vae.stats["best_val_recon"] < vae.stats["history"]["val_recon"][0]  # training helped on held-out items


def test_rqvae_dead_code_restarts_raise_utilisation(mixture, vae):
    util_on = [r["utilization"] for r in sid_report(vae.codes, vae.codebooks)["layers"]]
    off = train_rqvae(mixture, small_vae(rqvae_restarts=False), progress=False)
    util_off = [r["utilization"] for r in sid_report(off.codes, off.codebooks)["layers"]]
    assert vae.stats["restarts_total"] > 0 and off.stats["restarts_total"] == 0
    assert min(util_on) >= 0.9, util_on
    assert sum(util_off) < sum(util_on) - 0.3, (util_on, util_off)


def test_rqvae_deterministic_under_seed(mixture, vae):
    again = train_rqvae(mixture, small_vae(), progress=False)
    np.testing.assert_array_equal(again.codes, vae.codes)
    np.testing.assert_array_equal(again.codebooks, vae.codebooks)
    other = train_rqvae(mixture, small_vae(seed=1, rqvae_epochs=3), progress=False)
    assert not np.array_equal(other.codes, vae.codes)


def test_rqvae_early_stopping_keeps_the_best_epoch(mixture):
    result = train_rqvae(mixture, small_vae(rqvae_epochs=200, rqvae_patience=2, rqvae_lr=0.05), progress=False)
    val = result.stats["history"]["val_recon"]
    assert result.stats["epochs_run"] < 200 and result.stats["epochs_run"] == len(val)
    assert result.stats["best_val_recon"] == min(val) and val[result.stats["best_epoch"] - 1] == min(val)
    assert result.stats["epochs_run"] - result.stats["best_epoch"] == 2


def test_rqvae_artifacts_dedup_and_report(tmp_path, mixture):
    sids = build_semantic_ids(mixture, small_vae(rqvae_epochs=5), progress=False, method="rqvae")
    out = str(tmp_path / "vae")
    report = write_semantic_ids(out, sids, mixture, {"encoder": {"encoder": "test"}})
    art = load_sid_artifacts(out)
    assert art.method == "rqvae" and art.manifest["params"]["rqvae_latent"] == 8
    assert art.manifest["rqvae_stats"]["epochs_run"] == 5 and art.dim == 8
    np.testing.assert_array_equal(art.dedup[1:], dedup_codes(sids.codes))  # the same disambiguation as RQ-KMeans
    full = SemanticIdCodebook.from_artifacts(art, True).codes[1:]
    assert len({tuple(r) for r in full}) == 3000
    assert report["method"] == "rqvae" and load_report(out)["layers"][-1]["mse"] == report["layers"][-1]["mse"]
    assert "method: rqvae" in open(os.path.join(out, "report.md")).read()
    model = load_rqvae_model(out, art)  # the stored weights give back the report's reconstruction
    again = sid_report(art.codes[1:], art.codebooks, mixture, decode=model.decode_numpy)
    assert again["layers"][-1]["mse"] == pytest.approx(report["layers"][-1]["mse"], rel=1e-5)
    kmeans_out, _, _ = build_tiny_artifacts(tmp_path)
    assert load_sid_artifacts(kmeans_out).method == "rqkmeans"


def test_rqvae_bad_inputs():
    x = skewed(100, 8, seed=7)
    with pytest.raises(UserError, match="RQ-VAE training items"):
        train_rqvae(x, small_vae(codebook_size=95), progress=False)
    x[3, 1] = np.inf
    with pytest.raises(UserError, match="NaN or inf"):
        train_rqvae(x, small_vae(codebook_size=4), progress=False)
    with pytest.raises(UserError, match="rqvae_val_fraction"):
        train_rqvae(skewed(100, 8, seed=7), small_vae(codebook_size=4, rqvae_val_fraction=1.0), progress=False)
