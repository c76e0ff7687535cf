"""FAISS index over item vectors (COBRA's VID space): build, search, save, load.

Kinds (``RetrievalConfig.index``):

* ``flat``: exact maximum inner product (``IndexFlatIP``); its results equal a brute-force
  ``torch.topk(queries @ vectors.T)`` (tested);
* ``hnsw``: ``IndexHNSWFlat`` with inner-product metric (``hnsw_m`` links, ``ef_search``);
* ``ivf``: ``IndexIVFFlat`` over a flat inner-product quantizer (``ivf_nlist`` lists,
  ``0`` = ``4 sqrt(n)``; ``nprobe`` visited per query), trained on the vectors themselves.

Every kind is wrapped in an ``IndexIDMap`` so searches return item ids (1..N), never rows.
With ``use_gpu`` and a faiss build with GPU support and a visible CUDA device, ``flat`` and
``ivf`` are moved to this rank's GPU (:func:`gpu_device`: the current CUDA device, i.e.
``LOCAL_RANK % devices``); HNSW has no GPU version and stays on the CPU. When a GPU index is
asked for but faiss has no GPU support (or sees no GPU) the index stays on the CPU and says so
in the log (a warning where torch sees CUDA), or raises with ``strict_gpu``.

Files go through iopath: :meth:`VidIndex.save` writes with ``faiss.write_index`` to a local
temporary file and copies it to the destination atomically; :meth:`VidIndex.load` reads a
local copy (iopath caches remote files).

Example::

    index = VidIndex.build(item_vectors[1:], ids=torch.arange(1, n + 1), kind="flat")
    hits = index.search(queries, k=10)            # hits.ids [Q, 10], hits.scores [Q, 10]
    top = index.search_excluding(queries, 10, exclude_values, exclude_offsets)
"""

import logging
import math
import os
import shutil
import tempfile
from typing import NamedTuple, Optional, Union

import faiss
import numpy as np
import torch
from torch import Tensor

from sidvid_rec import storage
from sidvid_rec.config import RetrievalConfig
from sidvid_rec.errors import ArtifactError, ConfigError
from sidvid_rec.types import MISSING_ID, IndexKind  # MISSING_ID: what FAISS returns when it has fewer than k results


log = logging.getLogger(__name__)


class SearchResult(NamedTuple):
    scores: Tensor
    """``[Q, k]`` float32 inner products, best first (``-inf`` where ``ids`` is missing)."""
    ids: Tensor
    """``[Q, k]`` int64 item ids (``MISSING_ID`` = no result)."""


def _as_float32(x: Union[Tensor, np.ndarray]) -> np.ndarray:
    array = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    return np.ascontiguousarray(array, dtype=np.float32)


def gpu_unavailable_reason() -> Optional[str]:
    """Why a GPU index cannot be built here, or ``None`` when it can."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if not hasattr(faiss, "StandardGpuResources"):
        return "the installed faiss has no GPU support (faiss-cpu; install faiss-gpu-cu12, see `make install-gpu`)"
    if faiss.get_num_gpus() == 0:
        return "faiss sees no GPU"
    return None


def gpu_available() -> bool:
    """faiss was built with GPU support and sees a GPU, and torch sees CUDA."""
    return gpu_unavailable_reason() is None


def gpu_device(device: Optional[int] = None) -> int:
    """The GPU a FAISS index goes to: ``device`` when given, else this process's current CUDA
    device (``init_distributed`` sets it to ``LOCAL_RANK % devices``), else ``LOCAL_RANK`` modulo
    the GPUs faiss sees. Never a fixed GPU 0: every rank would then put its index on one GPU."""
    count = max(faiss.get_num_gpus(), 1) if hasattr(faiss, "get_num_gpus") else 1
    if device is not None:
        return int(device) % count
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.current_device() % count
    return int(os.environ.get("LOCAL_RANK", "0")) % count


_warned: set = set()


def _cpu_fallback(reason: str, strict: bool) -> None:
    """A GPU index was asked for and cannot be built: raise (``strict``) or warn once per reason."""
    message = f"retrieval.use_gpu=true but the FAISS index stays on the CPU: {reason}"
    if strict:
        raise ConfigError(message)
    if reason not in _warned:
        _warned.add(reason)
        level = logging.WARNING if torch.cuda.is_available() else logging.INFO  # a CPU host expects a CPU index
        log.log(level, message)


def _base_index(kind: IndexKind, dim: int, num: int, hnsw_m: int, ivf_nlist: int) -> faiss.Index:
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        if hnsw_m < 2:
            raise ConfigError(f"retrieval.hnsw_m must be at least 2, got {hnsw_m}")
        return faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    if kind == "ivf":
        nlist = ivf_nlist or max(1, int(4 * math.sqrt(num)))
        if nlist > num:
            raise ConfigError(f"retrieval.ivf_nlist={nlist} exceeds the {num} vectors to index")
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    raise ConfigError(f"unknown retrieval.index {kind!r}; choose flat, hnsw or ivf")


class VidIndex:
    """An item-vector index answering inner-product top-k queries with item ids.

    Build with :meth:`build` or :meth:`load`; ``ef_search`` / ``nprobe`` are query-time knobs.
    """

    def __init__(self, index: faiss.Index, kind: IndexKind, ef_search: int = 256, nprobe: int = 16,
                 use_gpu: bool = False, gpu: Optional[int] = None, strict_gpu: bool = False) -> None:
        """``use_gpu``: copy ``flat``/``ivf`` indexes to GPU ``gpu`` (default :func:`gpu_device`,
        the rank's own); when that is impossible the index stays on the CPU with a logged message
        (a warning where torch sees CUDA), or a :class:`ConfigError` with ``strict_gpu``."""
        self._cpu_index = index
        self.kind: IndexKind = kind
        self.dim: int = index.d
        self.on_gpu = False
        self.gpu: Optional[int] = None
        self.set_search_params(ef_search, nprobe)
        self._index = index
        if use_gpu and kind == "hnsw":
            log.info("retrieval.index=hnsw has no GPU version in faiss: the index stays on the CPU")
        elif use_gpu:
            reason = gpu_unavailable_reason()
            if reason is not None:
                _cpu_fallback(reason, strict_gpu)
            else:
                self.gpu = gpu_device(gpu)
                self._gpu_resources = faiss.StandardGpuResources()
                self._index = faiss.index_cpu_to_gpu(self._gpu_resources, self.gpu, index)
                self.on_gpu = True

    @classmethod
    def build(cls, vectors: Union[Tensor, np.ndarray], ids: Union[Tensor, np.ndarray], kind: IndexKind = "flat",
              hnsw_m: int = 32, ef_search: int = 256, ivf_nlist: int = 0, nprobe: int = 16,
              use_gpu: bool = False) -> "VidIndex":
        """Indexes ``vectors [M, D]`` under ``ids [M]`` (int64)."""
        x = _as_float32(vectors)
        id_array = np.ascontiguousarray(ids.detach().cpu().numpy() if isinstance(ids, Tensor) else ids, dtype=np.int64)
        if x.ndim != 2 or x.shape[0] == 0 or id_array.shape != (x.shape[0],):
            raise ValueError(f"need vectors [M, D] and ids [M] with M > 0, got {x.shape} and {id_array.shape}")
        base = _base_index(kind, x.shape[1], x.shape[0], hnsw_m, ivf_nlist)
        if not base.is_trained:
            base.train(x)
        index = faiss.IndexIDMap(base)
        index.add_with_ids(x, id_array)
        return cls(index, kind, ef_search, nprobe, use_gpu)

    @classmethod
    def from_config(cls, vectors: Union[Tensor, np.ndarray], ids: Union[Tensor, np.ndarray], r: RetrievalConfig,
                    use_gpu: Optional[bool] = None) -> "VidIndex":
        """:meth:`build` with the ``retrieval`` section's settings (``use_gpu`` overrides ``r.use_gpu``)."""
        return cls.build(vectors, ids, kind=r.index, hnsw_m=r.hnsw_m, ef_search=r.ef_search, ivf_nlist=r.ivf_nlist,
                         nprobe=r.nprobe, use_gpu=r.use_gpu if use_gpu is None else use_gpu)

    def set_search_params(self, ef_search: Optional[int] = None, nprobe: Optional[int] = None) -> None:
        """Changes the query-time knobs of a built index: HNSW ``ef_search``, IVF ``nprobe``
        (``None`` keeps a knob; a knob of the other kind is ignored). A GPU copy is made
        again from the CPU index, which holds the knobs."""
        base = faiss.downcast_index(self._cpu_index.index) if hasattr(self._cpu_index, "index") else self._cpu_index
        if ef_search is not None and isinstance(base, faiss.IndexHNSW):
            base.hnsw.efSearch = ef_search
        if nprobe is not None and isinstance(base, faiss.IndexIVF):
            base.nprobe = nprobe
            if self.on_gpu:
                self._index = faiss.index_cpu_to_gpu(self._gpu_resources, self.gpu, self._cpu_index)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def search(self, queries: Union[Tensor, np.ndarray], k: int) -> SearchResult:
        """Top-``k`` ids and inner products of ``queries [Q, D]`` (best first)."""
        q = _as_float32(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got {q.shape}")
        k_eff = min(k, self.ntotal)
        scores, ids = self._index.search(q, k_eff) if q.shape[0] else (np.zeros((0, k_eff), np.float32),
                                                                          np.zeros((0, k_eff), np.int64))
        scores_t, ids_t = torch.from_numpy(scores), torch.from_numpy(ids)
        if k_eff < k:  # fewer items than asked: pad with missing entries
            pad = k - k_eff
            scores_t = torch.cat([scores_t, torch.full((q.shape[0], pad), float("-inf"))], dim=1)
            ids_t = torch.cat([ids_t, torch.full((q.shape[0], pad), MISSING_ID, dtype=torch.int64)], dim=1)
        scores_t = scores_t.masked_fill(ids_t == MISSING_ID, float("-inf"))
        device = queries.device if isinstance(queries, Tensor) else torch.device("cpu")
        return SearchResult(scores_t.to(device), ids_t.to(device))

    def search_excluding(self, queries: Tensor, k: int, exclude_values: Optional[Tensor] = None,
                         exclude_offsets: Optional[Tensor] = None) -> SearchResult:
        """Top-``k`` per query after removing that query's excluded ids (e.g. its history).

        Args:
            queries: ``[Q, D]``.
            k: results per query.
            exclude_values, exclude_offsets: jagged ids to drop per query (``[E]``, ``[Q+1]``).

        Over-fetches ``k + max excluded count`` so that ``k`` results remain whenever the
        index holds enough items; missing slots are ``MISSING_ID`` / ``-inf``.
        """
        if exclude_values is None or exclude_values.numel() == 0:
            return self.search(queries, k)
        lengths = exclude_offsets[1:] - exclude_offsets[:-1]
        hits = self.search(queries, k + int(lengths.max()))
        drop = excluded_mask(hits.ids, exclude_values, exclude_offsets) | (hits.ids == MISSING_ID)
        order = torch.argsort(drop.to(torch.int8), dim=1, stable=True)[:, :k]  # kept first, in score order
        ids = hits.ids.gather(1, order).masked_fill(drop.gather(1, order), MISSING_ID)
        scores = hits.scores.gather(1, order).masked_fill(drop.gather(1, order), float("-inf"))
        return SearchResult(scores, ids)

    # -- persistence

    def save(self, path: str) -> str:
        """Writes the (CPU) index to ``path`` through iopath, atomically. Returns the path."""
        path = storage.expand(path)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "index.faiss")
            faiss.write_index(self._cpu_index, local)
            with open(local, "rb") as src, storage.atomic_open(path, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return path

    @classmethod
    def load(cls, path: str, ef_search: int = 256, nprobe: int = 16, use_gpu: bool = False) -> "VidIndex":
        """Reads an index written by :meth:`save`."""
        path = storage.expand(path)
        if not storage.exists(path):
            raise ArtifactError(f"FAISS index not found: {path}")
        try:
            index = faiss.read_index(storage.path_manager.get_local_path(path))
        except RuntimeError as e:
            raise ArtifactError(f"cannot read FAISS index {path}: {str(e).splitlines()[0][:160]}")
        base = faiss.downcast_index(index.index) if hasattr(index, "index") else index
        kind: IndexKind = "flat"
        if isinstance(base, faiss.IndexHNSW):
            kind = "hnsw"
        elif isinstance(base, faiss.IndexIVF):
            kind = "ivf"
        return cls(index, kind, ef_search, nprobe, use_gpu)


def excluded_mask(ids: Tensor, exclude_values: Tensor, exclude_offsets: Tensor) -> Tensor:
    """``[Q, k]`` bool: ``ids[q, j]`` is among query q's excluded ids (jagged ``[E]``, ``[Q+1]``)."""
    num_queries = ids.shape[0]
    lengths = (exclude_offsets[1:] - exclude_offsets[:-1]).long()
    width = int(lengths.max()) if lengths.numel() else 0
    if width == 0:
        return torch.zeros_like(ids, dtype=torch.bool)
    cols = torch.arange(width, device=ids.device)
    valid = cols.unsqueeze(0) < lengths.unsqueeze(1)  # [Q, W]
    padded = torch.full((num_queries, width), MISSING_ID - 1, dtype=ids.dtype, device=ids.device)
    padded[valid] = exclude_values.to(ids.device)
    # Sorted rows + searchsorted: O(Q k log W) instead of a [Q, k, W] comparison.
    padded, _ = padded.sort(dim=1)
    pos = torch.searchsorted(padded, ids.contiguous()).clamp(max=width - 1)
    return padded.gather(1, pos) == ids
