"""COBRA (Baidu, "Sparse Meets Dense", 2025): interleaved SID/VID generation on a jagged HSTU.

Each history item (step) contributes two tokens: a SID token (its prefixN SID vector) and a
VID token (its item-ID vector, plus a projection of its text embedding with
``text_projection``), each plus a type embedding (SID=0, VID=1); see
:mod:`sidvid_rec.modules.interleave` for the layout, cloned timestamps and positions.

Training step (S = steps of the batch, B = sequences, T2 = 2 S - B tokens)::

    steps = inputs + each sequence's last target            items [S], times [S], offsets [B+1]
    x [T2, D] = interleave(sid_vec, vid_vec) + type_emb --HSTUEncoder--> h [T2, D]
    L_sid: h at VID_t vs SID-space vectors of step t+1 (sampled softmax, R global negatives,
           collisions = same SID -> -5e4)
    L_vid: h at SID_t vs VID-space vector of step t (InfoNCE; pool: in-batch entries without
           dedup, SID entries masked by is_sid; + global negatives or a memory queue)
    L = L_sid + vid_weight * L_vid                           (one backward)

With ``model.cobra_sid_head=codes`` L_sid is instead the per-level cross-entropy of ``L``
next-code softmaxes (:class:`~sidvid_rec.modules.code_head.SidCodeHead`: level ``l`` from the
state and the target's codes of levels < l), ``L x K`` per position whatever the catalogue
size; decoders take their SIDs from a trie-constrained beam over codes
(:mod:`sidvid_rec.decode.code_sids`). The tokens and the VID side are unchanged.

SIDs are scored as whole tuples against the valid SIDs (the distinct code tuples of the
item set), so a decoder can never produce an invalid SID; a SID's vector is the prefixN sum
of any of its items (identical for all of them). With ``model.sid_dedup`` the tuples end with
the disambiguation code, so every item has a SID of its own and the VID refines the ranking
around it rather than telling apart the items of a shared SID.

Inference (:meth:`CobraRecommender.prepare`): the history's tokens plus one appended SID
token (the next step, at the target's time). Its output is the VID query; the output at the
last VID token is the state that predicts the next SID (causal: it does not see the
appended token).
"""

import math
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sidvid_rec.data.batches import SequenceBatch
from sidvid_rec.losses import CandidatePool, InfoNCELoss, LossOutput, SampledSoftmaxLoss, code_head_loss
from sidvid_rec.modules.code_head import SidCodeHead
from sidvid_rec.modules.embeddings import INIT_STD, ItemEmbeddings
from sidvid_rec.modules.hstu import HSTUEncoder
from sidvid_rec.semantic_ids.codebook import sid_catalog
from sidvid_rec.types import CobraSidHead, QueryTime
from sidvid_rec.modules.interleave import (CobraCache, DecodeInputs, TokenLayout, append_step, encode_history_cached,
                                           encode_tokens, interleave_layout, next_sid_states, sid_logits, supervision,
                                           vid_queries, vid_queries_cached)

PLACEHOLDER_ITEM = 0
"""Item id of the appended (to be generated) step at inference; its SID vector is replaced."""


class CobraStepOutput(NamedTuple):
    loss: Tensor
    """Scalar ``L_sid + vid_weight * L_vid``."""
    num_positions: int
    """Supervised SID positions."""
    sid_loss: Tensor
    """Detached ``L_sid``."""
    vid_loss: Tensor
    """Detached ``L_vid``."""


class CobraRecommender(nn.Module):
    """Interleaved SID/VID HSTU with the dual loss and the pieces the decoders need.

    Args:
        embeddings: TorchRec tables in mode ``cobra`` (item-ID and SID-prefix, kept apart).
        encoder: jagged HSTU whose ``max_len`` covers ``2 * data.max_len + 1`` tokens.
        sid_loss: sampled softmax built over the *items* (negatives are drawn from items and
            mapped to their SIDs).
        vid_loss: InfoNCE with the configured negative pool.
        codes: ``[N + 1, L]`` semantic-ID codes (row 0 = padding).
        vid_weight: lambda of ``L_sid + lambda * L_vid``.
        temperature: of the SID logits at inference (the losses carry their own).
        query_time: time of each token's query in the time bias (see ``interleave_layout``).
        text_embeddings: optional ``[N + 1, E]`` item text embeddings; a learned projection
            ``E -> D`` of them is added to every VID token (and VID target).
        sid_full_softmax: score SID positions against every valid SID (exact softmax) instead
            of ``sid_loss``'s sampled negatives.
        sid_logq: with sampled SID negatives, correct each negative SID's logit by the log of
            its over-representation among the draws (``items with that SID / mean items per SID``).
        sid_dropout: in training, zero this share of the steps' SID token vectors (the type
            embedding and position stay), so the VID query also learns from the history alone.
        sid_head: ``whole`` (the SID softmax above) or ``codes``: a
            :class:`~sidvid_rec.modules.code_head.SidCodeHead` (``L`` next-code softmaxes,
            per-level cross-entropy; ``sid_full_softmax``/``sid_logq`` then do not apply).
    """

    def __init__(self, embeddings: ItemEmbeddings, encoder: HSTUEncoder, sid_loss: SampledSoftmaxLoss,
                 vid_loss: InfoNCELoss, codes: np.ndarray, vid_weight: float = 1.0, temperature: float = 0.05,
                 query_time: QueryTime = "target", text_embeddings: Optional[Tensor] = None,
                 sid_full_softmax: bool = False, sid_logq: bool = False, sid_dropout: float = 0.0,
                 sid_head: CobraSidHead = "whole") -> None:
        super().__init__()
        if embeddings.mode != "cobra":
            raise ValueError(f"CobraRecommender needs embeddings in mode 'cobra', got {embeddings.mode!r}")
        self.embeddings = embeddings
        self.encoder = encoder
        self.sid_loss = sid_loss
        self.vid_loss = vid_loss
        self.vid_weight = vid_weight
        self.temperature = temperature
        self.query_time: QueryTime = query_time
        dim = embeddings.dim
        self.type_emb = nn.Embedding(2, dim)
        nn.init.trunc_normal_(self.type_emb.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
        catalog = sid_catalog(codes)
        self.register_buffer("sid_of_item", catalog.sid_of_item, persistent=False)
        self.register_buffer("sid_items", catalog.sid_items, persistent=False)
        self.sid_full_softmax = sid_full_softmax
        self.sid_logq = sid_logq
        if not 0.0 <= sid_dropout < 1.0:
            raise ValueError(f"sid_dropout must lie in [0, 1), got {sid_dropout}")
        self.sid_dropout = sid_dropout
        # log(share of the items carrying each SID): uniform item negatives hit SID s that often.
        sid_sizes = torch.bincount(catalog.sid_of_item[1:], minlength=catalog.sid_items.numel()).float()
        self.register_buffer("sid_log_share", (sid_sizes / sid_sizes.sum()).log(), persistent=False)
        self.text_proj: Optional[nn.Linear] = None
        if text_embeddings is not None:
            self.register_buffer("text_embeddings", text_embeddings.float(), persistent=False)
            self.text_proj = nn.Linear(text_embeddings.shape[1], dim, bias=False)
            nn.init.normal_(self.text_proj.weight, std=INIT_STD)
        if sid_head not in ("whole", "codes"):
            raise ValueError(f"sid_head must be 'whole' or 'codes', got {sid_head!r}")
        self.sid_head: Optional[SidCodeHead] = None
        if sid_head == "codes":
            tuples = torch.as_tensor(np.asarray(codes), dtype=torch.int64)[catalog.sid_items]  # [S, L]
            self.register_buffer("sid_tuples", tuples, persistent=False)
            sizes = (tuples.max(dim=0).values + 1).tolist()
            self.sid_head = SidCodeHead(sizes, dim, temperature=temperature)

    @property
    def num_items(self) -> int:
        return self.embeddings.num_items

    @property
    def num_sids(self) -> int:
        return int(self.sid_items.numel())

    # -- item vectors

    def vid_vectors(self, item_ids: Tensor, id_vec: Optional[Tensor] = None) -> Tensor:
        """VID vector (ID row + text projection) of ``item_ids [K]``: ``[K, D]``, unnormalised."""
        if id_vec is None:
            id_vec = self.embeddings.vectors(item_ids).id_vec
        if self.text_proj is None:
            return id_vec
        return id_vec + self.text_proj(self.text_embeddings[item_ids])

    def sid_vectors_of(self, sid_index: Tensor) -> Tensor:
        """SID vector (prefixN sum) of valid-SID indices ``[K]``: ``[K, D]``."""
        return self.embeddings.vectors(self.sid_items[sid_index]).sid_vec

    @torch.no_grad()
    def decoding_tables(self) -> Tuple[Tensor, Tensor]:
        """``(sid_table [S, D], vid_table [N + 1, D])``: raw SID vectors of the valid SIDs (what
        a decoder appends) and L2-normalised VID vectors of every item (what FAISS indexes).
        Collective under sharding: every rank must call it."""
        everything = self.embeddings.all_vectors()
        ids = torch.arange(self.num_items + 1, device=everything.id_vec.device)
        vid = F.normalize(self.vid_vectors(ids, everything.id_vec), dim=-1)
        return everything.sid_vec[self.sid_items], vid

    @torch.no_grad()
    def export_vectors(self) -> Dict[str, Tensor]:
        """What an export holds: ``inputs [N+1, D]`` (VID vectors, a history item's VID token),
        ``candidates [N+1, D]`` (L2-normalised VID vectors: what FAISS indexes),
        ``sid_vectors [S, D]`` (one per valid SID: what a decoder appends, a history item's SID
        token) and ``sid_of_item [N+1]`` (each item's SID index, -1 for padding); with the codes
        head also ``sid_tuples [S, L]`` (each valid SID's codes)."""
        sid_table, candidates = self.decoding_tables()
        inputs = self.vid_vectors(torch.arange(self.num_items + 1))
        out = {"inputs": inputs.contiguous(), "candidates": candidates.contiguous(),
               "sid_vectors": sid_table.contiguous(), "sid_of_item": self.sid_of_item.contiguous()}
        if self.sid_head is not None:  # the codes head's trie: each valid SID's codes
            out["sid_tuples"] = self.sid_tuples.contiguous()
        return out

    def sid_logits(self, states: Tensor, sid_table: Tensor) -> Tensor:
        """``states [B, D]`` x ``sid_table [S, D]`` -> cosine / temperature ``[B, S]``."""
        return sid_logits(states, sid_table, self.temperature)

    # -- encoding

    def _encode(self, layout: TokenLayout, sid_tokens: Tensor, vid_tokens: Tensor) -> Tensor:
        """Interleaved token inputs of the steps -> HSTU outputs ``[T2, D]`` (L2-normalised)."""
        return encode_tokens(self.encoder, self.type_emb.weight, layout, sid_tokens, vid_tokens)

    def _steps(self, batch: SequenceBatch, next_items: Tensor, next_times: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Each sequence's input steps plus one appended step: ``(items [S+B], times [S+B], offsets [B+1])``."""
        items, times = batch.jagged("item_id"), batch.jagged("timestamp")
        step_items, offsets = append_step(items.values(), items.offsets().long(), next_items)
        step_times, _ = append_step(times.values(), items.offsets().long(), next_times)
        return step_items, step_times, offsets

    def forward(self, batch: SequenceBatch, generator: Optional[torch.Generator] = None) -> CobraStepOutput:
        """Teacher-forced ``L_sid + vid_weight * L_vid`` of a training batch."""
        if not batch.next_item_targets:
            raise ValueError("CobraRecommender.forward needs a training batch (a target per position)")
        targets, target_times = batch.jagged("target_id"), batch.jagged("target_timestamp")
        last = targets.offsets()[1:] - 1  # each sequence's final target = the step after its inputs
        items, times, offsets = self._steps(batch, targets.values()[last], target_times.values()[last])
        layout = interleave_layout(offsets, times, drop_last_vid=True, query_time=self.query_time)
        vectors = self.embeddings.vectors(items)
        vid_vec = self.vid_vectors(items, vectors.id_vec)  # [S, D]
        sid_tokens = vectors.sid_vec
        if self.training and self.sid_dropout > 0:
            # Drawn where the (seeded) generator lives: the trainer's is on the CPU, the steps may be on CUDA.
            draws = torch.rand(items.shape, generator=generator, device=generator.device if generator else items.device)
            keep = draws.to(items.device) >= self.sid_dropout
            sid_tokens = sid_tokens * keep.unsqueeze(1).to(sid_tokens.dtype)
        h = self._encode(layout, sid_tokens, vid_vec)  # [T2, D]
        sup = supervision(layout, items)
        sid_out = self._sid_loss(h[sup.sid_rows], sup.sid_targets, generator)
        # In-batch pool: every step's own (id, vector) pair, VID and SID entries (the latter
        # masked by is_sid inside the loss), no dedup.
        no, yes = torch.zeros_like(items, dtype=torch.bool), torch.ones_like(items, dtype=torch.bool)
        pool = CandidatePool.cat([CandidatePool(items, vid_vec, no), CandidatePool(items, vectors.sid_vec, yes)])
        vid_steps = layout.source[sup.vid_rows]
        vid_out = self.vid_loss(h[sup.vid_rows], sup.vid_targets, vid_vec[vid_steps], pool,
                                item_vectors_fn=self.vid_vectors, generator=generator)
        loss = sid_out.loss + self.vid_weight * vid_out.loss
        return CobraStepOutput(loss, sid_out.num_positions, sid_out.loss.detach(), vid_out.loss.detach())

    def sid_codes_loss(self, query: Tensor, codes: Tensor) -> LossOutput:
        """The codes head's ``-log p(SID)`` of target SIDs ``codes [P, L]`` given ``query [P, D]``."""
        head = self.sid_head
        assert head is not None, "model.cobra_sid_head=codes only"
        return code_head_loss(head.teacher_forced(query, codes), codes, head.heads, head.level_offsets,
                              head.temperature)

    def _sid_loss(self, query: Tensor, target_items: Tensor, generator: Optional[torch.Generator]) -> LossOutput:
        """Softmax in SID space of ``query [P, D]`` for the SIDs of ``target_items [P]``: exact
        over the valid SIDs, or sampled (items' negatives mapped to SIDs, collisions by SID)."""
        target_sids = self.sid_of_item[target_items]
        if self.sid_head is not None:  # L next-code softmaxes, teacher-forced on the target's codes
            return self.sid_codes_loss(query, self.sid_tuples[target_sids])
        if self.sid_full_softmax:
            if target_sids.numel() == 0:
                return self.sid_loss(query, target_sids, self.sid_vectors_of)  # the zero loss
            all_sids = torch.arange(self.num_sids, device=query.device)
            logits = self.sid_logits(query, self.sid_vectors_of(all_sids))  # [P, S]
            return LossOutput(F.cross_entropy(logits, target_sids), target_sids.numel())
        negatives = self.sid_of_item[self.sid_loss.sample_negatives(target_items.numel(), generator,
                                                                    target_items.device)]
        log_counts = None
        if self.sid_logq:
            # Relative to uniform draws over the SIDs (log(size / mean size)): the size bias goes,
            # the R negatives keep their total weight.
            log_counts = self.sid_log_share[negatives] + math.log(self.num_sids)
        return self.sid_loss(query, target_sids, self.sid_vectors_of, generator=generator, negative_ids=negatives,
                             negative_log_counts=log_counts)

    # -- inference

    def prepare(self, batch: SequenceBatch) -> DecodeInputs:
        """History tokens plus a placeholder step at the target's time (evaluation batches)."""
        target_times = batch.jagged("target_timestamp").values()  # [B] (one target per sequence)
        placeholders = torch.full_like(target_times, PLACEHOLDER_ITEM)
        items, times, offsets = self._steps(batch, placeholders, target_times)
        layout = interleave_layout(offsets, times, drop_last_vid=True, query_time=self.query_time)
        vectors = self.embeddings.vectors(items)
        vid_vec = self.vid_vectors(items, vectors.id_vec)
        return DecodeInputs(layout, vectors.sid_vec, vid_vec, offsets[1:] - 1)

    def next_sid_states(self, inputs: DecodeInputs) -> Tensor:
        """``[B, D]`` output at each history's last VID token (predicts the next SID)."""
        return next_sid_states(self.encoder, self.type_emb.weight, inputs)

    def vid_queries(self, inputs: DecodeInputs, next_sid: Tensor) -> Tensor:
        """``[B, D]`` VID queries: outputs at the appended SID token carrying ``next_sid [B, D]``."""
        return vid_queries(self.encoder, self.type_emb.weight, inputs, next_sid)

    def encode_history(self, inputs: DecodeInputs) -> CobraCache:
        """The history encoded once (KV cache) and its next-SID states (:func:`encode_history_cached`)."""
        return encode_history_cached(self.encoder, self.type_emb.weight, inputs)

    def vid_queries_cached(self, encoded: CobraCache, next_sids: Tensor) -> Tensor:
        """``[B, W, D]`` VID queries of ``W`` candidate SID vectors per history, from the cache."""
        return vid_queries_cached(self.encoder, self.type_emb.weight, encoded, next_sids)
