"""SID quality report: per-layer code usage and reconstruction, prefix collisions.

Definitions (``N`` items, ``codes [N, L]``, ``codebooks [L, K, D]``, ``x [N, D]``):

* utilization_l = distinct codes used at layer l / K;
* entropy_l = H_l / log2 K with H_l = -sum_k p_k log2 p_k, p_k = share of items with code k;
* mse_l = mean over items and dims of (x - xhat_l)^2, xhat_l = sum_{j<=l} codebooks[j, c_j]
  (an RQ-VAE's codebooks live in its latent space: there xhat_l = decode(sum_{j<=l} codebooks[j, c_j]));
* cosine_l = mean over items of 1 - cos(x, xhat_l) (the cosine loss);
* prefix_collision_rate_l = share of items whose prefix (c_1..c_l) is shared with another item;
  ``collision_rate`` is that of the full tuple, before any disambiguation code.

Example::

    report = sid_report(codes, codebooks, x)
    report["layers"][2]["entropy"], report["collision_rate"]
"""

import math
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from sidvid_rec.errors import UserError
from sidvid_rec.semantic_ids.codebook import distinct_tuples

_CHUNK = 1 << 15  # rows per block of the reconstruction error (bounds temporaries)


def prefix_groups(codes: np.ndarray, depth: int) -> np.ndarray:
    """Group id ``[N]`` of each item's prefix ``codes[:, :depth]`` (equal prefix = equal id)."""
    return distinct_tuples(codes[:, :depth])[2]


def collision_rate(codes: np.ndarray, depth: int) -> float:
    """Share of items whose prefix of length ``depth`` is shared with at least one other item."""
    groups = prefix_groups(codes, depth)
    counts = np.bincount(groups)
    return float((counts[groups] > 1).mean())


def code_usage(codes: np.ndarray, codebook_size: int) -> List[np.ndarray]:
    """Items per code ``[K]`` for each layer."""
    return [np.bincount(codes[:, layer], minlength=codebook_size) for layer in range(codes.shape[1])]


def normalized_entropy(counts: np.ndarray) -> float:
    """``H / log2 K`` of the code distribution ``counts [K]`` (1.0 = perfectly uniform)."""
    k = counts.size
    if k < 2:
        return 1.0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum() / math.log2(k))


Decode = Callable[[np.ndarray], np.ndarray]
"""Maps summed code vectors ``[B, latent]`` to the embedding space ``[B, D]`` (an RQ-VAE's decoder)."""


def reconstruction(x: np.ndarray, codes: np.ndarray, codebooks: np.ndarray,
                   decode: Optional[Decode] = None) -> Dict[str, List[float]]:
    """Per-layer ``mse`` and ``cosine`` loss of the summed centroids (decoded by ``decode`` when
    given) vs ``x [N, D]``, in blocks."""
    n, layers = codes.shape
    sq, cos = np.zeros(layers), np.zeros(layers)
    for start in range(0, n, _CHUNK):
        block = x[start:start + _CHUNK].astype(np.float32)
        xhat = np.zeros_like(block)
        block_norm = np.linalg.norm(block, axis=1)
        latent = np.zeros((block.shape[0], codebooks.shape[2]), dtype=np.float32) if decode else xhat
        for layer in range(layers):
            latent += codebooks[layer][codes[start:start + _CHUNK, layer]]
            if decode is not None:
                xhat = decode(latent)
            err = block - xhat
            sq[layer] += float(np.einsum("nd,nd->", err, err, dtype=np.float64))
            denom = np.maximum(block_norm * np.linalg.norm(xhat, axis=1), 1e-12)
            cos[layer] += float((1.0 - np.einsum("nd,nd->n", block, xhat) / denom).sum(dtype=np.float64))
    return {"mse": (sq / (n * x.shape[1])).tolist(), "cosine": (cos / n).tolist()}


def check_report_inputs(codes: np.ndarray, codebooks: np.ndarray, x: Optional[np.ndarray],
                        decoded: bool = False) -> None:
    """Raises :class:`UserError` on empty, mismatched or out-of-range inputs."""
    if codes.ndim != 2 or codes.shape[0] == 0:
        raise UserError(f"codes must be a non-empty [items, layers] array, got shape {tuple(codes.shape)}")
    if codebooks.ndim != 3 or codebooks.shape[0] != codes.shape[1]:
        raise UserError(f"codebooks of shape {tuple(codebooks.shape)} do not match {codes.shape[1]} code layers")
    if codes.min() < 0 or codes.max() >= codebooks.shape[1]:
        raise UserError(f"codes must lie in [0, {codebooks.shape[1]}), got [{codes.min()}, {codes.max()}]")
    if x is not None:
        if x.ndim != 2 or (not decoded and x.shape[1] != codebooks.shape[2]):
            raise UserError(f"embedding dim {x.shape[-1]} does not match the codebooks' dim {codebooks.shape[2]}")
        if x.shape[0] != codes.shape[0]:
            raise UserError(f"{x.shape[0]} embeddings for {codes.shape[0]} coded items")
        if not np.isfinite(x).all():
            raise UserError("embeddings contain NaN or inf")


def sid_report(codes: np.ndarray, codebooks: np.ndarray, x: Optional[np.ndarray] = None,
               decode: Optional[Decode] = None, method: str = "rqkmeans") -> Dict[str, Any]:
    """The quality report of ``codes [N, L]`` (no padding row) as a JSON-able dict.

    ``mse``/``cosine`` are ``None`` when the embeddings ``x [N, D]`` are not given; ``decode``
    maps latent code sums to the embedding space (RQ-VAE builds). ``method`` is recorded as is.
    """
    check_report_inputs(codes, codebooks, x, decoded=decode is not None)
    n, layers = codes.shape
    k = codebooks.shape[1]
    recon = reconstruction(x, codes, codebooks, decode) if x is not None else None
    rows = []
    for layer, counts in enumerate(code_usage(codes, k)):
        rows.append({
            "layer": layer + 1,
            "utilization": float((counts > 0).sum() / k),
            "entropy": normalized_entropy(counts),
            "mse": recon["mse"][layer] if recon else None,
            "cosine": recon["cosine"][layer] if recon else None,
            "distinct_codes": int((counts > 0).sum()),
            "min_size": int(counts.min()),
            "max_size": int(counts.max()),
            "prefix_collision_rate": collision_rate(codes, layer + 1),
        })
    full_groups = np.bincount(prefix_groups(codes, layers))
    return {
        "num_items": int(n),
        "layers": rows,
        "collision_rate": rows[-1]["prefix_collision_rate"],
        "prefix_collision_rate": [r["prefix_collision_rate"] for r in rows],
        "unique_sids": int(full_groups.size),
        "max_items_per_sid": int(full_groups.max()),
        "codebook_size": int(k),
        "dim": int(codebooks.shape[2]),
        "method": method,
    }


# ----------------------------------------------------------------------------- rendering

_COLUMNS = (("layer", "layer", "{}"), ("utilization", "util", "{:.4f}"), ("entropy", "H/log2K", "{:.4f}"),
            ("mse", "mse", "{:.6f}"), ("cosine", "cos loss", "{:.4f}"), ("min_size", "min", "{}"),
            ("max_size", "max", "{}"), ("prefix_collision_rate", "prefix coll.", "{:.4f}"))


def _fmt(fmt: str, value: Any) -> str:
    return "-" if value is None else fmt.format(value)


def render_markdown(report: Dict[str, Any], title: str = "Semantic-ID quality") -> str:
    """Markdown table of one report (also what ``sids report`` prints)."""
    lines = [f"# {title}", "", f"method: {report.get('method', 'rqkmeans')}, "
             f"items: {report['num_items']}, K = {report['codebook_size']}, "
             f"full-tuple collision rate: {report['collision_rate']:.4f}, unique SIDs: {report['unique_sids']}, "
             f"max items per SID: {report['max_items_per_sid']}", "",
             "| " + " | ".join(c[1] for c in _COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for row in report["layers"]:
        lines.append("| " + " | ".join(_fmt(fmt, row.get(key)) for key, _, fmt in _COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def render_compare(a: Dict[str, Any], b: Dict[str, Any], name_a: str, name_b: str) -> str:
    """Side-by-side Markdown table of two reports (metric per layer, A, B, B - A)."""
    lines = [f"| metric | {name_a} | {name_b} | B - A |", "|---|---|---|---|",
             f"| method | {a.get('method', 'rqkmeans')} | {b.get('method', 'rqkmeans')} | - |"]

    def add(label: str, va: Any, vb: Any, fmt: str) -> None:
        diff = "-" if va is None or vb is None else fmt.format(vb - va)
        lines.append(f"| {label} | {_fmt(fmt, va)} | {_fmt(fmt, vb)} | {diff} |")

    for layer in range(max(len(a["layers"]), len(b["layers"]))):
        ra = a["layers"][layer] if layer < len(a["layers"]) else {}
        rb = b["layers"][layer] if layer < len(b["layers"]) else {}
        for key, label, fmt in _COLUMNS[1:]:
            add(f"L{layer + 1} {label}", ra.get(key), rb.get(key), fmt)
    add("collision rate (full tuple)", a["collision_rate"], b["collision_rate"], "{:.4f}")
    add("unique SIDs", a["unique_sids"], b["unique_sids"], "{}")
    add("max items per SID", a["max_items_per_sid"], b["max_items_per_sid"], "{}")
    return "\n".join(lines) + "\n"
