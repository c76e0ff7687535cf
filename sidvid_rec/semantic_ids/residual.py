"""Residual k-means (RQ-KMeans): L layers of K codes; layer l clusters layer l-1's residuals.

Shapes: ``x [N, D]`` item embeddings (no padding row), ``codebooks [L, K, D]``,
``codes [N, L]`` int64 in ``[0, K)``, ``dedup [N]`` int64 (TIGER disambiguation code).

Example::

    rq = residual_kmeans(x, RqParams(layers=3, codebook_size=128))
    rq.codes        # [N, 3]
    dedup_codes(rq.codes)  # [N]: 0, 1, 2, ... among items sharing the whole tuple
"""

import sys
from dataclasses import dataclass, field
from typing import List

import numpy as np
from tqdm import tqdm

from sidvid_rec.config import RqParams
from sidvid_rec.errors import UserError
from sidvid_rec.semantic_ids.codebook import distinct_tuples
from sidvid_rec.semantic_ids.kmeans import balanced_kmeans, group_rank, nearest, plain_kmeans

_CHUNK = 1 << 16  # rows per block of the residual update (bounds temporaries)


@dataclass
class ResidualQuantization:
    """Codebooks ``[L, K, D]`` float32, codes ``[N, L]`` int64 and per-layer balancing stats."""

    codebooks: np.ndarray
    codes: np.ndarray
    rounds: List[int] = field(default_factory=list)
    converged: List[bool] = field(default_factory=list)


def check_embeddings(x: np.ndarray, codebook_size: int) -> None:
    """Raises :class:`UserError` unless ``x`` is a finite ``[N, D]`` array with ``N >= K``."""
    if x.ndim != 2 or x.shape[1] == 0:
        raise UserError(f"embeddings must be a 2-D [items, dim] array, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise UserError("no items to build semantic IDs for (the item set is empty)")
    if codebook_size < 1:
        raise UserError(f"codebook_size must be positive, got {codebook_size}")
    if codebook_size > x.shape[0]:
        raise UserError(f"codebook_size K={codebook_size} is larger than the number of items "
                        f"({x.shape[0]}); use sids.codebook_size <= {x.shape[0]}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise UserError(f"embeddings contain NaN or inf in {rows.size} rows (first: row {rows[0]})")


def residual_kmeans(x: np.ndarray, params: RqParams, progress: bool = True) -> ResidualQuantization:
    """Quantizes ``x [N, D]`` into ``codes [N, L]`` with codebooks ``[L, K, D]``.

    Layer seeds are ``seed + layer`` so that the whole build is deterministic under ``seed``.
    Peak extra memory is one residual copy of ``x``.
    """
    check_embeddings(x, params.codebook_size)
    if params.layers < 1 or params.max_points_per_code < 1:
        raise UserError(f"layers and max_points_per_code must be positive, got {params.layers} "
                        f"and {params.max_points_per_code}")
    residual = np.array(x, dtype=np.float32, order="C", copy=True)
    n, d = residual.shape
    codebooks = np.zeros((params.layers, params.codebook_size, d), dtype=np.float32)
    codes = np.zeros((n, params.layers), dtype=np.int64)
    out = ResidualQuantization(codebooks=codebooks, codes=codes)
    bar = tqdm(range(params.layers), desc=f"rq-kmeans ({params.balance})", unit="layer",
               disable=not progress, file=sys.stderr)
    for layer in bar:
        seed = params.seed + layer
        if params.balance == "balanced":
            result = balanced_kmeans(residual, params.codebook_size, params.tol, params.kmeans_iters,
                                     params.balance_iters, seed, params.max_points_per_code)
        else:
            result = plain_kmeans(residual, params.codebook_size, params.kmeans_iters, seed,
                                  params.max_points_per_code)
        codebooks[layer] = result.centroids
        codes[:, layer] = result.assign
        out.rounds.append(result.rounds)
        out.converged.append(result.converged)
        _subtract_centroids(residual, result.centroids, result.assign)
    return out


def _subtract_centroids(residual: np.ndarray, centroids: np.ndarray, assign: np.ndarray) -> None:
    """``residual -= centroids[assign]`` in place, block by block."""
    for start in range(0, residual.shape[0], _CHUNK):
        residual[start:start + _CHUNK] -= centroids[assign[start:start + _CHUNK]]


def dedup_codes(codes: np.ndarray) -> np.ndarray:
    """TIGER disambiguation code ``[N]``: items sharing the full tuple get 0, 1, 2, ... by item order."""
    if codes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return group_rank(distinct_tuples(codes)[2], np.arange(codes.shape[0]))


def quantize(x: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """Codes ``[N, L]`` of new vectors ``x [N, D]``: nearest centroid of each layer's residual."""
    if x.ndim != 2 or x.shape[1] != codebooks.shape[2]:
        raise UserError(f"embedding dim {x.shape[-1]} does not match the codebooks' dim {codebooks.shape[2]}")
    check_embeddings(x, 1)
    residual = np.array(x, dtype=np.float32, order="C", copy=True)
    codes = np.zeros((x.shape[0], codebooks.shape[0]), dtype=np.int64)
    for layer in range(codebooks.shape[0]):
        _, codes[:, layer] = nearest(residual, codebooks[layer])
        _subtract_centroids(residual, codebooks[layer], codes[:, layer])
    return codes
