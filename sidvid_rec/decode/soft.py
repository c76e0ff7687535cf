"""``soft``: the top-k SIDs (default 5) mixed into one appended embedding
``sum_j w_j sid_vec_j`` with ``w = softmax(cosine_j / tau)`` (default tau 0.5): the SID is
treated as a distribution rather than a hard token."""

from typing import TYPE_CHECKING

import torch

from sidvid_rec.decode.base import DecodeContext, DecodeState, TopK, as_topk, cosine_from_logits, retrieve, top_sids

if TYPE_CHECKING:  # torchrec-free at run time: an export decodes without the training stack
    from sidvid_rec.data.batches import SequenceBatch


def soft_sid_embedding(ctx: DecodeContext, logits: torch.Tensor) -> torch.Tensor:
    """``logits [B, S]`` -> weighted SID embedding ``[B, D]``."""
    values, sids = top_sids(logits, ctx.settings.soft_k)  # [B, k]
    cosine = cosine_from_logits(values, ctx.model.temperature)
    weights = torch.softmax(cosine / ctx.settings.soft_tau, dim=1)  # [B, k]
    return (weights.unsqueeze(2) * ctx.sid_table[sids]).sum(dim=1)  # [B, D]


def decode_soft(ctx: DecodeContext, batch: "SequenceBatch", k: int) -> TopK:
    state = DecodeState(ctx, batch)
    queries = state.vid_queries(soft_sid_embedding(ctx, state.sid_logits()).unsqueeze(1))[:, 0]
    return as_topk(retrieve(ctx, batch, queries, k))
