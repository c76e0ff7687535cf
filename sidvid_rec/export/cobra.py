"""COBRA decoding from an export: the decoders' model protocol over exported tensors only.

A COBRA export holds everything the decoders of :mod:`sidvid_rec.decode` need, as plain
tensors (no TorchRec tables, no model class):

* ``item_vectors [N+1, D]``: each item's VID vector (ID row + text projection, unnormalised),
  what the model feeds as a history item's VID token;
* ``sid_vectors [S, D]``: the prefixN vector of each valid SID (what a decoder appends, and
  a history item's SID token: ``sid_vectors[sid_of_item[item]]``);
* ``sid_of_item [N+1]``: index of each item's SID among the valid SIDs (-1 for padding);
* ``type_emb.weight [2, D]`` and the HSTU encoder's weights (``dense.safetensors``);
* the FAISS index over the L2-normalised VID vectors (``index.faiss``);
* with ``model.cobra_sid_head=codes`` (manifest ``cobra.sid_head``): ``sid_tuples [S, L]``
  (each valid SID's codes: the trie) and the head's weights ``sid_head.*`` in ``dense.safetensors``.

:class:`ExportedCobra` implements :class:`~sidvid_rec.decode.base.CobraDecodingModel` on them
with the model's own building blocks (:mod:`sidvid_rec.modules.interleave` for the token
layout, cloned timestamps, positions and query times; :class:`~sidvid_rec.modules.hstu.HSTUEncoder`),
so :func:`sidvid_rec.decode.decode` runs unchanged and returns the trained model's top-K.
:class:`HistoryBatch` is the torchrec-free batch the decoders read (``jagged("item_id")``).

Example::

    cobra = load_cobra(manifest, encoder, dense, vectors, index, filter_history=True)
    batch = HistoryBatch.single([12, 7, 301], timestamps=[10, 20, 30], query_time=40)
    top = cobra.top_k(batch, k=10)                        # top.items [1, 10], best first
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from sidvid_rec.config import DecoderSettings
from sidvid_rec.decode import DECODERS, DecodeContext, TopK, check_codes_head_decoder, decode
from sidvid_rec.decode.code_sids import CodeSidBeam
from sidvid_rec.errors import ArtifactError, ConfigError, DataError
from sidvid_rec.modules.code_head import SID_HEAD_PREFIX, SidCodeHead
from sidvid_rec.modules.hstu import HSTUEncoder
from sidvid_rec.modules.interleave import (CobraCache, DecodeInputs, append_step, encode_history_cached,
                                           interleave_layout, next_sid_states, sid_logits, vid_queries,
                                           vid_queries_cached)
from sidvid_rec.ops import jagged
from sidvid_rec.retrieval.faiss_index import VidIndex
from sidvid_rec.types import DecoderKind, QueryTime

PLACEHOLDER_ITEM = 0
"""Item id of the appended (to be generated) step, as in the model; its SID token is replaced
per query and its VID token is dropped, so its vectors never reach an output."""
TYPE_EMB_KEY = "type_emb.weight"
"""Key of the token-type embedding ``[2, D]`` in ``dense.safetensors``."""


# ----------------------------------------------------------------------------- batch


class Jagged:
    """``values()`` / ``offsets()`` of one jagged feature (the part of a JaggedTensor decoders use)."""

    def __init__(self, values: Tensor, offsets: Tensor) -> None:
        self._values = values
        self._offsets = offsets

    def values(self) -> Tensor:
        return self._values

    def offsets(self) -> Tensor:
        return self._offsets


@dataclass(frozen=True)
class HistoryBatch:
    """Histories to decode, jagged: ``B`` sequences of steps, oldest first, no targets.

    ``item_ids [S]`` internal ids 1..N, ``timestamps [S]`` their times, ``offsets [B+1]``,
    ``query_times [B]`` the time of each recommendation (the appended step's time; the
    model's ``target_timestamp``).
    """

    item_ids: Tensor
    timestamps: Tensor
    offsets: Tensor
    query_times: Tensor

    @classmethod
    def single(cls, history: Sequence[int], timestamps: Optional[Sequence[int]] = None,
               query_time: Optional[int] = None) -> "HistoryBatch":
        """One history; without ``timestamps`` all events are simultaneous (time 0), and the
        query time defaults to the last event's time."""
        ids = torch.as_tensor(list(history), dtype=torch.long)
        if ids.numel() == 0:
            raise DataError("the history is empty: give at least one item")
        times = torch.zeros_like(ids) if timestamps is None else torch.as_tensor(list(timestamps), dtype=torch.long)
        if times.shape != ids.shape:
            raise DataError(f"{times.numel()} timestamps for {ids.numel()} history items")
        when = int(times[-1]) if query_time is None else int(query_time)
        return cls(ids, times, torch.tensor([0, ids.numel()]), torch.tensor([when]))

    def jagged(self, key: str) -> Jagged:
        """``item_id`` or ``timestamp`` as a jagged view (the decoders filter ``item_id``)."""
        if key == "item_id":
            return Jagged(self.item_ids, self.offsets)
        if key == "timestamp":
            return Jagged(self.timestamps, self.offsets)
        raise KeyError(f"a HistoryBatch has item_id and timestamp, not {key!r}")


def keep_recent(offsets: Tensor, max_len: int) -> Tensor:
    """``[S]`` bool: the last ``max_len`` steps of each sequence (``offsets [B+1]``)."""
    num_steps = int(offsets[-1])
    lengths = jagged.offsets_to_lengths(offsets)  # [B]
    from_end = lengths[jagged.sequence_ids(offsets, num_steps)] - jagged.index_within_sequence(offsets, num_steps)
    return from_end <= max_len


# ----------------------------------------------------------------------------- model


class ExportedCobra:
    """The COBRA decoding model rebuilt from an export (:class:`~sidvid_rec.decode.base.CobraDecodingModel`).

    Args:
        encoder: the HSTU encoder with the exported weights, ``max_len >= 2 * max_len + 1`` tokens.
        type_emb: ``[2, D]`` token-type embedding (SID = 0, VID = 1).
        item_vectors: ``[N + 1, D]`` unnormalised VID vectors.
        sid_vectors: ``[S, D]`` SID vectors of the valid SIDs.
        sid_of_item: ``[N + 1]`` int64 SID index of each item (-1 for the padding item).
        temperature: of the SID logits (the run's ``loss.temperature``).
        query_time: ``target`` or ``own`` (the run's ``model.cobra_query_time``).
        max_len: history steps the model reads (the run's ``data.max_len``); older ones are dropped.
    """

    def __init__(self, encoder: HSTUEncoder, type_emb: Tensor, item_vectors: Tensor, sid_vectors: Tensor,
                 sid_of_item: Tensor, temperature: float, query_time: QueryTime, max_len: int) -> None:
        self.encoder = encoder.eval()
        self.type_emb = type_emb
        self.item_vectors = item_vectors
        self.sid_vectors = sid_vectors
        self.sid_of_item = sid_of_item
        self.temperature = temperature
        self.query_time: QueryTime = query_time
        self.max_len = max_len

    def prepare(self, batch: HistoryBatch) -> DecodeInputs:
        """The most recent ``max_len`` steps of each history plus a placeholder step at its query time."""
        keep = keep_recent(batch.offsets, self.max_len)  # [S]
        offsets = jagged.lengths_to_offsets(jagged.offsets_to_lengths(batch.offsets).clamp(max=self.max_len))
        placeholders = torch.full_like(batch.query_times, PLACEHOLDER_ITEM)
        items, step_offsets = append_step(batch.item_ids[keep], offsets, placeholders)  # [S' + B]
        times, _ = append_step(batch.timestamps[keep], offsets, batch.query_times)
        layout = interleave_layout(step_offsets, times, drop_last_vid=True, query_time=self.query_time)
        placeholder_steps = step_offsets[1:] - 1  # [B]
        sid_tokens = self.sid_vectors[self.sid_of_item[items].clamp(min=0)]  # [S' + B, D]
        sid_tokens[placeholder_steps] = 0.0
        return DecodeInputs(layout, sid_tokens, self.item_vectors[items], placeholder_steps)

    def next_sid_states(self, inputs: DecodeInputs) -> Tensor:
        """``[B, D]`` output at each history's last VID token (predicts the next SID)."""
        return next_sid_states(self.encoder, self.type_emb, inputs)

    def vid_queries(self, inputs: DecodeInputs, next_sid: Tensor) -> Tensor:
        """``[B, D]`` outputs at the appended SID token carrying ``next_sid [B, D]``."""
        return vid_queries(self.encoder, self.type_emb, inputs, next_sid)

    def sid_logits(self, states: Tensor, sid_table: Tensor) -> Tensor:
        """``states [B, D]`` x ``sid_table [S, D]`` -> cosine / temperature ``[B, S]``."""
        return sid_logits(states, sid_table, self.temperature)

    def encode_history(self, inputs: DecodeInputs) -> CobraCache:
        """The history encoded once (KV cache) and its next-SID states."""
        return encode_history_cached(self.encoder, self.type_emb, inputs)

    def vid_queries_cached(self, encoded: CobraCache, next_sids: Tensor) -> Tensor:
        """``[B, W, D]`` VID queries of ``W`` candidate SID vectors per history, from the cache."""
        return vid_queries_cached(self.encoder, self.type_emb, encoded, next_sids)


class CobraRetriever:
    """A decode context over an :class:`ExportedCobra` plus the run's default decoder."""

    def __init__(self, context: DecodeContext, default_decoder: DecoderKind) -> None:
        self.context = context
        self.default_decoder: DecoderKind = default_decoder

    @torch.no_grad()
    def top_k(self, batch: HistoryBatch, k: int, decoder: Optional[str] = None) -> TopK:
        """``TopK`` ``[B, k]`` of decoder ``decoder`` (default: the run's ``eval.decoder``)."""
        kind = self.default_decoder if decoder is None else decoder
        if kind not in DECODERS:
            raise ConfigError(f"unknown decoder {kind!r}; choose one of {', '.join(DECODERS)}")
        if self.context.sid_beam is not None:
            check_codes_head_decoder(kind)
        return decode(kind, self.context, batch, k)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- loading


def cobra_manifest_section(max_len: int, query_time: str, temperature: float, decoder: str,
                           settings: DecoderSettings, sid_head: str = "whole") -> Dict[str, Any]:
    """The manifest's ``cobra`` section (written by the export, read by :func:`load_cobra`);
    ``sid_head`` only when it is ``codes`` (older exports have none: the whole-SID head)."""
    section = {"max_len": max_len, "query_time": query_time, "temperature": temperature, "decoder": decoder,
               "decoder_settings": dataclasses.asdict(settings)}
    if sid_head != "whole":
        section["sid_head"] = sid_head
    return section


def load_code_head(dense: Dict[str, Tensor], vectors: Dict[str, Tensor], dim: int, temperature: float) -> CodeSidBeam:
    """The codes head (weights ``sid_head.*`` of ``dense``) and its beam over ``sid_tuples``."""
    if "sid_tuples" not in vectors:
        raise ArtifactError("this COBRA export (cobra_sid_head=codes) lacks sid_tuples; run `sidvid-rec export` again")
    tuples = vectors["sid_tuples"].long()
    if tuples.ndim != 2 or tuples.shape[0] != vectors["sid_vectors"].shape[0] or int(tuples.min()) < 0:
        raise ArtifactError(f"export: sid_tuples {tuple(tuples.shape)} does not fit sid_vectors "
                            f"{tuple(vectors['sid_vectors'].shape)}")
    head = SidCodeHead((tuples.max(dim=0).values + 1).tolist(), dim, temperature=temperature)
    weights = {k[len(SID_HEAD_PREFIX):]: v for k, v in dense.items() if k.startswith(SID_HEAD_PREFIX)}
    try:
        head.load_state_dict(weights)
    except RuntimeError as e:
        raise ArtifactError(f"export: the codes head's weights do not fit its SIDs ({str(e).splitlines()[0][:160]})")
    return CodeSidBeam(head.eval(), tuples)


def _settings(raw: Dict[str, Any]) -> DecoderSettings:
    unknown: List[str] = sorted(set(raw) - {f.name for f in dataclasses.fields(DecoderSettings)})
    if unknown:
        raise ArtifactError(f"export manifest: unknown COBRA decoder setting {unknown[0]!r}")
    return DecoderSettings(**raw)


def _check(vectors: Dict[str, Tensor], type_emb: Tensor, section: Dict[str, Any], encoder_max_len: int) -> None:
    """One-line ArtifactError unless the COBRA tensors and settings fit together."""
    items, sids, sid_of_item = vectors["item_vectors"], vectors["sid_vectors"], vectors["sid_of_item"]
    real = sid_of_item[1:]
    if (sid_of_item.shape != (items.shape[0],) or real.numel() == 0 or int(real.min()) < 0
            or int(real.max()) >= sids.shape[0]):
        raise ArtifactError(f"export: sid_of_item {tuple(sid_of_item.shape)} does not fit item_vectors "
                            f"{tuple(items.shape)} and sid_vectors {tuple(sids.shape)}")
    if type_emb.shape != (2, items.shape[1]):
        raise ArtifactError(f"export: {TYPE_EMB_KEY} has shape {tuple(type_emb.shape)}, "
                            f"expected (2, {items.shape[1]})")
    if section.get("query_time") not in ("target", "own"):
        raise ArtifactError(f"export manifest: COBRA query_time {section.get('query_time')!r} is not target or own")
    if not 1 <= int(section.get("max_len", 0)) <= (encoder_max_len - 1) // 2:
        raise ArtifactError(f"export manifest: COBRA max_len {section.get('max_len')!r} does not fit the "
                            f"encoder's {encoder_max_len} tokens")


def load_cobra(manifest: Dict[str, Any], encoder: HSTUEncoder, dense: Dict[str, Tensor], vectors: Dict[str, Tensor],
               index: VidIndex, filter_history: bool) -> CobraRetriever:
    """The COBRA decoder of an export from its verified files (``dense``, ``vectors``: safetensors contents)."""
    section = manifest.get("cobra")
    missing = [name for name, present in (("manifest section cobra", isinstance(section, dict)),
                                          ("sid_vectors", "sid_vectors" in vectors),
                                          ("sid_of_item", "sid_of_item" in vectors),
                                          (TYPE_EMB_KEY, TYPE_EMB_KEY in dense)) if not present]
    if missing:
        raise ArtifactError(f"this COBRA export lacks {missing[0]} (written before COBRA retrieval); "
                            "run `sidvid-rec export` again")
    _check(vectors, dense[TYPE_EMB_KEY], section, encoder.max_len)
    model = ExportedCobra(encoder, dense[TYPE_EMB_KEY], vectors["item_vectors"], vectors["sid_vectors"],
                          vectors["sid_of_item"].long(), temperature=float(section["temperature"]),
                          query_time=section["query_time"], max_len=int(section["max_len"]))
    settings = _settings(section.get("decoder_settings", {}))
    head = section.get("sid_head", "whole")
    if head not in ("whole", "codes"):
        raise ArtifactError(f"export manifest: COBRA sid_head {head!r} is not whole or codes")
    sid_beam = load_code_head(dense, vectors, encoder.dim, model.temperature) if head == "codes" else None
    context = DecodeContext(model, vectors["sid_vectors"], index, settings, filter_history, sid_beam)
    return CobraRetriever(context, section.get("decoder", "direct"))
