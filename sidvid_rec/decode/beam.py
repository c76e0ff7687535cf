"""``beam``: top-k SIDs x ANN top-n items each, ranked by a fused SID/VID score.

For each example: the ``beam_size`` best valid SIDs (SID logits ``s_j`` = cosine / temperature,
``log p_sid(j)`` = log-softmax over *all* valid SIDs; with ``model.cobra_sid_head=codes`` the
codes head's trie-constrained beam, ``s_j = log p_sid(j)`` its sequence log-probability); for each SID ``j`` its VID query and
the ANN top ``n = max(beam_ann, K)`` items (history removed), VID logits ``v_ji`` = cosine /
temperature, ``log p_vid(i | j)`` = log-softmax over SID ``j``'s ``n`` candidates (the model's
``P(item | history, SID j)``, its normaliser approximated by the retrieved items).
Fusion of candidate (j, i):

* ``prod``: ``p_sid(j)^alpha * p_vid(i | j)^(1 - alpha)`` (computed in log space); with
  ``alpha = 0.5`` this ranks by the joint ``P(SID j, item i | history)``, so a beam over all
  valid SIDs decodes the model's full generative likelihood;
* ``sum``: ``alpha p_sid(j) + (1 - alpha) p_vid(i | j)``;
* ``softmax``: ``softmax_j(alpha s_j) * softmax_i(beta v_ji)`` (alpha, beta as inverse
  temperatures on the model's logits; the second softmax within SID ``j``'s candidates).

An item reached from several SIDs keeps its best fused score; ties are broken by the VID
logit, so with ``alpha = 1`` the list is ordered by SID score alone (then by VID score inside
one SID's items).
"""

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sidvid_rec.decode.base import DecodeContext, DecodeState, TopK, first_occurrence, retrieve_beams
from sidvid_rec.types import MISSING_ID, BeamFuse

if TYPE_CHECKING:  # torchrec-free at run time: an export decodes without the training stack
    from sidvid_rec.data.batches import SequenceBatch


def fuse_scores(fuse: BeamFuse, sid_logits_all: Tensor, beam_sids: Tensor, vid_logits: Tensor,
                alpha: float, beta: float) -> Tensor:
    """Fused scores ``[B, k, n]``.

    Args:
        sid_logits_all: ``[B, S]`` logits of every valid SID.
        beam_sids: ``[B, k]`` the beams' SID indices.
        vid_logits: ``[B, k, n]`` VID logits of each beam's candidates (``-inf`` = missing).
    """
    beam_logits = sid_logits_all.gather(1, beam_sids)  # [B, k]
    log_p_sid = torch.log_softmax(sid_logits_all, dim=1).gather(1, beam_sids)  # [B, k]
    return fuse_beam_scores(fuse, beam_logits, log_p_sid, vid_logits, alpha, beta)


def fuse_beam_scores(fuse: BeamFuse, beam_logits: Tensor, log_p_sid: Tensor, vid_logits: Tensor,
                     alpha: float, beta: float) -> Tensor:
    """Fused scores ``[B, k, n]`` from the beams' SID scores ``beam_logits [B, k]`` (the
    ``softmax`` fusion's ``s_j``) and ``log_p_sid [B, k]`` (``prod``/``sum``), and ``vid_logits [B, k, n]``."""
    log_p_vid = torch.log_softmax(vid_logits, dim=2)  # [B, k, n], per SID
    if fuse == "prod":
        return alpha * log_p_sid.unsqueeze(2) + (1.0 - alpha) * log_p_vid
    if fuse == "sum":
        return alpha * log_p_sid.exp().unsqueeze(2) + (1.0 - alpha) * log_p_vid.exp()
    if fuse == "softmax":
        beam_part = torch.log_softmax(alpha * beam_logits, dim=1).unsqueeze(2)  # [B, k, 1]
        ann_part = torch.log_softmax(beta * vid_logits, dim=2)
        return beam_part + ann_part
    raise ValueError(f"unknown beam fusion {fuse!r}; choose prod, sum or softmax")


def rank_candidates(items: Tensor, fused: Tensor, tie_break: Tensor, k: int) -> "TopK":
    """Best ``k`` distinct items of candidates ``items [B, M]`` by ``fused`` then ``tie_break``."""
    valid = items != MISSING_ID
    fused = fused.masked_fill(~valid, float("-inf"))
    # Lexicographic order (fused desc, tie_break desc): two stable sorts, secondary key first.
    order = torch.argsort(tie_break.masked_fill(~valid, float("-inf")), dim=1, descending=True, stable=True)
    order = order.gather(1, torch.argsort(fused.gather(1, order), dim=1, descending=True, stable=True))
    ranked_items, ranked_scores = items.gather(1, order), fused.gather(1, order)
    keep = first_occurrence(ranked_items) & (ranked_items != MISSING_ID)  # best copy of each item
    pick = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]
    kept = keep.gather(1, pick)
    return TopK(ranked_items.gather(1, pick).masked_fill(~kept, MISSING_ID),
                ranked_scores.gather(1, pick).masked_fill(~kept, float("-inf")))


def decode_beam(ctx: DecodeContext, batch: "SequenceBatch", k: int) -> TopK:
    s = ctx.settings
    state = DecodeState(ctx, batch)
    beam_logits, log_p_sid, beam_sids = state.top_sids(s.beam_size)  # [B, k_b] each
    per_beam = max(s.beam_ann, k)
    queries = state.vid_queries(ctx.sid_table[beam_sids])  # [B, k_b, D]: one cached step for all beams
    items_t, scores = retrieve_beams(ctx, batch, queries, per_beam)  # [B, k_b, n]: one search for all beams
    vid_t = scores / ctx.model.temperature  # [B, k_b, n]
    fused = fuse_beam_scores(s.beam_fuse, beam_logits, log_p_sid, vid_t, s.alpha, s.beta)
    batch_size = items_t.shape[0]
    return rank_candidates(items_t.reshape(batch_size, -1), fused.reshape(batch_size, -1),
                           vid_t.reshape(batch_size, -1), k)
