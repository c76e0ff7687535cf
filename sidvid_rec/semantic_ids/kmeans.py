"""Plain and size-balanced k-means on ``x [n, D]`` float32, vectorized over points and clusters.

Balanced k-means (OneRec) constrains every cluster size to ``[lower, upper]`` with
``lower = ceil(n/K*(1-tol))`` and ``upper = floor(n/K*(1+tol))``. The write-up's loop
("assign to the nearest centroid; if sizes are within bounds stop; else move each oversized
cluster's farthest points elsewhere; recompute centroids") is kept, but each step is a
handful of whole-array operations: FAISS for every nearest-centroid search, ``lexsort`` for
per-cluster ranks, a sparse matrix product for the centroid means. The only Python loops run
over rounds, never over points or clusters. As FAISS does for k-means, the balancing rounds
run on a seeded sample of at most ``max_points_per_code * K`` points; two final rounds then
balance all points, so the bounds always hold for the whole input (1M x 384, K=256, L=3:
about 4 minutes and 3.6 GiB on 2 shared cores, see benchmarks/RESULTS.md).

Example::

    result = balanced_kmeans(x, k=256, tol=0.1, kmeans_iters=25, balance_iters=50, seed=0)
    result.centroids  # [K, D]
    result.assign     # [n] int64, every bincount in [lower, upper]
"""

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Tuple

import faiss
import numpy as np
import scipy.sparse

# Nearest centroids kept per point for the rebalancing moves (96 MB at 1M points).
_CANDIDATES = 8
# Rebalancing stops once fewer than this share of points change cluster between rounds
# (the balanced Lloyd iteration can end in a cycle of a few points instead of a fixed point) ...
_STOP_FRACTION = 1e-3
# ... or once a round lowers the mean squared distance by less than this relative amount
# (on residual layers ~1% of points keep swapping while the objective is flat).
_STOP_GAIN = 1e-4
# Searches below this many multiply-adds (points x centroids x dim) use one FAISS thread.
_SMALL_SEARCH = 1 << 26
# Balancing rounds on all points after the sampled rounds (inputs above max_points_per_code * K).
_FULL_ROUNDS = 2


@dataclass(frozen=True)
class SizeBounds:
    """Inclusive bounds every cluster size must satisfy."""

    lower: int
    upper: int


@dataclass
class KMeansResult:
    """Output of one clustering layer.

    Attributes:
        centroids: ``[K, D]`` float32.
        assign: ``[n]`` int64 cluster of each point.
        rounds: balancing rounds run (0 for plain k-means).
        converged: True when the nearest-centroid assignment itself met the bounds or the
            balanced assignment stopped changing or improving before ``balance_iters`` rounds.
    """

    centroids: np.ndarray
    assign: np.ndarray
    rounds: int
    converged: bool


@contextlib.contextmanager
def faiss_threads(threads: int) -> Iterator[None]:
    """Runs the block with FAISS's OpenMP thread count set to ``threads`` (0: unchanged).

    On a shared, oversubscribed machine OpenMP threads spin-wait for each other; one thread
    can then be several times faster than two.
    """
    if threads <= 0:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def size_bounds(n: int, k: int, tol: float) -> SizeBounds:
    """``[ceil(n/K*(1-tol)), floor(n/K*(1+tol))]``, widened to ``[floor(n/K), ceil(n/K)]``.

    The widening only matters when ``tol`` is too small for any assignment to exist (e.g.
    ``tol=0`` with ``n`` not a multiple of ``K``); the result always admits a solution.
    """
    mean = n / k
    # Round before ceil/floor so 100/4*1.0 = 25.000000000000004 does not become 26.
    lower = math.ceil(round(mean * (1.0 - tol), 9))
    upper = math.floor(round(mean * (1.0 + tol), 9))
    return SizeBounds(lower=min(lower, n // k), upper=max(upper, -(-n // k)))


def group_rank(groups: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Rank ``[m]`` of each element inside its group, by ascending key (ties: lower index first).

    Args:
        groups: ``[m]`` non-negative int group ids.
        keys: ``[m]`` sort keys.
    """
    if groups.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((keys, groups))
    sorted_groups = groups[order]
    is_start = np.empty(order.size, dtype=bool)
    is_start[0] = True
    np.not_equal(sorted_groups[1:], sorted_groups[:-1], out=is_start[1:])
    starts = np.flatnonzero(is_start)
    run_start = np.repeat(starts, np.diff(np.append(starts, order.size)))
    ranks = np.empty(order.size, dtype=np.int64)
    ranks[order] = np.arange(order.size, dtype=np.int64) - run_start
    return ranks


def search(x: np.ndarray, centroids: np.ndarray, m: int) -> Tuple[np.ndarray, np.ndarray]:
    """Squared L2 distances ``[n, m]`` to, and indices ``[n, m]`` of, the ``m`` nearest centroids.

    FAISS computes the ``[n, K]`` distances block by block internally (bounded memory);
    keeping a few neighbours instead of one costs a small heap per point.
    """
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    # Small searches run single-threaded: OpenMP start-up and barriers would cost more than the work.
    small = x.shape[0] * centroids.shape[0] * centroids.shape[1] < _SMALL_SEARCH
    with faiss_threads(1 if small else 0):
        dist, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), m)
    return np.maximum(dist, 0.0), idx.astype(np.int64)


def nearest(x: np.ndarray, centroids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Squared L2 distance ``[n]`` to, and index ``[n]`` of, the nearest of ``centroids [K, D]``."""
    dist, idx = search(x, centroids, 1)
    return dist[:, 0], idx[:, 0]


def centroid_means(x: np.ndarray, assign: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Mean ``[K, D]`` of the points of each cluster; empty clusters keep ``fallback [K, D]``.

    A sparse ``[K, n]`` indicator times ``x`` avoids copying or sorting ``x``.
    """
    k, n = fallback.shape[0], x.shape[0]
    indicator = scipy.sparse.csr_matrix(
        (np.ones(n, dtype=np.float32), (assign, np.arange(n))), shape=(k, n))
    sums = np.asarray(indicator @ x, dtype=np.float32)
    counts = np.bincount(assign, minlength=k).astype(np.float32)
    means = sums / np.maximum(counts, 1.0)[:, None]
    return np.where(counts[:, None] > 0, means, fallback).astype(np.float32)


@dataclass
class _Candidates:
    """The ``m`` nearest centroids of every point: ``dist [n, m]`` (squared L2), ``idx [n, m]``."""

    dist: np.ndarray
    idx: np.ndarray


def _shed_oversized(x: np.ndarray, centroids: np.ndarray, assign: np.ndarray,
                    cost: np.ndarray, bounds: SizeBounds) -> None:
    """Moves the farthest points of clusters above ``upper`` to the nearest cluster with room.

    Each round: every oversized cluster proposes its ``size - upper`` farthest points; each
    proposes to its nearest cluster below ``upper``; a receiving cluster accepts the
    proposals that cost least, up to its spare room. Each round fills or satisfies every
    receiving cluster, so there are at most K + 1 rounds. Updates ``assign``/``cost`` in place.
    """
    k = centroids.shape[0]
    while True:
        sizes = np.bincount(assign, minlength=k)
        excess = sizes - bounds.upper
        if (excess <= 0).all():
            return
        in_over = np.flatnonzero(excess[assign] > 0)
        far_rank = group_rank(assign[in_over], -cost[in_over])  # 0 = farthest
        movers = in_over[far_rank < excess[assign[in_over]]]
        open_clusters = np.flatnonzero(sizes < bounds.upper)
        dist, j = nearest(x[movers], centroids[open_clusters])  # movers are few: exact search
        accept = group_rank(j, dist - cost[movers]) < (bounds.upper - sizes[open_clusters])[j]
        assign[movers[accept]] = open_clusters[j[accept]]
        cost[movers[accept]] = dist[accept]


def _first_wanted(cand: _Candidates, donors: np.ndarray,
                  deficit: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each donor with an under-full cluster among its candidates: the donor (``who``),
    the nearest such cluster (``target``) and its squared distance (``dist``)."""
    wanted = deficit[cand.idx[donors]] > 0  # [d, m]
    has = wanted.any(axis=1)
    who = donors[has]
    col = wanted[has].argmax(axis=1)  # candidates are sorted by distance: first = nearest
    return who, cand.idx[who, col], cand.dist[who, col]


def _under_candidates(x: np.ndarray, centroids: np.ndarray, deficit: np.ndarray, m: int) -> _Candidates:
    """Every point's ``m`` nearest under-full clusters (one search over those clusters only)."""
    under = np.flatnonzero(deficit > 0)
    dist, j = search(x, centroids[under], min(m, under.size))
    return _Candidates(dist=dist, idx=under[j])


def _fill_underfull(x: np.ndarray, centroids: np.ndarray, cand: _Candidates, assign: np.ndarray,
                    cost: np.ndarray, bounds: SizeBounds) -> None:
    """Pulls the cheapest points of clusters above ``lower`` into clusters below ``lower``.

    Each round: every point whose cluster can give (size > lower) proposes to the nearest
    under-full cluster among its candidates; a receiver keeps its ``deficit`` cheapest
    proposals; a giver lets at most ``size - lower`` of those go. When no donor has an
    under-full cluster among its candidates, the candidates are recomputed over the
    under-full clusters only (one search). At least one point moves per round; no cluster
    ever goes above ``upper`` or below ``lower``. Updates ``assign``/``cost`` in place.
    """
    k, m = centroids.shape[0], cand.idx.shape[1]
    while True:
        sizes = np.bincount(assign, minlength=k)
        deficit = bounds.lower - sizes
        if (deficit <= 0).all():
            return
        give = sizes - bounds.lower
        donors = np.flatnonzero(give[assign] > 0)
        who, target, dist = _first_wanted(cand, donors, deficit)
        if who.size == 0:
            cand = _under_candidates(x, centroids, deficit, m)
            who, target, dist = _first_wanted(cand, donors, deficit)
        delta = dist - cost[who]
        keep = group_rank(target, delta) < deficit[target]
        who, target, dist, delta = who[keep], target[keep], dist[keep], delta[keep]
        keep = group_rank(assign[who], delta) < give[assign[who]]
        assign[who[keep]] = target[keep]
        cost[who[keep]] = dist[keep]


def _repair(x: np.ndarray, centroids: np.ndarray, cand_dist: np.ndarray, cand_idx: np.ndarray,
            bounds: SizeBounds) -> Tuple[np.ndarray, np.ndarray]:
    """Balanced ``assign [n]`` and each point's squared distance ``cost [n]`` to its centroid."""
    cand = _Candidates(dist=cand_dist, idx=cand_idx)
    assign = cand_idx[:, 0].copy()
    cost = cand_dist[:, 0].copy()
    _shed_oversized(x, centroids, assign, cost, bounds)
    _fill_underfull(x, centroids, cand, assign, cost, bounds)
    return assign, cost


def repair_assignment(x: np.ndarray, centroids: np.ndarray, cand_dist: np.ndarray,
                      cand_idx: np.ndarray, bounds: SizeBounds) -> np.ndarray:
    """Balanced assignment ``[n]`` starting from the nearest centroids, all sizes in ``bounds``.

    Args:
        x: ``[n, D]`` points.
        centroids: ``[K, D]``.
        cand_dist: ``[n, m]`` squared distances to each point's ``m`` nearest centroids
            (ascending, as returned by :func:`search`).
        cand_idx: ``[n, m]`` their indices; column 0 is the starting assignment.
        bounds: requires ``K * lower <= n <= K * upper`` (guaranteed by :func:`size_bounds`).
    """
    return _repair(x, centroids, cand_dist, cand_idx, bounds)[0]


def train_kmeans(x: np.ndarray, k: int, iters: int, seed: int, max_points_per_code: int = 256,
                 warn_few_points: bool = True) -> np.ndarray:
    """FAISS k-means centroids ``[K, D]`` (FAISS samples at most ``max_points_per_code * K`` points).

    ``warn_few_points=False`` silences FAISS's warning about fewer than 39 points per centroid
    (the RQ-VAE initialises its codebooks on one batch on purpose); the result is the same.
    """
    extra = {} if warn_few_points else {"min_points_per_centroid": 1}
    km = faiss.Kmeans(x.shape[1], k, niter=max(iters, 1), seed=seed, verbose=False,
                      max_points_per_centroid=max_points_per_code, **extra)
    small = min(x.shape[0], max_points_per_code * k) * k * x.shape[1] < _SMALL_SEARCH
    with faiss_threads(1 if small else 0):
        km.train(np.ascontiguousarray(x, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32).reshape(k, x.shape[1])


def plain_kmeans(x: np.ndarray, k: int, kmeans_iters: int, seed: int, max_points_per_code: int = 256,
                 warn_few_points: bool = True) -> KMeansResult:
    """FAISS k-means, then every point assigned to its nearest centroid (sizes unconstrained)."""
    centroids = train_kmeans(x, k, kmeans_iters, seed, max_points_per_code, warn_few_points)
    _, assign = nearest(x, centroids)
    return KMeansResult(centroids=centroids, assign=assign, rounds=0, converged=True)


def _balanced_rounds(x: np.ndarray, centroids: np.ndarray, bounds: SizeBounds, rounds: int,
                     stop_early: bool) -> Tuple[np.ndarray, np.ndarray, int, bool]:
    """Up to ``rounds`` x (nearest -> repair -> recompute centroids); returns the last
    balanced ``assign [n]``, the centroids it was computed from, rounds run and convergence."""
    k = centroids.shape[0]
    m = min(k, _CANDIDATES)
    previous, previous_obj, done = None, np.inf, 0
    while True:
        cand_dist, cand_idx = search(x, centroids, m)
        sizes = np.bincount(cand_idx[:, 0], minlength=k)
        converged = bool(sizes.min() >= bounds.lower and sizes.max() <= bounds.upper)
        assign, cost = _repair(x, centroids, cand_dist, cand_idx, bounds)
        objective = float(cost.mean(dtype=np.float64))
        if previous is not None and (np.count_nonzero(assign != previous) <= _STOP_FRACTION * len(assign)
                                     or objective > previous_obj * (1.0 - _STOP_GAIN)):
            converged = True
        if done >= rounds or (stop_early and converged):
            return assign, centroids, done, converged
        done += 1
        previous, previous_obj = assign, objective
        centroids = centroid_means(x, assign, centroids)


def balanced_kmeans(x: np.ndarray, k: int, tol: float, kmeans_iters: int, balance_iters: int, seed: int,
                    max_points_per_code: int = 256) -> KMeansResult:
    """Size-balanced k-means of ``x [n, D]`` into ``k`` clusters.

    Rounds of (nearest assignment -> repair to the bounds -> recompute centroids) until the
    nearest assignment already meets the bounds, the repaired assignment stops changing
    (fewer than 0.1% of points move), the mean squared distance stops falling (by less than
    0.01%) or ``balance_iters`` rounds ran. Like FAISS's own k-means, these rounds see at
    most ``max_points_per_code * K`` points (a seeded sample); larger inputs then get
    :data:`_FULL_ROUNDS` rounds on all points. The returned assignment always meets the
    bounds for all ``n`` points, and the centroids are the means of its clusters.
    """
    n = x.shape[0]
    centroids = train_kmeans(x, k, kmeans_iters, seed, max_points_per_code)
    sample_size = max(max_points_per_code * k, k)
    sample = x
    if n > sample_size:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=sample_size, replace=False))
        sample = x[rows]
    assign, centroids, rounds, converged = _balanced_rounds(
        sample, centroids, size_bounds(sample.shape[0], k, tol), balance_iters, stop_early=True)
    if sample is not x:
        centroids = centroid_means(sample, assign, centroids)
        assign, centroids, _, _ = _balanced_rounds(x, centroids, size_bounds(n, k, tol), _FULL_ROUNDS - 1,
                                                   stop_early=False)
    centroids = centroid_means(x, assign, centroids)
    return KMeansResult(centroids=centroids, assign=assign, rounds=rounds, converged=converged)
