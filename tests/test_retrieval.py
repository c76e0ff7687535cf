"""FAISS retrieval: exact search equals brute-force torch top-K; history exclusion; save/load; ANN kinds."""

import pytest
import torch

from sidvid_rec.errors import ArtifactError, ConfigError
from sidvid_rec.retrieval import MISSING_ID, VidIndex, excluded_mask


def _data(n=500, d=16, q=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n, d, generator=g)
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    return vectors, torch.randn(q, d, generator=g)


def test_flat_equals_brute_force_topk():
    vectors, queries = _data()
    ids = torch.arange(1, 501)
    hits = VidIndex.build(vectors, ids, kind="flat").search(queries, 25)
    scores, rows = (queries @ vectors.T).topk(25, dim=1)
    assert torch.equal(hits.ids, ids[rows])
    assert torch.allclose(hits.scores, scores, atol=1e-5)


def test_search_excluding_equals_masked_brute_force():
    vectors, queries = _data()
    index = VidIndex.build(vectors, torch.arange(1, 501))
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 30, (queries.shape[0],), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    excluded = torch.randint(1, 501, (int(lengths.sum()),), generator=g)
    hits = index.search_excluding(queries, 10, excluded, offsets)
    scores = torch.cat([torch.full((queries.shape[0], 1), -float("inf")), queries @ vectors.T], dim=1)  # column = id
    for q in range(queries.shape[0]):
        scores[q, excluded[offsets[q]:offsets[q + 1]]] = -float("inf")
    assert torch.equal(hits.ids, scores.topk(10, dim=1).indices)


def test_excluded_mask():
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = excluded_mask(ids, torch.tensor([3, 1, 9, 6]), torch.tensor([0, 3, 4]))
    assert mask.tolist() == [[True, False, True], [False, False, True]]


def test_more_results_than_items_are_padded():
    vectors, queries = _data(n=5)
    hits = VidIndex.build(vectors, torch.arange(10, 15)).search(queries[:2], 8)
    assert (hits.ids[:, 5:] == MISSING_ID).all() and torch.isinf(hits.scores[:, 5:]).all()
    assert sorted(hits.ids[0, :5].tolist()) == [10, 11, 12, 13, 14]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_save_load_round_trip(tmp_path, kind):
    vectors, queries = _data()
    index = VidIndex.build(vectors, torch.arange(1, 501), kind=kind, ivf_nlist=8, nprobe=8)
    path = index.save(str(tmp_path / "sub" / "vid.faiss"))
    loaded = VidIndex.load(path, nprobe=8)
    assert loaded.kind == kind and loaded.ntotal == 500
    assert torch.equal(loaded.search(queries, 10).ids, index.search(queries, 10).ids)


def test_ann_kinds_have_high_recall():
    vectors, queries = _data()
    exact = VidIndex.build(vectors, torch.arange(1, 501)).search(queries, 10).ids
    for kind, kwargs in (("hnsw", {"ef_search": 128}), ("ivf", {"ivf_nlist": 8, "nprobe": 8})):
        approx = VidIndex.build(vectors, torch.arange(1, 501), kind=kind, **kwargs).search(queries, 10).ids
        recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(approx, exact)) / exact.numel()
        assert recall >= 0.95, (kind, recall)


def test_bad_inputs(tmp_path):
    vectors, _ = _data(n=10)
    with pytest.raises(ConfigError):
        VidIndex.build(vectors, torch.arange(10), kind="ivf", ivf_nlist=50)
    with pytest.raises(ArtifactError):
        VidIndex.load(str(tmp_path / "missing.faiss"))
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    with pytest.raises(ArtifactError):
        VidIndex.load(str(tmp_path / "junk.faiss"))
