"""Ranking metrics from the 1-based rank of each example's target item.

With one relevant item per example, HR@K = 1[rank <= K], NDCG@K = 1[rank <= K] / log2(rank + 1)
and MRR = 1 / rank. Metrics are accumulated as weighted sums so that ranks can be reduced
across processes (``all_reduce`` of :meth:`RankMetrics.state`) and still equal the
single-process result exactly.
"""

from typing import Dict, List, Sequence

import torch


class RankMetrics:
    """Accumulates HR@K (every K), NDCG@K (every K > 1) and MRR over batches of ranks."""

    def __init__(self, ks: Sequence[int]) -> None:
        self._ks: List[int] = sorted(set(int(k) for k in ks))
        # Layout of the sum vector: [count, hr@k..., ndcg@k..., mrr]
        self._sums = torch.zeros(1 + 2 * len(self._ks) + 1, dtype=torch.float64)

    def update(self, ranks: torch.Tensor, weights: torch.Tensor) -> None:
        """``ranks [B]``: 1-based rank of the target; ``weights [B]``: 0 for filler examples."""
        ranks = ranks.detach().to(torch.float64).cpu()
        weights = weights.detach().to(torch.float64).cpu()
        ks = torch.tensor(self._ks, dtype=torch.float64)
        hit = (ranks[:, None] <= ks[None, :]).to(torch.float64)  # [B, K]
        ndcg = hit / torch.log2(ranks[:, None] + 1.0)
        self._sums[0] += weights.sum()
        self._sums[1 : 1 + len(self._ks)] += (weights[:, None] * hit).sum(0)
        self._sums[1 + len(self._ks) : 1 + 2 * len(self._ks)] += (weights[:, None] * ndcg).sum(0)
        self._sums[-1] += (weights / ranks).sum()

    def state(self) -> torch.Tensor:
        """The raw sums, to be summed across ranks (``all_reduce``) before :meth:`load_state`."""
        return self._sums.clone()

    def load_state(self, sums: torch.Tensor) -> None:
        self._sums = sums.detach().to(torch.float64).cpu().clone()

    def compute(self) -> Dict[str, float]:
        count = float(self._sums[0])
        if count == 0:
            raise ValueError("no examples were evaluated")
        n = len(self._ks)
        out: Dict[str, float] = {}
        for i, k in enumerate(self._ks):
            out[f"hr@{k}"] = float(self._sums[1 + i]) / count
        for i, k in enumerate(self._ks):
            if k > 1:
                out[f"ndcg@{k}"] = float(self._sums[1 + n + i]) / count
        out["mrr"] = float(self._sums[-1]) / count
        out["count"] = int(round(count))
        return out


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of ``targets [B]`` among ``scores [B, N]`` (ties count against the target:
    items scoring equal to the target rank ahead of it, the pessimistic convention).

    NaN is pessimistic too: a NaN competitor ranks ahead of the target, and a NaN target ranks
    last (``N``); otherwise a diverged model would score rank 0, a "hit" with MRR = inf.
    """
    target_scores = scores.gather(1, targets[:, None])  # [B, 1]
    ahead = ((scores >= target_scores) | scores.isnan()).sum(1)  # includes the target itself
    return torch.where(target_scores[:, 0].isnan(), torch.full_like(ahead, scores.shape[1]), ahead)
