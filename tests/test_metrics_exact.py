"""RankMetrics / target_ranks / evaluate_ranking against values computed by hand.

Conventions under test (sidvid_rec/eval/metrics.py, ranking.py):

* the rank of the target is 1 + the number of *other* items scoring >= the target's score
  (a tie counts against the target);
* HR@K = 1[rank <= K], NDCG@K = 1[rank <= K] / log2(rank + 1) (K > 1 only), MRR = 1 / rank;
* examples of weight 0 (fillers) count nowhere; an infinite rank is a miss;
* full ranking sets the padding item (column 0) and the example's history to -inf, so those
  items never rank ahead of a finite target; a target inside the history ranks last.
"""

import math

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from sidvid_rec.data.batches import FEATURE_KEYS, SequenceBatch
from sidvid_rec.eval.metrics import RankMetrics, target_ranks
from sidvid_rec.eval.ranking import evaluate_ranking, mask_history


def test_target_ranks_without_ties():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3],
                           [4.0, 3.0, 2.0, 1.0],
                           [4.0, 3.0, 2.0, 1.0]])
    # row 0: only 0.9 beats 0.5 -> rank 2; row 1: target is the best -> 1; row 2: the worst -> 4
    assert target_ranks(scores, torch.tensor([2, 0, 3])).tolist() == [2, 1, 4]


def test_ties_count_against_the_target():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.1],   # target 0 ties with two others -> rank 3
                           [0.5, 0.5, 0.5, 0.1],   # target 2: same three-way tie -> rank 3
                           [1.0, 1.0, 0.2, 0.0],   # a tie for the top -> rank 2, not 1
                           [0.3, 0.7, 0.7, 0.7]])  # target 0 below a three-way tie -> rank 4
    assert target_ranks(scores, torch.tensor([0, 2, 1, 0])).tolist() == [3, 3, 2, 4]
    # every target with the same score gets the same (worst) rank: no order-dependent tie-breaking
    all_equal = torch.zeros(1, 6)
    assert [int(target_ranks(all_equal, torch.tensor([t]))) for t in range(6)] == [6] * 6


def test_nan_scores_never_help_the_target():
    """A NaN target (a diverged model) ranks last; NaN competitors rank ahead (pessimistic)."""
    scores = torch.tensor([[0.2, float("nan"), 0.9, 0.1],
                           [float("nan")] * 4,
                           [0.2, float("nan"), 0.9, 0.1]])
    assert target_ranks(scores, torch.tensor([1, 2, 0])).tolist() == [4, 4, 3]
    m = RankMetrics([1, 10])
    m.update(target_ranks(scores[:2], torch.tensor([1, 2])), torch.ones(2))
    out = m.compute()
    assert math.isfinite(out["mrr"]) and out["mrr"] == pytest.approx(0.25) and out["hr@10"] == 1.0
    assert out["hr@1"] == 0.0


def test_rank_metrics_by_hand():
    m = RankMetrics([10, 1, 5, 5])  # unsorted, a duplicate: kept once each
    ranks = torch.tensor([1.0, 3.0, 12.0, float("inf"), 2.0])
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])  # the last example is a filler
    m.update(ranks, weights)
    out = m.compute()
    assert set(out) == {"hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr", "count"}  # no ndcg@1
    assert out["count"] == 4
    assert out["hr@1"] == pytest.approx(1 / 4)
    assert out["hr@5"] == pytest.approx(2 / 4) and out["hr@10"] == pytest.approx(2 / 4)
    # rank 1 -> 1/log2(2) = 1; rank 3 -> 1/log2(4) = 0.5; rank 12 and inf miss
    assert out["ndcg@5"] == pytest.approx((1 + 0.5) / 4) and out["ndcg@10"] == pytest.approx((1 + 0.5) / 4)
    assert out["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 12 + 0) / 4)


def test_rank_metrics_weights_and_state_sums():
    whole = RankMetrics([2, 3])
    whole.update(torch.tensor([2.0, 3.0, 7.0]), torch.tensor([2.0, 1.0, 1.0]))  # weight 2 = counted twice
    out = whole.compute()
    assert out["count"] == 4
    assert out["hr@2"] == pytest.approx(2 / 4) and out["hr@3"] == pytest.approx(3 / 4)
    assert out["ndcg@2"] == pytest.approx(2 / math.log2(3) / 4)
    assert out["ndcg@3"] == pytest.approx((2 / math.log2(3) + 1 / math.log2(4)) / 4)
    assert out["mrr"] == pytest.approx((2 / 2 + 1 / 3 + 1 / 7) / 4)
    # what the all_reduce of the states does: two shares summed give the single-process metrics
    a, b = RankMetrics([2, 3]), RankMetrics([2, 3])
    a.update(torch.tensor([2.0]), torch.tensor([2.0]))
    b.update(torch.tensor([3.0, 7.0]), torch.ones(2))
    merged = RankMetrics([2, 3])
    merged.load_state(a.state() + b.state())
    assert merged.compute() == pytest.approx(out)
    with pytest.raises(ValueError, match="no examples"):
        RankMetrics([1]).compute()


def _batch(histories, targets) -> SequenceBatch:
    lengths = [len(h) for h in histories]
    times = sum([list(range(1, n + 1)) for n in lengths], [])
    values = torch.tensor(sum(histories, []) + times + targets + [n + 1 for n in lengths])
    all_lengths = torch.tensor(lengths + lengths + [1] * len(targets) * 2, dtype=torch.int32)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=FEATURE_KEYS, values=values, lengths=all_lengths)
    return SequenceBatch(kjt, torch.arange(len(targets)), torch.ones(len(targets)), False)


class _FixedScores:
    """A ranking model whose scores are given: query = one-hot row, items = score columns."""

    def __init__(self, scores: torch.Tensor) -> None:
        self.scores = scores  # [B, N + 1]

    def query(self, batch):
        return torch.eye(self.scores.shape[0])[batch.user_index]  # [B, B]

    def item_vectors(self):
        return self.scores.T.contiguous()  # [N + 1, B]: query_b @ items.T = scores[b]


def test_padding_and_history_are_removed_from_the_ranking():
    # items 1..6 (column 0 = padding, scored highest to prove it is removed)
    scores = torch.tensor([[9.0, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],
                           [9.0, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],
                           [9.0, 0.8, 0.5, 0.6, 0.5, 0.4, 0.3]])
    histories = [[1, 2], [5], [3, 1]]
    targets = [4, 4, 2]
    batch = _batch(histories, targets)
    masked = scores.clone()
    masked[:, 0] = float("-inf")
    mask_history(masked, batch)
    assert torch.isinf(masked[0, [0, 1, 2]]).all() and torch.isinf(masked[2, [0, 1, 3]]).all()
    ranks = target_ranks(masked, torch.tensor(targets))
    # row 0: history 1, 2 gone, only item 3 (0.6) beats 0.5 -> 2; row 1: items 1, 2, 3 ahead -> 4;
    # row 2: items 1, 3 gone; item 4 ties with the target at 0.5 -> counts against it -> 2
    assert ranks.tolist() == [2, 4, 2]
    metrics = evaluate_ranking(_FixedScores(scores), [batch], [1, 2, 4], filter_history=True,
                               device=torch.device("cpu")).compute()
    assert metrics["hr@1"] == 0.0 and metrics["hr@2"] == pytest.approx(2 / 3) and metrics["hr@4"] == 1.0
    assert metrics["ndcg@2"] == pytest.approx((2 / math.log2(3)) / 3)
    assert metrics["ndcg@4"] == pytest.approx((2 / math.log2(3) + 1 / math.log2(5)) / 3)
    assert metrics["mrr"] == pytest.approx((1 / 2 + 1 / 4 + 1 / 2) / 3)
    # without filtering only the padding goes: row 0 -> items 1, 2, 3 ahead -> 4
    unfiltered = evaluate_ranking(_FixedScores(scores), [batch], [4], filter_history=False,
                                  device=torch.device("cpu")).compute()
    assert unfiltered["mrr"] == pytest.approx((1 / 4 + 1 / 4 + 1 / 4) / 3)  # row 2: 1 (0.8), 3 (0.6), 4 (tie)


def test_a_target_inside_the_history_ranks_last():
    scores = torch.tensor([[0.0, 0.1, 0.9, 0.2]])
    batch = _batch([[2, 3]], [2])
    scores[:, 0] = float("-inf")
    mask_history(scores, batch)
    rank = int(target_ranks(scores, torch.tensor([2])))
    assert rank == scores.shape[1]  # behind every item, never a hit
