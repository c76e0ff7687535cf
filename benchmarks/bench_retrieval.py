"""Section 5 of the suite: FAISS flat / HNSW / IVF (:class:`~sidvid_rec.retrieval.VidIndex`) vs torch
brute-force top-k: build time, queries/s and recall@k against the exact answer.

Data: synthetic unit vectors ``[n, dim]`` from the Zipf-weighted Gaussian mixture of
``benchmarks/sids_scale.py`` (1000 components; learned item vectors are clustered, uniform
random vectors would be the worst case of every approximate index), queries drawn from the
same mixture. Exact top-k = ``torch.topk(queries @ vectors.T)`` over query blocks (the
baseline); recall@k = share of the exact top-k ids an index returns. Queries are answered as
one batch per index (FAISS parallelises over queries; the suite runs it on one thread).
The approximate indexes are swept over their query-time knob (HNSW ``efSearch``, IVF
``nprobe``), and the fastest setting with recall@k >= the target is picked.
"""

import time
from typing import Any, Dict, List, Optional


def exact_topk(vectors: Any, queries: Any, k: int, device: str = "cpu"):
    """``(scores [Q, k], ids [Q, k])`` of the largest inner products; blocks of queries keep the
    ``[q, n]`` score matrix near 256 MB."""
    import torch

    block = max(1, (1 << 26) // vectors.shape[0])
    scores, ids = [], []
    for start in range(0, queries.shape[0], block):
        s, i = torch.topk(queries[start:start + block] @ vectors.T, k, dim=1)
        scores.append(s)
        ids.append(i)
    return torch.cat(scores), torch.cat(ids)


def recall_at_k(found: Any, truth: Any) -> float:
    """Mean over queries of ``|found ∩ truth| / k``; ``found``/``truth`` ``[Q, k]`` int64 rows."""
    import numpy as np

    found, truth = np.asarray(found), np.asarray(truth)
    hits = sum(np.intersect1d(f, t, assume_unique=False).size for f, t in zip(found, truth))
    return hits / truth.size


def _timed(fn, device: str):
    from benchmarks.common import synchronize

    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def retrieval(n: int, dim: int, num_queries: int, k: int, hnsw_m: int, ef_search: List[int], ivf_nlist: int,
              nprobe: List[int], target_recall: float, seed: int = 0, threads: int = 1,
              device: str = "cpu", skip_hnsw: bool = False) -> Dict[str, Any]:
    """Builds every index over ``n`` synthetic vectors and measures it on ``num_queries`` queries."""
    import faiss
    import numpy as np
    import torch

    from benchmarks.common import current_rss_mb
    from benchmarks.sids_scale import synthetic
    from sidvid_rec.retrieval import VidIndex

    if threads > 0:
        faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    everything = synthetic(n + num_queries, dim, 1000, seed)
    rng = np.random.default_rng(seed + 1)
    order = rng.permutation(n + num_queries)
    vectors, queries = everything[order[:n]], everything[order[n:]]
    del everything
    generate_s = time.perf_counter() - start
    ids = np.arange(1, n + 1, dtype=np.int64)
    on_gpu = device.startswith("cuda")

    # the baseline: exact top-k with torch (on the device when there is one)
    tv, tq = torch.from_numpy(vectors).to(device), torch.from_numpy(queries).to(device)
    exact_topk(tv, tq[:8], k, device)  # warm-up
    (_, truth_rows), exact_s = _timed(lambda: exact_topk(tv, tq, k, device), device)
    truth = truth_rows.cpu().numpy() + 1
    del tv, tq
    rows: List[Dict[str, Any]] = [{"index": "torch exact", "setting": "-", "build_s": 0.0,
                                   "qps": num_queries / exact_s, "recall": 1.0}]

    def measure(index: Any, name: str, setting: str, build_s: float) -> Dict[str, Any]:
        index.search(queries[:8], k)  # warm-up
        hits, seconds = _timed(lambda: index.search(queries, k), device)
        return {"index": name, "setting": setting, "build_s": build_s, "qps": num_queries / seconds,
                "recall": recall_at_k(hits.ids.cpu().numpy(), truth)}

    flat, build_s = _timed(lambda: VidIndex.build(vectors, ids, kind="flat", use_gpu=on_gpu), device)
    rows.append(measure(flat, "faiss flat", "-", build_s))
    del flat
    kinds = [("ivf", nprobe)] + ([] if skip_hnsw else [("hnsw", ef_search)])
    for kind, knobs in kinds:
        index, build_s = _timed(lambda: VidIndex.build(vectors, ids, kind=kind, hnsw_m=hnsw_m, ivf_nlist=ivf_nlist,
                                                       use_gpu=on_gpu), device)
        for knob in knobs:
            if kind == "hnsw":
                index.set_search_params(ef_search=knob)
                rows.append(measure(index, f"faiss HNSW M={hnsw_m}", f"efSearch={knob}", build_s))
            else:
                if knob > (ivf_nlist or int(4 * n**0.5)):
                    continue
                index.set_search_params(nprobe=knob)
                rows.append(measure(index, f"faiss IVF nlist={ivf_nlist or int(4 * n**0.5)}", f"nprobe={knob}",
                                    build_s))
            if rows[-1]["recall"] >= 0.999:  # larger knobs only cost time
                break
        del index
    exact_qps = rows[0]["qps"]
    for row in rows:
        row["speedup_vs_exact"] = row["qps"] / exact_qps
    approx = [r for r in rows if r["index"].startswith(("faiss HNSW", "faiss IVF")) and r["recall"] >= target_recall]
    best: Optional[Dict[str, Any]] = max(approx, key=lambda r: r["qps"]) if approx else None
    return {"n": n, "dim": dim, "queries": num_queries, "k": k, "generate_s": generate_s, "rows": rows,
            "best": best, "rss_mb": current_rss_mb(), "faiss_threads": faiss.omp_get_max_threads()}
