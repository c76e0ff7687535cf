"""Embeddings -> semantic IDs -> report -> artifact directory, in one call.

Example::

    x = embeddings[1:]                       # [N, D], items 1..N (row 0 of an embed output is padding)
    sids = build_semantic_ids(x, RqParams(layers=3, codebook_size=128, balance="balanced"))
    write_semantic_ids("out/sids", sids, x, {"encoder": ..., "data_fingerprint": ...})

    # RQ-VAE instead (sids.method=rqvae): the same SemanticIds, dedup code and artifacts
    sids = build_semantic_ids(x, RqVaeParams(layers=3, codebook_size=128), method="rqvae")
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

import numpy as np

from sidvid_rec.config import RqVaeParams
from sidvid_rec.errors import UserError
from sidvid_rec.semantic_ids.artifacts import save_sid_artifacts
from sidvid_rec.semantic_ids.kmeans import SizeBounds, size_bounds
from sidvid_rec.semantic_ids.report import sid_report
from sidvid_rec.semantic_ids.residual import RqParams, dedup_codes, residual_kmeans
from sidvid_rec.semantic_ids.rqvae import WEIGHTS_FILE, RqVaeResult, train_rqvae
from sidvid_rec.types import SidMethod


@dataclass
class SemanticIds:
    """A built SID table.

    Attributes:
        params: how it was built (:class:`RqVaeParams` for ``rqvae``).
        use_dedup: whether the disambiguation code is part of each SID.
        codebooks: ``[L, K, D]`` float32.
        codes: ``[N, L]`` int64 (items 1..N; no padding row).
        dedup: ``[N]`` int64 disambiguation code.
        rounds / converged: balancing rounds per layer and whether each converged.
        bounds: the cluster-size bounds (``None`` for ``balance: none`` and ``rqvae``).
        method: ``rqkmeans`` or ``rqvae``.
        rqvae: the trained RQ-VAE (``rqvae`` only): its decoder gives the report's reconstruction.
    """

    params: RqParams
    use_dedup: bool
    codebooks: np.ndarray
    codes: np.ndarray
    dedup: np.ndarray
    rounds: List[int]
    converged: List[bool]
    bounds: Optional[SizeBounds]
    method: SidMethod = "rqkmeans"
    rqvae: Optional[RqVaeResult] = None


def build_semantic_ids(x: np.ndarray, params: Union[RqParams, RqVaeParams], use_dedup: bool = True,
                       progress: bool = True, method: SidMethod = "rqkmeans") -> SemanticIds:
    """Codes of ``x [N, D]`` plus their disambiguation codes: residual (balanced) k-means, or an
    RQ-VAE (``method="rqvae"``; plain :class:`RqParams` get the ``rqvae_*`` defaults). The
    disambiguation code is computed the same way for both."""
    if method == "rqvae":
        vae_params = params if isinstance(params, RqVaeParams) else RqVaeParams(**dataclasses.asdict(params))
        vae = train_rqvae(x, vae_params, progress=progress)
        return SemanticIds(params=vae_params, use_dedup=use_dedup, codebooks=vae.codebooks, codes=vae.codes,
                           dedup=dedup_codes(vae.codes), rounds=[], converged=[], bounds=None, method="rqvae",
                           rqvae=vae)
    if method != "rqkmeans":
        raise UserError(f"unknown semantic-ID method {method!r} (rqkmeans or rqvae)")
    if isinstance(params, RqVaeParams):  # the k-means build records its own settings only
        params = RqParams(**{f.name: getattr(params, f.name) for f in dataclasses.fields(RqParams)})
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
    decode = sids.rqvae.model.decode_numpy if sids.rqvae is not None else None
    report = sid_report(sids.codes, sids.codebooks, x, decode=decode, method=sids.method)
    manifest = dict(provenance)
    manifest["method"] = sids.method
    manifest["params"] = dict(dataclasses.asdict(sids.params), dedup=sids.use_dedup, method=sids.method)
    manifest["balance_stats"] = {
        "rounds": sids.rounds, "converged": sids.converged,
        "size_bounds": None if sids.bounds is None else [sids.bounds.lower, sids.bounds.upper],
    }
    extra = None
    if sids.rqvae is not None:
        manifest["rqvae_stats"] = sids.rqvae.stats
        extra = {WEIGHTS_FILE: sids.rqvae.weights()}
    save_sid_artifacts(out, sids.codebooks, sids.codes, sids.dedup, manifest, report, sids.bounds, extra)
    return report
