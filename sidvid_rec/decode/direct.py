"""``direct``: top-1 SID from the state after the history, appended; its VID query; ANN top-K.

Only the history's items are filtered from the final list (the predicted SID is not used as
a filter, so the target is never masked by a wrong SID).
"""

from typing import TYPE_CHECKING

from sidvid_rec.decode.base import DecodeContext, DecodeState, TopK, as_topk, retrieve

if TYPE_CHECKING:  # torchrec-free at run time: an export decodes without the training stack
    from sidvid_rec.data.batches import SequenceBatch


def decode_direct(ctx: DecodeContext, batch: "SequenceBatch", k: int) -> TopK:
    """``k`` items per example of ``batch`` (``TopK.items [B, k]``)."""
    state = DecodeState(ctx, batch)
    best = state.best_sid()  # [B]: whole-SID argmax or the code beam's top-1
    queries = state.vid_queries(ctx.sid_table[best].unsqueeze(1))[:, 0]  # [B, D]
    return as_topk(retrieve(ctx, batch, queries, k))
