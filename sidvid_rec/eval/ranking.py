"""Full ranking over all items for models that score items by inner product.

For each example the model's query vector ``[B, D]`` is scored against every item vector
``[N + 1, D]``; the padding item and (by default) the items of the example's history are
removed from the ranking; the target's rank feeds :class:`RankMetrics`.
"""

from typing import Dict, Iterable, Protocol

import torch

from sidvid_rec.data.batches import SequenceBatch, prefetch_to_device
from sidvid_rec.eval.metrics import RankMetrics, target_ranks


class RankingModel(Protocol):
    def query(self, batch: SequenceBatch) -> torch.Tensor:
        """``[B, D]`` query vector per example."""

    def item_vectors(self) -> torch.Tensor:
        """``[N + 1, D]`` candidate vectors (row 0 = padding)."""


def mask_history(scores: torch.Tensor, batch: SequenceBatch) -> None:
    """Sets the scores of each example's history items to -inf, in place. ``scores [B, N+1]``."""
    history = batch.jagged("item_id")
    rows = torch.repeat_interleave(torch.arange(scores.size(0), device=scores.device), history.lengths().long())
    scores[rows, history.values()] = float("-inf")


@torch.no_grad()
def evaluate_ranking(model: RankingModel, batches: Iterable[SequenceBatch], ks, filter_history: bool,
                     device: torch.device) -> RankMetrics:
    """Accumulates rank metrics of ``model`` over ``batches`` (this process's share)."""
    metrics = RankMetrics(ks)
    items = model.item_vectors()  # [N + 1, D]
    for batch in prefetch_to_device(batches, device):  # pinned, non-blocking copies on CUDA
        scores = model.query(batch) @ items.T  # [B, N + 1]
        scores[:, 0] = float("-inf")
        if filter_history:
            mask_history(scores, batch)
        ranks = target_ranks(scores, batch.jagged("target_id").values())
        metrics.update(ranks, batch.weights)
    return metrics


def summarize(metrics: RankMetrics) -> Dict[str, float]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.compute().items()}
