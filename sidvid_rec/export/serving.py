"""The serving side of an export: verify and load it, then retrieve the top-K items for a history.

Imports nothing of the training stack (no TorchRec, no checkpoints, no pickle): the files
are safetensors, JSON and a FAISS index; the HSTU encoder is rebuilt from the manifest's
hyperparameters and its weights.

The directory's layout is :mod:`sidvid_rec.export.format`'s.

Modes ``id``, ``sid`` and ``sid_id`` retrieve by exact inner product of the encoder state
with the item vectors. ``sid_gen`` exports run the trie-constrained beam search from the
encoder's KV cache (:mod:`sidvid_rec.export.sid_gen`; scores are SID log-probabilities). COBRA exports decode with the run's own decoders
(:mod:`sidvid_rec.export.cobra`): the manifest's ``cobra`` section records the
history length, query-time rule, SID temperature, default decoder and decoder settings.

Ids: ``retrieve`` takes and returns the data set's own (raw) item ids, e.g. MovieLens
``movieId``; :meth:`ExportedModel.to_internal` maps them to the contiguous ids 1..N.

Example::

    model = load_export("runs/demo/export")
    result = model.retrieve([1, 50, 260], k=10)      # raw ids, oldest first
    result.items[0]                                  # {"item_id": ..., "title": ..., "score": ...}
    model.retrieve([1, 50, 260], k=10, decoder="beam")   # COBRA exports: any decoder
"""

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from sidvid_rec import storage
from sidvid_rec.errors import ArtifactError, ConfigError, DataError
from sidvid_rec.export.cobra import CobraRetriever, HistoryBatch, keep_recent, load_cobra
from sidvid_rec.export.sid_gen import SidGenRetriever, load_sid_gen
from sidvid_rec.export.format import DENSE, INDEX, ITEM_VECTORS, ITEMS, check_mode, read_manifest, read_verified
from sidvid_rec.modules.hstu import HSTUEncoder, HSTUParams
from sidvid_rec.ops import jagged
from sidvid_rec.retrieval.faiss_index import VidIndex
from sidvid_rec.types import MISSING_ID, decodes, generates_sids


@dataclass
class Retrieved:
    """Top-K of one history: internal ids, raw ids, titles and scores (best first).

    Scores are inner products (modes ``id``/``sid``/``sid_id``, COBRA ``direct``/``neighbor``/
    ``soft``), the ``beam`` decoder's fused score, or ``sid_gen``'s SID log-probability.
    """

    ids: np.ndarray
    items: List[Dict[str, Any]]


def _safetensors(blob: bytes, name: str) -> Dict[str, torch.Tensor]:
    import safetensors.torch  # lazy: keeps `import sidvid_rec.export.serving` free of native libraries until a file is read

    try:
        return safetensors.torch.load(blob)
    except Exception as e:  # noqa: BLE001  (hash matched but the content is not safetensors)
        raise ArtifactError(f"export file {name} is not a readable safetensors file ({type(e).__name__})")


def _faiss_index(blob: bytes) -> Any:
    """The FAISS index in ``blob`` (the verified bytes of ``index.faiss``, not a second read)."""
    import faiss  # lazy: keeps `import sidvid_rec.export.serving` free of native libraries until a file is read

    try:
        return faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
    except RuntimeError as e:
        raise ArtifactError(f"export file {INDEX} is not a readable FAISS index ({str(e).splitlines()[0][:120]})")


class ExportedModel:
    """An export loaded for retrieval: encoder, item vectors, FAISS index, item names
    (COBRA: and the decoder, :class:`~sidvid_rec.export.cobra.CobraRetriever`).

    Args:
        directory: the export directory.
        manifest: the parsed manifest.
        blobs: verified file contents (:func:`read_verified`).
    """

    def __init__(self, directory: str, manifest: Dict[str, Any], blobs: Dict[str, bytes]) -> None:
        self.directory = directory
        self.manifest = manifest
        self.mode = check_mode(manifest["model"]["mode"], directory)
        vectors = _safetensors(blobs[ITEM_VECTORS], ITEM_VECTORS)
        self.item_vectors = vectors["item_vectors"]  # [N+1, D]
        try:
            self.encoder = HSTUEncoder.from_params(HSTUParams(**manifest["encoder"]))
        except TypeError as e:
            raise ArtifactError(f"export {directory}: the manifest's encoder section does not fit ({e})")
        dense = _safetensors(blobs[DENSE], DENSE)
        encoder_state = {k[len("encoder."):]: v for k, v in dense.items() if k.startswith("encoder.")}
        try:
            self.encoder.load_state_dict(encoder_state)
        except RuntimeError as e:
            raise ArtifactError(f"export {DENSE} does not fit the manifest's encoder ({str(e).splitlines()[0][:160]})")
        self.encoder.eval()
        search = manifest.get("index", {})
        self.index = VidIndex(_faiss_index(blobs[INDEX]), kind=search.get("kind", "flat"),
                              ef_search=int(search.get("ef_search", 256)), nprobe=int(search.get("nprobe", 16)))
        items = json.loads(blobs[ITEMS].decode("utf-8"))
        self.raw_ids: List[Any] = items["raw_ids"]
        self.titles: List[str] = items["titles"]
        self._internal = {str(raw): i for i, raw in enumerate(self.raw_ids) if i > 0}
        self.filter_history: bool = bool(manifest.get("filter_history", True))
        self.cobra: Optional[CobraRetriever] = None
        if decodes(self.mode):
            self.cobra = load_cobra(manifest, self.encoder, dense, vectors, self.index, self.filter_history)
        self.sid_gen: Optional[SidGenRetriever] = None
        if generates_sids(self.mode):
            self.sid_gen = load_sid_gen(manifest, self.encoder, vectors, self.filter_history)

    @property
    def num_items(self) -> int:
        return len(self.raw_ids) - 1

    def to_internal(self, raw_ids: Sequence[Any]) -> List[int]:
        """Raw (data set) item ids -> internal ids 1..N; an unknown id is a one-line DataError."""
        out = []
        for raw in raw_ids:
            internal = self._internal.get(str(raw).strip())
            if internal is None:
                raise DataError(f"item id {raw} is not in this export's catalogue ({self.num_items} items)")
            out.append(internal)
        return out

    def unknown(self, raw_ids: Sequence[Any]) -> List[Any]:
        """The raw ids of ``raw_ids`` that are not in this export's catalogue, in order."""
        return [raw for raw in raw_ids if str(raw).strip() not in self._internal]

    @torch.no_grad()
    def query(self, history: Sequence[int], timestamps: Optional[Sequence[int]] = None,
              query_time: Optional[int] = None) -> torch.Tensor:
        """The encoder state ``[D]`` after ``history`` (internal ids, oldest first); modes
        ``id``/``sid``/``sid_id`` only (a COBRA export decodes, see :meth:`retrieve`).

        ``timestamps`` (one per item, seconds) feed the time bias; the query time is the time of
        the item to predict (default: the last item's). Without timestamps every event counts as
        simultaneous. Only the most recent ``max_len`` items are used.
        """
        if self.cobra is not None or self.sid_gen is not None:
            raise ConfigError(f"a {self.mode} export has no single query state: use retrieve(), which decodes")
        batch = HistoryBatch.single(history, timestamps, query_time)
        max_len = self.encoder.max_len
        ids, times = batch.item_ids[-max_len:], batch.timestamps[-max_len:]
        offsets = torch.tensor([0, ids.numel()])
        return self.encoder.last_states(self.item_vectors[ids], offsets, times, batch.query_times)[0]

    def retrieve(self, history: Sequence[Any], k: int = 10, timestamps: Optional[Sequence[int]] = None,
                 query_time: Optional[int] = None, raw_ids: bool = True, decoder: Optional[str] = None) -> Retrieved:
        """Top-``k`` items after ``history`` (raw ids unless ``raw_ids=False``), history items removed.

        Modes ``id``/``sid``/``sid_id``: exact inner product of the encoder state with the item
        vectors (through the FAISS index). COBRA: the top-``k`` of ``decoder`` (``direct``,
        ``neighbor``, ``soft`` or ``beam``; default the run's ``eval.decoder``), exactly as
        ``sidvid-rec evaluate`` decodes; only the most recent ``max_len`` items are encoded,
        every history item is filtered.
        """
        query = Query(history, k, timestamps, query_time, decoder)
        return self.retrieve_many([query], raw_ids=raw_ids)[0]

    def check(self, query: "Query", raw_ids: bool = True) -> HistoryBatch:
        """``query``'s history as internal ids in a one-history batch; a one-line UserError for an
        empty history, an unknown id, a non-positive ``k``, timestamps of the wrong length or a
        decoder on a non-COBRA export (what :meth:`retrieve_many` checks before any model call)."""
        if query.k <= 0:
            raise DataError(f"--k must be positive, got {query.k}")
        if query.decoder is not None and self.cobra is None:
            raise ConfigError(f"--decoder applies to COBRA exports; this export is mode {self.mode}")
        internal = self.to_internal(query.history) if raw_ids else [int(i) for i in query.history]
        bad = [i for i in internal if not 1 <= i <= self.num_items]
        if bad:
            raise DataError(f"item id {bad[0]} is outside [1, {self.num_items}]")
        return HistoryBatch.single(internal, query.timestamps, query.query_time)

    @torch.no_grad()
    def retrieve_many(self, queries: Sequence["Query"], raw_ids: bool = True) -> List[Retrieved]:
        """:meth:`retrieve` for each query, batched: the queries are checked first (any bad one
        raises before a model call), then each group of equal ``k`` and decoder is one encoder /
        decoder pass over its histories together. Result ``i`` belongs to ``queries[i]``.
        """
        checked = [self.check(q, raw_ids) for q in queries]
        out: List[Optional[Retrieved]] = [None] * len(queries)
        groups: Dict[Any, List[int]] = {}
        for i, q in enumerate(queries):
            groups.setdefault((min(q.k, self.num_items), q.decoder), []).append(i)
        for (k, decoder), members in groups.items():
            batch = _concat([checked[i] for i in members])
            ids, scores = self._top_k(batch, k, decoder)
            for row, i in enumerate(members):
                keep = [(int(a), float(s)) for a, s in zip(ids[row], scores[row]) if int(a) != MISSING_ID]
                items = [{"item_id": self.raw_ids[a], "title": self.titles[a], "score": round(s, 6)} for a, s in keep]
                out[i] = Retrieved(np.array([a for a, _ in keep], dtype=np.int64), items)
        return out  # type: ignore[return-value]

    def _top_k(self, batch: HistoryBatch, k: int, decoder: Optional[str]) -> Any:
        """``(ids [B, k], scores [B, k])`` for the checked histories of ``batch``."""
        if self.cobra is not None:
            top = self.cobra.top_k(batch, k, decoder)
            return top.items, top.scores
        if self.sid_gen is not None:  # the trie-constrained beam search, from the KV cache
            top = self.sid_gen.top_k(batch, k)
            return top.items, top.scores
        keep = keep_recent(batch.offsets, self.encoder.max_len)
        recent = jagged.lengths_to_offsets(jagged.offsets_to_lengths(batch.offsets).clamp(max=self.encoder.max_len))
        states = self.encoder.last_states(self.item_vectors[batch.item_ids[keep]], recent, batch.timestamps[keep],
                                          batch.query_times)  # [B, D]
        if self.filter_history:
            hits = self.index.search_excluding(states, k, batch.item_ids, batch.offsets)
        else:
            hits = self.index.search_excluding(states, k, torch.empty(0, dtype=torch.long), None)
        return hits.ids, hits.scores

    @torch.no_grad()
    def top_k_batch(self, item_ids: torch.Tensor, timestamps: torch.Tensor, offsets: torch.Tensor, k: int,
                    query_times: Optional[torch.Tensor] = None,
                    decoder: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` after each of ``B`` histories at once: ``(ids [B, k], scores [B, k])``, internal ids.

        ``item_ids [S]`` (internal ids 1..N, oldest first), ``timestamps [S]`` and ``offsets [B+1]``
        are jagged; every history needs at least one item. ``query_times [B]`` defaults to each
        history's last time. What :meth:`retrieve` computes for each history (the same encoder
        input, history filter and decoder), batched; missing slots are ``MISSING_ID``.
        """
        if k <= 0:
            raise DataError(f"--k must be positive, got {k}")
        if decoder is not None and self.cobra is None:
            raise ConfigError(f"--decoder applies to COBRA exports; this export is mode {self.mode}")
        if query_times is None:
            query_times = timestamps[offsets[1:] - 1]
        return self._top_k(HistoryBatch(item_ids, timestamps, offsets, query_times), min(k, self.num_items), decoder)


@dataclass
class Query:
    """One retrieval request of :meth:`ExportedModel.retrieve_many` (arguments as :meth:`~ExportedModel.retrieve`'s)."""

    history: Sequence[Any]
    k: int = 10
    timestamps: Optional[Sequence[int]] = None
    query_time: Optional[int] = None
    decoder: Optional[str] = None


def _concat(batches: Sequence[HistoryBatch]) -> HistoryBatch:
    """One jagged batch of several one-history batches, in order."""
    lengths = torch.tensor([b.item_ids.numel() for b in batches], dtype=torch.long)
    return HistoryBatch(torch.cat([b.item_ids for b in batches]), torch.cat([b.timestamps for b in batches]),
                        torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
                        torch.cat([b.query_times for b in batches]))


def load_export(directory: str) -> ExportedModel:
    """Verifies every file of an export against its manifest, then loads it for retrieval."""
    directory = storage.expand(directory)
    manifest = read_manifest(directory)
    return ExportedModel(directory, manifest, read_verified(directory, manifest))
