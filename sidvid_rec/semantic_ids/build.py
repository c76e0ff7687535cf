"""Embeddings -> semantic IDs -> report -> artifact directory, in one call.

Example::

    x = embeddings[1:]                       # [N, D], items 1..N (row 0 of an embed output is padding)
    sids = build_semantic_ids(x, RqParams(layers=3, codebook_size=128, balance="balanced"))
    write_semantic_ids("out/sids", sids, x, {"encoder": ..., "data_fingerprint": ...})
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np

from sidvid_rec.semantic_ids.artifacts import save_sid_artifacts
from sidvid_rec.semantic_ids.kmeans import SizeBounds, size_bounds
from sidvid_rec.semantic_ids.report import sid_report
from sidvid_rec.semantic_ids.residual import RqParams, dedup_codes, residual_kmeans


@dataclass
class SemanticIds:
    """A built SID table.

    Attributes:
        params: how it was built.
        use_dedup: whether the disambiguation code is part of each SID.
        codebooks: ``[L, K, D]`` float32.
        codes: ``[N, L]`` int64 (items 1..N; no padding row).
        dedup: ``[N]`` int64 disambiguation code.
        rounds / converged: balancing rounds per layer and whether each converged.
        bounds: the cluster-size bounds (``None`` for ``balance: none``).
    """

    params: RqParams
    use_dedup: bool
    codebooks: np.ndarray
    codes: np.ndarray
    dedup: np.ndarray
    rounds: List[int]
    converged: List[bool]
    bounds: Optional[SizeBounds]


def build_semantic_ids(x: np.ndarray, params: RqParams, use_dedup: bool = True,
                       progress: bool = True) -> SemanticIds:
    """Residual (balanced) k-means codes of ``x [N, D]`` plus their disambiguation codes."""
    rq = residual_kmeans(x, params, progress=progress)
    bounds = size_bounds(x.shape[0], params.codebook_size, params.tol) if params.balance == "balanced" else None
    return SemanticIds(params=params, use_dedup=use_dedup, codebooks=rq.codebooks, codes=rq.codes,
                       dedup=dedup_codes(rq.codes), rounds=rq.rounds, converged=rq.converged, bounds=bounds)


def write_semantic_ids(out: str, sids: SemanticIds, x: Optional[np.ndarray],
                       provenance: Dict[str, Any]) -> Dict[str, Any]:
    """Computes the report (reconstruction needs ``x [N, D]``) and writes the artifact dir.

    ``provenance`` (encoder identity, data fingerprint, embeddings sha256, ...) goes into the
    manifest as is. Returns the report.
    """
    report = sid_report(sids.codes, sids.codebooks, x)
    manifest = dict(provenance)
    manifest["params"] = dict(dataclasses.asdict(sids.params), dedup=sids.use_dedup)
    manifest["balance_stats"] = {
        "rounds": sids.rounds, "converged": sids.converged,
        "size_bounds": None if sids.bounds is None else [sids.bounds.lower, sids.bounds.upper],
    }
    save_sid_artifacts(out, sids.codebooks, sids.codes, sids.dedup, manifest, report, sids.bounds)
    return report
