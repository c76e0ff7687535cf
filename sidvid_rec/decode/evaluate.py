"""Rank metrics of a COBRA decoder: the target's position in the decoder's top-K list.

With a list of ``K = max(ks)`` items the rank of the target is its 1-based position in the
list, or infinity when it is absent (a miss counts 0 in HR@k, NDCG@k and MRR), so HR@k and
NDCG@k match full ranking for every k <= K and MRR is truncated at K.
"""

from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from torch import Tensor

from sidvid_rec.decode import DecodeContext, DecoderKind, decode
from sidvid_rec.eval.metrics import RankMetrics

if TYPE_CHECKING:  # torchrec-free at run time: an export decodes without the training stack
    from sidvid_rec.data.batches import SequenceBatch


def list_ranks(items: Tensor, targets: Tensor) -> Tensor:
    """``items [B, K]``, ``targets [B]`` -> float ``[B]`` 1-based position, ``inf`` if absent."""
    hit = items == targets.unsqueeze(1)  # [B, K]
    position = hit.to(torch.int8).argmax(dim=1).to(torch.float64) + 1.0
    return torch.where(hit.any(dim=1), position, torch.full_like(position, float("inf")))


@torch.no_grad()
def evaluate_decoder(kind: DecoderKind, ctx: DecodeContext, batches: Iterable["SequenceBatch"], ks: Sequence[int],
                     device: torch.device) -> RankMetrics:
    """Accumulates rank metrics of decoder ``kind`` over ``batches`` (this process's share)."""
    metrics = RankMetrics(ks)
    k = max(ks)
    for batch in batches:
        batch = batch.to(device)
        top = decode(kind, ctx, batch, k)
        metrics.update(list_ranks(top.items, batch.jagged("target_id").values()), batch.weights)
    return metrics
