"""The export format: file names, version, the modes' retrieval kinds, and the manifest checks.

Written by :mod:`sidvid_rec.export.writer`, read by :mod:`sidvid_rec.export.serving`; the
integrity checks are :mod:`sidvid_rec.artifacts`'. Export directory::

    manifest.json              format, model hyperparameters, sha256 of every file below
    tables.safetensors         the TorchRec tables gathered from their shards, cut to ``dim``:
                               ``item_id [N+1, D]`` and/or ``sid_prefix [S, D]``
    item_vectors.safetensors   ``item_vectors [N+1, D]``: each item's (fused) input vector,
                               i.e. what the model looks up for a history item (COBRA: the
                               VID vectors, plus ``sid_vectors [S, D]`` of the valid SIDs and
                               ``sid_of_item [N+1]``, each item's SID among them)
    dense.safetensors          every other parameter (HSTU encoder ``encoder.*``, fusion ...)
    index.faiss                FAISS index (:class:`~sidvid_rec.retrieval.faiss_index.VidIndex`,
                               ``retrieval.index`` of the run; flat = exact inner product) over
                               the L2-normalised item vectors of items 1..N (id = internal id)
    items.json                 ``raw_ids`` and ``titles`` per internal id (0 = padding)
    sids/                      copy of the semantic-ID artifacts (modes sid, sid_id, cobra)
"""

import os
from typing import Any, Dict, List, get_args

from sidvid_rec import artifacts
from sidvid_rec.errors import ArtifactError
from sidvid_rec.types import ModelMode, ranks_by_inner_product

FORMAT = "sidvid_rec.export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TABLES = "tables.safetensors"
ITEM_VECTORS = "item_vectors.safetensors"
DENSE = "dense.safetensors"
INDEX = "index.faiss"
ITEMS = "items.json"
SIDS_DIR = "sids"
INNER_PRODUCT_MODES = tuple(m for m in get_args(ModelMode) if ranks_by_inner_product(m))
"""Modes whose top-K is the encoder state against the item vectors (no decoder)."""


def list_files(directory: str) -> List[str]:
    """Relative paths of every file under ``directory`` (sorted), the manifest excluded."""
    return artifacts.list_files(directory, exclude=(MANIFEST,))


def read_verified(directory: str, manifest: Dict[str, Any]) -> Dict[str, bytes]:
    """Every file named in the manifest, read once and checked against its sha256.

    Raises a one-line ArtifactError on a missing, changed or unexpected file; nothing is
    returned (so nothing is loaded) unless all files pass.
    """
    return artifacts.read_verified(directory, manifest.get("files", {}), what=f"export {directory}")


def read_manifest(directory: str) -> Dict[str, Any]:
    return artifacts.read_manifest(os.path.join(directory, MANIFEST), FORMAT, FORMAT_VERSION, what="an export",
                                   hint="; run `sidvid-rec export` first")


def check_mode(mode: Any, directory: str) -> ModelMode:
    """The manifest's model mode, refused unless the serving side knows it."""
    if mode not in get_args(ModelMode):
        raise ArtifactError(f"export {directory} has unknown model mode {mode!r}")
    return mode
