"""What every COBRA decoder shares: settings, the model protocol, history-filtered retrieval.

A decoder turns an evaluation batch into ``K`` distinct items per example, none from the
example's history (when filtering is on), best first. SIDs are scored as whole tuples against
the catalogue of *valid* SIDs (``sid_table [S, D]``: the distinct code tuples of the item
set), which plays the role of a trie over valid SIDs: no decoder can ever produce a SID that
no item carries. With ``model.cobra_sid_head=codes`` the SIDs come instead from the codes head's
beam over the trie of the valid SIDs (``DecodeContext.sid_beam``,
:mod:`sidvid_rec.decode.code_sids`): valid by construction too. Items are retrieved from a FAISS index over the VID vectors
(:class:`ItemSearcher`, implemented by :class:`~sidvid_rec.retrieval.VidIndex`; the
decoders do not import the retrieval layer).

Decoders read only ``batch.jagged("item_id")`` (``values()``, ``offsets()``: the history to
filter) and hand the batch to ``model.prepare``; so the batch is a
:class:`~sidvid_rec.data.batches.SequenceBatch` in evaluation and a torchrec-free
:class:`~sidvid_rec.export.cobra.HistoryBatch` when decoding from an export.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Optional, Protocol, Tuple

import torch
from torch import Tensor

from sidvid_rec.config import DecoderSettings

if TYPE_CHECKING:  # torchrec-free at run time: an export decodes without the training stack
    from sidvid_rec.data.batches import SequenceBatch


class SearchHits(Protocol):
    """What a search returns: ``ids [B, k]`` (``MISSING_ID`` in empty slots) and ``scores [B, k]``."""

    ids: Tensor
    scores: Tensor


class ItemSearcher(Protocol):
    """Nearest-neighbour search over the L2-normalised VID vectors of items 1..N."""

    def search(self, queries: Tensor, k: int) -> SearchHits:
        """Top-``k`` of ``queries [B, D]``."""

    def search_excluding(self, queries: Tensor, k: int, exclude_values: Tensor, exclude_offsets: Tensor) -> SearchHits:
        """Top-``k`` of each query with its jagged ``exclude_values`` / ``exclude_offsets [B+1]`` removed."""


class SidRanker(Protocol):
    """Top SIDs of next-SID states by a head other than the whole-SID softmax (the codes head:
    :class:`~sidvid_rec.decode.code_sids.CodeSidBeam`)."""

    def top_sids(self, states: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        """``states [B, D]`` -> ``(log p [B, k'], SID index [B, k'])``, best first."""


class CobraDecodingModel(Protocol):
    """The parts of :class:`~sidvid_rec.models.cobra.CobraRecommender` a decoder uses."""

    temperature: float

    def prepare(self, batch: "SequenceBatch"):
        """History tokens + a placeholder next step (opaque to decoders)."""

    def next_sid_states(self, inputs) -> Tensor:
        """``[B, D]`` states predicting the next SID."""

    def vid_queries(self, inputs, next_sid: Tensor) -> Tensor:
        """``[B, D]`` VID queries given the appended SID embedding ``[B, D]``."""

    def sid_logits(self, states: Tensor, sid_table: Tensor) -> Tensor:
        """``[B, S]`` cosine / temperature."""

    def encode_history(self, inputs):
        """The history encoded once: ``.states [B, D]`` (next-SID states) plus the KV cache."""

    def vid_queries_cached(self, encoded, next_sids: Tensor) -> Tensor:
        """``[B, W, D]`` VID queries of ``W`` SID vectors per example, from ``encoded``'s cache."""


@dataclass
class DecodeContext:
    """Everything a decoder needs besides the batch (built once per evaluation)."""

    model: CobraDecodingModel
    sid_table: Tensor
    """``[S, D]`` raw SID vectors of the valid SIDs (what gets appended)."""
    index: ItemSearcher
    """Search over the L2-normalised VID vectors of items 1..N (a FAISS index)."""
    settings: DecoderSettings
    filter_history: bool = True
    sid_beam: Optional[SidRanker] = None
    """``model.cobra_sid_head=codes``: the SID candidates come from this code beam, not from
    ``sid_table``'s whole-SID logits (which the codes head has none of)."""


class TopK(NamedTuple):
    items: Tensor
    """``[B, K]`` item ids, best first (``MISSING_ID`` only if the catalogue runs out)."""
    scores: Tensor
    """``[B, K]`` the decoder's ranking score of each item."""


def retrieve(ctx: DecodeContext, batch: "SequenceBatch", queries: Tensor, k: int) -> SearchHits:
    """ANN top-``k`` of ``queries [B, D]``, the batch's history items removed when filtering."""
    if not ctx.filter_history:
        return ctx.index.search(queries, k)
    history = batch.jagged("item_id")
    return ctx.index.search_excluding(queries, k, history.values(), history.offsets())


def retrieve_beams(ctx: DecodeContext, batch: "SequenceBatch", queries: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """ANN top-``k`` of every beam's query at once: ``queries [B, W, D]`` -> ``(ids, scores)``,
    each ``[B, W, k]``. One search of ``B * W`` queries (each example's history repeated for its
    ``W`` beams), the same hits as ``W`` calls of :func:`retrieve`."""
    batch_size, width, dim = queries.shape
    flat = queries.reshape(batch_size * width, dim)
    if not ctx.filter_history:
        hits = ctx.index.search(flat, k)
    else:
        history = batch.jagged("item_id")
        values, offsets = repeat_jagged(history.values(), history.offsets().long(), width)
        hits = ctx.index.search_excluding(flat, k, values, offsets)
    return hits.ids.view(batch_size, width, -1), hits.scores.view(batch_size, width, -1)


def repeat_jagged(values: Tensor, offsets: Tensor, times: int) -> Tuple[Tensor, Tensor]:
    """Each row of a jagged ``values`` / ``offsets [B+1]`` repeated ``times`` times in a row:
    ``(values', offsets' [B * times + 1])``."""
    lengths = (offsets[1:] - offsets[:-1]).repeat_interleave(times)  # [B * times]
    new_offsets = torch.zeros(lengths.numel() + 1, dtype=offsets.dtype, device=offsets.device)
    new_offsets[1:] = lengths.cumsum(0)
    starts = offsets[:-1].repeat_interleave(times)  # source start of each new row
    shift = (starts - new_offsets[:-1]).repeat_interleave(lengths, output_size=int(new_offsets[-1]))
    source = torch.arange(int(new_offsets[-1]), device=offsets.device) + shift
    return values[source], new_offsets


class DecodeState:
    """One batch being decoded: the next-SID states, then VID queries for chosen SIDs.

    With ``settings.kv_cache`` the history is encoded once and every query appends its SID
    token to the encoder's KV cache; otherwise the history is re-encoded per query (the
    reference). Both give the same states and queries to float32 rounding.
    """

    def __init__(self, ctx: DecodeContext, batch: "SequenceBatch") -> None:
        self.ctx = ctx
        self.inputs = ctx.model.prepare(batch)
        self.encoded = ctx.model.encode_history(self.inputs) if ctx.settings.kv_cache else None
        self.states = self.encoded.states if self.encoded is not None else ctx.model.next_sid_states(self.inputs)

    def sid_logits(self) -> Tensor:
        """``[B, S]`` SID logits (cosine / temperature) of the next step over the valid SIDs."""
        return self.ctx.model.sid_logits(self.states, self.ctx.sid_table)

    def top_sids(self, k: int) -> Tuple[Tensor, Tensor, Tensor]:
        """``(score [B, k'], log p [B, k'], SID index [B, k'])`` of the ``k' = min(k, S)`` best SIDs:
        whole head: score = logit, ``log p`` = log-softmax over every valid SID; codes head: both
        the code beam's sequence log-probability."""
        if self.ctx.sid_beam is not None:
            log_p, sids = self.ctx.sid_beam.top_sids(self.states, k)
            return log_p, log_p, sids
        logits = self.sid_logits()
        values, sids = top_sids(logits, k)
        return values, torch.log_softmax(logits, dim=1).gather(1, sids), sids

    def best_sid(self) -> Tensor:
        """``[B]`` the most likely next SID."""
        if self.ctx.sid_beam is not None:
            return self.top_sids(1)[2][:, 0]
        return self.sid_logits().argmax(dim=1)

    def vid_queries(self, next_sids: Tensor) -> Tensor:
        """``[B, W, D]`` VID queries of ``W`` appended SID vectors per example (``next_sids [B, W, D]``)."""
        if self.encoded is not None:
            return self.ctx.model.vid_queries_cached(self.encoded, next_sids)
        return torch.stack([self.ctx.model.vid_queries(self.inputs, next_sids[:, j])
                            for j in range(next_sids.shape[1])], dim=1)  # one encoder pass per query


def sid_scores(ctx: DecodeContext, inputs) -> Tensor:
    """``[B, S]`` SID logits (cosine / temperature) of the next step over the valid SIDs."""
    return ctx.model.sid_logits(ctx.model.next_sid_states(inputs), ctx.sid_table)


def top_sids(logits: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """``(logits [B, k'], sid index [B, k'])`` with ``k' = min(k, S)``, best first."""
    top = logits.topk(min(k, logits.shape[1]), dim=1)
    return top.values, top.indices


def as_topk(hits: SearchHits) -> TopK:
    return TopK(hits.ids, hits.scores)


def cosine_from_logits(logits: Tensor, temperature: float) -> Tensor:
    return logits * temperature


def first_occurrence(items: Tensor) -> Tensor:
    """``[B, M]`` bool: True at the first (leftmost) occurrence of each id in its row."""
    order = torch.sort(items, dim=1, stable=True).indices  # equal ids keep their left-to-right order
    ranked = items.gather(1, order)
    first_sorted = torch.ones_like(ranked, dtype=torch.bool)
    first_sorted[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    return torch.zeros_like(first_sorted).scatter(1, order, first_sorted)
