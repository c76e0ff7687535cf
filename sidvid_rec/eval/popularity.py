"""The most-popular baseline: every user gets the items the training split holds most often.

A reference point for any model's figures, measured by the same full-ranking evaluation
(:func:`~sidvid_rec.eval.ranking.evaluate_ranking`: padding and history items removed, ties
against the target). A model that does not clearly beat it has learned little from the order
of the histories.
"""

from typing import Dict

import torch
from torch import Tensor, nn

from sidvid_rec.data import SequenceData, make_split, training_item_counts
from sidvid_rec.data.batches import BatchIterator, SequenceBatch
from sidvid_rec.eval.ranking import evaluate_ranking, summarize


class MostPopular(nn.Module):
    """A :class:`~sidvid_rec.eval.ranking.RankingModel` whose score of item i is its training count.

    Args:
        counts: ``[N + 1]`` training interactions per item (row 0 = padding).
    """

    def __init__(self, counts: Tensor) -> None:
        super().__init__()
        self.register_buffer("counts", counts.to(torch.float32), persistent=False)

    def query(self, batch: SequenceBatch) -> Tensor:
        """``[B, 1]`` ones: the score of every item is its count, whatever the history."""
        return torch.ones(batch.jagged("target_id").values().numel(), 1)

    def item_vectors(self) -> Tensor:
        """``[N + 1, 1]``: each item's training count."""
        return self.counts[:, None]


def evaluate_most_popular(data: SequenceData, split: str, protocol: str, max_len: int, ks,
                          filter_history: bool = True, batch_size: int = 1024) -> Dict[str, float]:
    """Full-ranking metrics of :class:`MostPopular` on ``split`` (one process, CPU)."""
    model = MostPopular(torch.as_tensor(training_item_counts(data, protocol)))
    batches = BatchIterator(make_split(data, split, protocol, max_len), batch_size, shuffle=False)
    return summarize(evaluate_ranking(model, batches, ks, filter_history, torch.device("cpu")))
