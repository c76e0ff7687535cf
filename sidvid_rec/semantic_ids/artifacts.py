"""Semantic-ID artifacts on disk (safetensors + JSON, no pickle), written as one atomic directory.

Files of ``DIR``:

* ``codebooks.safetensors``: ``codebooks [L, K, D]`` float32 (layer l's centroids of layer
  l-1's residuals);
* ``codes.safetensors``: ``codes [N+1, L]`` int64 and ``dedup [N+1]`` int64. Row ``i`` is
  item ``i``; **row 0 is the padding item and holds -1 everywhere** (:data:`PAD_CODE`), so
  it can never be mistaken for a real code. ``dedup`` is the TIGER disambiguation code
  (0, 1, 2, ... among items sharing the whole L-tuple), stored even when ``dedup`` is off;
* ``sid_index.safetensors``: SID -> items, CSR style over the distinct L-tuples:
  ``sids [S, L]`` (lexicographic order), ``offsets [S+1]``, ``items [N]`` (items of SID s are
  ``items[offsets[s]:offsets[s+1]]``, in dedup order);
* ``rqvae.safetensors`` (``method: rqvae`` builds only): the encoder/decoder weights; the
  codebooks of such a build live in its latent space (``D`` = ``sids.rqvae_latent``);
* ``manifest.json``: format, ``method`` (``rqkmeans`` or ``rqvae``; absent in builds made before
  RQ-VAE existed, which are all ``rqkmeans``), parameters, encoder identity, data fingerprint,
  embeddings sha256, balancing (or RQ-VAE training) stats and the sha256 of each file above
  (checked on load);
* ``report.json`` / ``report.md`` / ``code_usage.png``: the quality report (derived files,
  not part of the integrity check).
"""

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import safetensors.numpy

from sidvid_rec import storage
from sidvid_rec.errors import ArtifactError
from sidvid_rec.semantic_ids.codebook import distinct_tuples
from sidvid_rec.semantic_ids.kmeans import SizeBounds
from sidvid_rec.semantic_ids.plot import write_code_usage_png
from sidvid_rec.artifacts import check_replaceable
from sidvid_rec.semantic_ids.report import render_markdown

FORMAT = "sidvid_rec.semantic_ids"
FORMAT_VERSION = 1
PAD_CODE = -1
CODEBOOKS_FILE = "codebooks.safetensors"
CODES_FILE = "codes.safetensors"
INDEX_FILE = "sid_index.safetensors"
MANIFEST_FILE = "manifest.json"
REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "code_usage.png"


@dataclass
class SidArtifacts:
    """Loaded semantic IDs (see the module docstring for the layout).

    Attributes:
        codes: ``[N+1, L]`` int64, row 0 (padding) = -1, rows 1..N in ``[0, K)``.
        dedup: ``[N+1]`` int64 disambiguation code, row 0 = -1.
        codebooks: ``[L, K, D]`` float32.
        codebook_size: K.
        layers: L.
        manifest: the parsed ``manifest.json``.
        index_sids / index_offsets / index_items: the SID -> items map (CSR).
    """

    codes: np.ndarray
    dedup: np.ndarray
    codebooks: np.ndarray
    codebook_size: int
    layers: int
    manifest: Dict[str, Any]
    index_sids: np.ndarray
    index_offsets: np.ndarray
    index_items: np.ndarray

    @property
    def num_items(self) -> int:
        return int(self.codes.shape[0] - 1)

    @property
    def dim(self) -> int:
        return int(self.codebooks.shape[2])

    @property
    def method(self) -> str:
        """``rqkmeans`` or ``rqvae`` (builds older than the ``method`` key are ``rqkmeans``)."""
        return str(self.manifest.get("method", "rqkmeans"))

    @property
    def use_dedup(self) -> bool:
        """Whether the build asked for the extra disambiguation code."""
        return bool(self.manifest["params"]["dedup"])


def sid_index(codes: np.ndarray, dedup: np.ndarray) -> Dict[str, np.ndarray]:
    """CSR map from each distinct tuple of ``codes [N, L]`` to its items (ids 1..N)."""
    sids, _, inverse = distinct_tuples(codes)
    order = np.lexsort((dedup, inverse))  # by SID, then disambiguation code (then item id)
    sizes = np.bincount(inverse, minlength=sids.shape[0])
    return {"sids": sids.astype(np.int64),
            "offsets": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            "items": (order + 1).astype(np.int64)}


def _blob(tensors: Dict[str, np.ndarray]) -> bytes:
    return safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def save_sid_artifacts(out: str, codebooks: np.ndarray, codes: np.ndarray, dedup: np.ndarray,
                       manifest: Dict[str, Any], report: Dict[str, Any],
                       bounds: Optional[SizeBounds] = None,
                       extra: Optional[Dict[str, Dict[str, np.ndarray]]] = None) -> str:
    """Writes the artifact directory ``out`` atomically and returns its expanded path.

    Args:
        codebooks: ``[L, K, D]``.
        codes: ``[N, L]`` codes of items 1..N (no padding row; it is added here).
        dedup: ``[N]`` disambiguation codes.
        manifest: parameters, encoder, data fingerprint, ... (completed here with shapes and
            file hashes).
        report: :func:`~sidvid_rec.semantic_ids.report.sid_report` output.
        bounds: balanced size bounds, drawn on the usage plot.
        extra: more safetensors files, ``{file name: tensors}`` (e.g. the RQ-VAE weights),
            hashed in the manifest like the others.
    """
    out = storage.expand(out)
    check_replaceable(out, FORMAT)
    pad = np.full((1, codes.shape[1]), PAD_CODE, dtype=np.int64)
    blobs = {
        CODEBOOKS_FILE: _blob({"codebooks": codebooks.astype(np.float32)}),
        CODES_FILE: _blob({"codes": np.concatenate([pad, codes.astype(np.int64)]),
                           "dedup": np.concatenate([[PAD_CODE], dedup]).astype(np.int64)}),
        INDEX_FILE: _blob(sid_index(codes, dedup)),
    }
    blobs.update({name: _blob(tensors) for name, tensors in (extra or {}).items()})
    full = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION, num_items=int(codes.shape[0]),
                layers=int(codebooks.shape[0]), codebook_size=int(codebooks.shape[1]), dim=int(codebooks.shape[2]),
                dedup_size=int(dedup.max()) + 1 if dedup.size else 0, pad_code=PAD_CODE,
                files={name: hashlib.sha256(blob).hexdigest() for name, blob in blobs.items()})
    with storage.atomic_dir(out) as tmp:
        for name, blob in blobs.items():
            with storage.open_file(os.path.join(tmp, name), "wb") as f:
                f.write(blob)
        storage.write_json(os.path.join(tmp, MANIFEST_FILE), full)
        write_report_files(tmp, report, codes, int(codebooks.shape[1]), bounds)
    return out


def write_report_files(directory: str, report: Dict[str, Any], codes: np.ndarray, codebook_size: int,
                       bounds: Optional[SizeBounds] = None) -> None:
    """``report.json``, ``report.md`` and ``code_usage.png`` of ``codes [N, L]`` into ``directory``."""
    storage.write_json(os.path.join(directory, REPORT_JSON), report)
    with storage.atomic_open(os.path.join(directory, REPORT_MD), "w") as f:
        f.write(render_markdown(report, title=f"Semantic-ID quality: {os.path.basename(directory)}"))
    write_code_usage_png(os.path.join(directory, REPORT_PNG), codes, codebook_size, bounds)


# ----------------------------------------------------------------------------- loading


def read_checked(directory: str, name: str, manifest: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Tensors of the safetensors file ``name`` of ``directory``, checked against the manifest's sha256."""
    return _read_checked(directory, name, manifest)


def _read_checked(directory: str, name: str, manifest: Dict[str, Any]) -> Dict[str, np.ndarray]:
    path = os.path.join(directory, name)
    if not storage.exists(path):
        raise ArtifactError(f"semantic-ID artifact incomplete: missing {path}")
    with storage.open_file(path, "rb") as f:
        blob = f.read()
    expected = manifest.get("files", {}).get(name)
    if hashlib.sha256(blob).hexdigest() != expected:
        raise ArtifactError(f"{path}: sha256 differs from manifest.json (file changed or damaged)")
    try:
        return safetensors.numpy.load(blob)
    except Exception as e:  # noqa: BLE001 - any decode failure is a damaged artifact
        raise ArtifactError(f"{path}: not a readable safetensors file ({type(e).__name__})")


def _need(cond: bool, directory: str, what: str) -> None:
    if not cond:
        raise ArtifactError(f"semantic-ID artifact {directory} is inconsistent: {what}")


def _validate(art: SidArtifacts, directory: str) -> None:
    m, n = art.manifest, int(art.manifest.get("num_items", -1))
    _need(art.codebooks.shape == (m.get("layers"), m.get("codebook_size"), m.get("dim")), directory,
          f"codebooks shape {tuple(art.codebooks.shape)} vs manifest")
    _need(art.codes.shape == (n + 1, art.layers), directory, f"codes shape {tuple(art.codes.shape)}")
    _need(art.dedup.shape == (n + 1,), directory, f"dedup shape {tuple(art.dedup.shape)}")
    _need(bool((art.codes[0] == PAD_CODE).all()) and art.dedup[0] == PAD_CODE, directory,
          "row 0 (padding) must be -1")
    _need(n == 0 or art.dedup[1:].min() >= 0, directory, "negative disambiguation codes")
    body = art.codes[1:]
    _need(body.size == 0 or (body.min() >= 0 and body.max() < art.codebook_size), directory,
          f"codes outside [0, {art.codebook_size})")
    _need(art.index_offsets.size == art.index_sids.shape[0] + 1 and art.index_offsets[-1] == n
          and art.index_items.shape == (n,), directory, "SID index sizes")
    _need(np.array_equal(np.sort(art.index_items), np.arange(1, n + 1)), directory,
          "SID index must list every item once")


def load_sid_artifacts(directory: str) -> SidArtifacts:
    """Loads and validates a ``sids build`` directory; any problem is one ArtifactError line."""
    directory = storage.expand(directory)
    manifest_path = os.path.join(directory, MANIFEST_FILE)
    if not storage.exists(manifest_path):
        raise ArtifactError(f"not a semantic-ID artifact directory (no {MANIFEST_FILE}): {directory}")
    manifest = storage.read_json(manifest_path)
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path} is not a semantic-ID manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{manifest_path}: format version {manifest.get('format_version')} "
                            f"is not supported (expected {FORMAT_VERSION})")
    codebooks = _read_checked(directory, CODEBOOKS_FILE, manifest)
    codes = _read_checked(directory, CODES_FILE, manifest)
    index = _read_checked(directory, INDEX_FILE, manifest)
    try:
        art = SidArtifacts(codes=codes["codes"], dedup=codes["dedup"], codebooks=codebooks["codebooks"],
                           codebook_size=int(manifest["codebook_size"]), layers=int(manifest["layers"]),
                           manifest=manifest, index_sids=index["sids"], index_offsets=index["offsets"],
                           index_items=index["items"])
    except KeyError as e:
        raise ArtifactError(f"semantic-ID artifact {directory} lacks {e}")
    _validate(art, directory)
    return art


def load_report(directory: str) -> Dict[str, Any]:
    """The stored ``report.json`` of an artifact directory."""
    return storage.read_json(os.path.join(storage.expand(directory), REPORT_JSON))
