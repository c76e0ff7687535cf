"""Section 4 of the suite: semantic-ID build time and memory vs the number of items, balanced vs plain.

Input: ``benchmarks/sids_scale.py``'s synthetic ``[n, 384]`` unit vectors (a Zipf-weighted
1000-component Gaussian mixture, so plain k-means comes out unbalanced). Build:
:func:`sidvid_rec.semantic_ids.build_semantic_ids` (residual k-means, L=3, K=256, tol 0.1,
plus the dedup code), FAISS on the suite's thread count.
"""

import time
from typing import Any, Dict


def sids_build(n: int, dim: int, balance: str, codebook_size: int, layers: int, threads: int,
               seed: int = 0) -> Dict[str, Any]:
    """Build time, peak RSS and cluster-size spread of one semantic-ID build."""
    import numpy as np

    from benchmarks.common import current_rss_mb, peak_rss_mb, reset_peak_rss
    from benchmarks.sids_scale import synthetic
    from sidvid_rec.semantic_ids import RqParams, build_semantic_ids
    from sidvid_rec.semantic_ids.kmeans import faiss_threads

    x = synthetic(n, dim, 1000, seed)
    rss_before = current_rss_mb()
    reset_peak_rss()
    params = RqParams(layers=layers, codebook_size=codebook_size, balance=balance, tol=0.1, seed=seed)
    start = time.perf_counter()
    cpu_start = time.process_time()
    with faiss_threads(threads):
        sids = build_semantic_ids(x, params, use_dedup=True, progress=False)
    build_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    peak = peak_rss_mb()
    sizes = [np.bincount(sids.codes[:, l], minlength=codebook_size) for l in range(layers)]
    return {"n": n, "dim": dim, "balance": balance, "build_s": build_s, "cpu_s": cpu_s,
            "input_mb": x.nbytes / 2**20, "rss_before_mb": rss_before, "peak_rss_mb": peak,
            "peak_delta_mb": peak - rss_before, "rounds": sids.rounds,
            "sizes_min_max": [[int(s.min()), int(s.max())] for s in sizes]}
