"""``neighbor``: like ``direct``, but the predicted SID is replaced by its nearest other valid
SID (cosine between SID vectors, itself excluded) before the VID query: robustness to a
biased cluster centre or an unstable top-1."""

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor

from sidvid_rec.decode.base import DecodeContext, DecodeState, TopK, as_topk, retrieve

if TYPE_CHECKING:  # torchrec-free at run time: an export decodes without the training stack
    from sidvid_rec.data.batches import SequenceBatch


def nearest_other_sid(sid_table: Tensor, sids: Tensor) -> Tensor:
    """``[B]`` index of the valid SID closest to each of ``sids [B]`` (never itself).

    With a single valid SID there is no other one: it is returned unchanged.
    """
    if sid_table.shape[0] < 2:
        return sids
    keys = F.normalize(sid_table, dim=-1)  # [S, D]
    sims = keys[sids] @ keys.T  # [B, S]
    sims.scatter_(1, sids.unsqueeze(1), float("-inf"))
    return sims.argmax(dim=1)


def decode_neighbor(ctx: DecodeContext, batch: "SequenceBatch", k: int) -> TopK:
    state = DecodeState(ctx, batch)
    best = state.best_sid()  # [B]: whole-SID argmax or the code beam's top-1
    neighbor = nearest_other_sid(ctx.sid_table, best)
    queries = state.vid_queries(ctx.sid_table[neighbor].unsqueeze(1))[:, 0]
    return as_topk(retrieve(ctx, batch, queries, k))
