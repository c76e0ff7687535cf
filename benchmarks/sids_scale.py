"""Scale benchmark of balanced residual k-means: synthetic ``[n, dim]`` float32, L layers of K.

Default: 1,000,000 x 384, K=256, L=3, tol=0.1 (target: < 10 min, < 8 GiB on 2 cores). In the
same run it times, on a small subset, the write-up's loop-based balancing (Python loops over
clusters and points, the reference this package replaces) and our vectorized one, round for
round from the same start, so the speed-up is a ratio measured under the same load.

Usage::

    python benchmarks/sids_scale.py                       # the full benchmark
    python benchmarks/sids_scale.py --n 100000 --ref-n 5000 --threads 1   # quick look
"""

import argparse
import json
import os
import platform
import resource
import time

import faiss
import numpy as np

from sidvid_rec.semantic_ids.kmeans import _balanced_rounds, centroid_means, size_bounds, train_kmeans
from sidvid_rec.semantic_ids.residual import RqParams, residual_kmeans


def synthetic(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors ``[n, dim]``: a Gaussian mixture with ``clusters`` components of unequal
    weight (Zipf-like, so plain k-means comes out unbalanced), generated block by block."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.7
    comp = rng.choice(clusters, size=n, p=weights / weights.sum())
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 1 << 16):
        block = slice(start, min(start + (1 << 16), n))
        x[block] = centers[comp[block]] + 0.6 * rng.standard_normal((x[block].shape[0], dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def loop_reference_round(x: np.ndarray, centroids: np.ndarray, k: int, bounds) -> np.ndarray:
    """One round of the write-up's algorithm with its Python loops: assign each point to its
    nearest centroid (a loop over points); move each oversized cluster's farthest points,
    one by one, to the currently smallest cluster (loops over clusters and points);
    recompute the centroids. Returns the new centroids."""
    assign = np.zeros(x.shape[0], dtype=np.int64)
    for i in range(x.shape[0]):
        assign[i] = int(np.argmin(((centroids - x[i]) ** 2).sum(1)))
    sizes = np.bincount(assign, minlength=k)
    for c in range(k):
        members = np.flatnonzero(assign == c)
        if members.size <= bounds.upper:
            continue
        dist = ((x[members] - centroids[c]) ** 2).sum(1)
        for i in members[np.argsort(-dist)][: members.size - bounds.upper]:
            target = int(np.argmin(sizes))
            assign[i], sizes[c], sizes[target] = target, sizes[c] - 1, sizes[target] + 1
    return centroid_means(x, assign, centroids)


def per_round(x: np.ndarray, k: int, tol: float, seed: int, rounds: int, budget_s: float) -> dict:
    """Seconds per balancing round, loop reference vs ours, from the same FAISS k-means start."""
    bounds = size_bounds(x.shape[0], k, tol)
    start_centroids = train_kmeans(x, k, 25, seed)
    t0 = time.perf_counter()
    _balanced_rounds(x, start_centroids, bounds, rounds - 1, stop_early=False)  # exactly `rounds` rounds
    ours = (time.perf_counter() - t0) / rounds
    centroids, done, t0 = start_centroids, 0, time.perf_counter()
    while done < rounds and time.perf_counter() - t0 < budget_s:
        centroids = loop_reference_round(x, centroids, k, bounds)
        done += 1
    ref = (time.perf_counter() - t0) / max(done, 1)
    return {"n": x.shape[0], "rounds_ours": rounds, "rounds_reference": done, "ours_s_per_round": round(ours, 3),
            "reference_s_per_round": round(ref, 3), "speedup": round(ref / ours, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--tol", type=float, default=0.1)
    parser.add_argument("--balance-iters", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ref-n", default="20000,100000",
                        help="comma-separated subset sizes of the per-round loop-vs-vectorized timing ('' = skip)")
    parser.add_argument("--ref-rounds", type=int, default=3, help="balancing rounds timed per subset")
    parser.add_argument("--ref-budget", type=float, default=300.0, help="seconds the loop reference may run per subset")
    parser.add_argument("--threads", type=int, default=0,
                        help="FAISS OpenMP threads (0: library default). On a shared, oversubscribed box 1 "
                             "thread avoids OpenMP spin-waiting and is faster")
    args = parser.parse_args()
    if args.threads > 0:
        faiss.omp_set_num_threads(args.threads)
    load_before = os.getloadavg()

    t0 = time.perf_counter()
    x = synthetic(args.n, args.dim, 1000, args.seed)
    gen_s = time.perf_counter() - t0
    params = RqParams(layers=args.layers, codebook_size=args.k, balance="balanced", tol=args.tol,
                      balance_iters=args.balance_iters, seed=args.seed)
    t0 = time.perf_counter()
    rq = residual_kmeans(x, params, progress=False)
    build_s = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    bounds = size_bounds(args.n, args.k, args.tol)
    sizes = [np.bincount(rq.codes[:, l], minlength=args.k) for l in range(args.layers)]
    result = {
        "n": args.n, "dim": args.dim, "k": args.k, "layers": args.layers, "tol": args.tol,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "faiss_threads": faiss.omp_get_max_threads(), "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]],
        "generate_s": round(gen_s, 1), "build_s": round(build_s, 1), "peak_rss_gib": round(peak_gib, 2),
        "cpu_s_total": round(usage.ru_utime + usage.ru_stime, 1),
        "rounds": rq.rounds, "converged": rq.converged, "bounds": [bounds.lower, bounds.upper],
        "sizes_min_max": [[int(s.min()), int(s.max())] for s in sizes],
        "within_bounds": all(s.min() >= bounds.lower and s.max() <= bounds.upper for s in sizes),
    }
    print(json.dumps(result), flush=True)
    sizes_ref = [int(v) for v in args.ref_n.split(",") if v.strip()]
    if sizes_ref:
        subsets = [np.ascontiguousarray(x[:m]) for m in sizes_ref]
        del x, rq
        for sub in subsets:
            print(json.dumps(per_round(sub, args.k, args.tol, args.seed, args.ref_rounds, args.ref_budget)), flush=True)


if __name__ == "__main__":
    main()
