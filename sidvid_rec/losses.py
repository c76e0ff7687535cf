"""Losses: sampled softmax over items (HSTU, COBRA SID positions) and InfoNCE (COBRA VID).

Both work on jagged positions flattened to ``[T, D]`` (no padding, so no weights) and on
cosine similarities: queries and item vectors are L2-normalised, divided by a temperature.
Item vectors are looked up through a callable ``item_vectors_fn(ids [K]) -> [K, D]``
(e.g. ``ItemEmbeddings.embed``), called once per loss on the *unique* ids needed
(positives + sampled negatives), never on the whole table.

* :class:`SampledSoftmaxLoss` follows the reference HSTU (generative-recommenders,
  ``research/modeling/sequential/losses/sampled_softmax.py`` with ``LocalNegativesSampler``):
  for every position R negatives drawn uniformly from items ``1..N`` (independently per
  position; ``shared=True`` draws one set of R for the whole batch, much cheaper on CPU),
  a negative equal to the positive gets logit -5e4 (not -inf: a row of all collisions
  stays finite), ``-log_softmax([pos, negs] / temperature)[0]`` averaged over positions.
  Two more negative sets (``negatives=``): ``all``, the exact softmax over every item
  ``1..N`` (one ``[T, N]`` matmul), and ``mixed``, the batch's own targets (in-batch,
  drawn by popularity) plus R shared uniform items, each logit corrected by the log of its
  expected count (logQ), so the sampled loss estimates the exact one. Optional label
  smoothing in every case.
* :class:`InfoNCELoss` contrasts each VID query with its own target vector against a pool
  of (id, vector, is_sid) entries: the batch's entries without dedup (every position keeps
  its own pair), optionally plus R global uniform negatives or a memory queue of recent
  vectors (:class:`VectorQueue`), so the negative count no longer depends on batch size.
  SID-space entries never enter the contrast (``is_sid``), and pool entries carrying the
  positive's id are masked to -5e4: the only positive is the query's own (id, VID) pair.

Example::

    loss_fn = SampledSoftmaxLoss(num_items=N, num_negatives=128, temperature=0.05)
    out = loss_fn(query, target_ids, item_embeddings.embed, generator=g)
    out.loss.backward()
"""

from typing import Callable, NamedTuple, Optional, Tuple, get_args

import torch
import torch.nn.functional as F
from torch import nn

from sidvid_rec.ops.sampled_softmax import negative_rows, sampled_softmax_nll, unique_ids
from sidvid_rec.types import ItemNegatives, VidNegatives

ItemVectorsFn = Callable[[torch.Tensor], torch.Tensor]
"""``ids [K]`` -> item vectors ``[K, D]`` (not necessarily normalised)."""

MASKED_LOGIT = -5e4
"""Logit of a masked candidate (the reference's value; finite so softmax never sees NaN)."""
NORM_EPS = 1e-6
"""Clamp of the L2 norm, as the reference's ``l2_norm_eps``."""
FULL_SCORES_PER_NEGATIVE = 32
"""Score all unique items at once (a matmul) when there are at most this many per negative
column; otherwise gather per-position vectors. Measured crossover on CPU: ~40 (T=25,600, R=128, D=50)."""


class LossOutput(NamedTuple):
    loss: torch.Tensor
    """Scalar mean loss over positions (0 with a graph when there are none)."""
    num_positions: int
    """Positions averaged over."""


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` divided by its L2 norm (clamped at ``NORM_EPS``): ``F.normalize`` on the last dim."""
    return F.normalize(x, dim=-1, eps=NORM_EPS)


def uniform_item_ids(num_items: int, shape: Tuple[int, ...], generator: Optional[torch.Generator],
                     device: torch.device) -> torch.Tensor:
    """Uniform ids in ``1..num_items`` (never the padding id 0), drawn on the generator's device."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    ids = torch.randint(1, num_items + 1, shape, generator=generator, device=gen_device)
    return ids.to(device)


def _lookup_unique(ids: torch.Tensor, item_vectors_fn: ItemVectorsFn) -> Tuple[torch.Tensor, torch.Tensor]:
    """Looks up each distinct id once: ``ids [K]`` -> (normalised vectors ``[U, D]``, index ``[K]``)."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    return l2_normalize(item_vectors_fn(unique)), inverse


def _indexed_scores(query: torch.Tensor, vectors: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``scores[t, r] = <query[t], vectors[index[t, r]]>``: ``[T, D], [U, D], [T, R]`` -> ``[T, R]``."""
    if vectors.shape[0] <= FULL_SCORES_PER_NEGATIVE * index.shape[1]:
        return (query @ vectors.T).gather(1, index)  # [T, U] -> [T, R]
    return torch.bmm(vectors[index], query.unsqueeze(-1)).squeeze(-1)  # [T, R, D] @ [T, D, 1]


def _zero_loss(query: torch.Tensor) -> LossOutput:
    return LossOutput(query.sum() * 0.0, 0)


def _nll_of_first(logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-log_softmax(logits)[:, 0]``: ``[T, 1 + R]`` -> scalar."""
    return -F.log_softmax(logits, dim=1)[:, 0].mean()


def _smoothed_nll_of_first(logits: torch.Tensor, valid: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy with target column 0 and label smoothing over the ``valid [T, C]`` columns:
    ``(1 - eps) * nll + eps * mean_valid(-log p)`` per row, averaged over rows (masked candidates
    get no smoothing mass, as if they were not there; ``eps = 0`` is :func:`_nll_of_first`)."""
    if smoothing == 0.0:
        return _nll_of_first(logits)
    log_p = F.log_softmax(logits, dim=1)
    weights = valid.to(log_p.dtype)
    uniform = -(log_p * weights).sum(1) / weights.sum(1)
    return ((1.0 - smoothing) * -log_p[:, 0] + smoothing * uniform).mean()


class SampledSoftmaxLoss(nn.Module):
    """Softmax over items of each position's query: sampled (reference HSTU), exact, or mixed.

    Args:
        num_items: N; negatives are drawn from ids ``1..N``.
        num_negatives: R uniform negatives per position (or per batch with ``shared``; with
            ``mixed``, one set of R for the batch).
        temperature: logits are cosine similarities divided by this.
        shared: one set of R negatives for every position of the batch instead of R each.
        negatives: ``uniform`` (the reference: R uniform negatives, no correction), ``all``
            (the exact softmax over every item ``1..N``; the padding row 0 never enters) or
            ``mixed`` (the batch's targets as in-batch negatives plus R shared uniform ones).
        label_smoothing: eps of the label-smoothed cross-entropy, spread over the candidates
            of the row (every item with ``all``; the unmasked ones when sampled).
        item_frequency: ``mixed`` only: ``[N + 1]`` share of each item among training events.
            When given, each pool logit loses the log of its id's expected number of copies in
            the pool, ``log(M * freq(id) + R / N)`` (in-batch entries are drawn by popularity,
            uniform ones with probability 1 / N each): the logQ correction, after which the
            sampled denominator is an unbiased estimate of the full softmax's.
        max_in_batch: ``mixed``: keep at most this many in-batch entries (a uniform subset of the
            batch's positions); 0 = every position.
        negatives_block: > 0: one draw of R negatives per block of this many consecutive
            positions (``[ceil(T / b), R]``; each position still sees R uniform negatives, so the
            expected loss and gradient are those of per-position draws); 0 = per position.
        fused: compute the loss with the chunked, hand-differentiated kernel
            (:mod:`sidvid_rec.ops.sampled_softmax`) instead of plain autograd ops (same values).
    """

    def __init__(self, num_items: int, num_negatives: int = 128, temperature: float = 0.05,
                 shared: bool = False, negatives: ItemNegatives = "uniform", label_smoothing: float = 0.0,
                 item_frequency: Optional[torch.Tensor] = None, max_in_batch: int = 0,
                 negatives_block: int = 0, fused: bool = True) -> None:
        super().__init__()
        if num_items <= 0 or num_negatives <= 0 or temperature <= 0:
            raise ValueError(f"num_items, num_negatives and temperature must be positive, got "
                             f"{num_items}, {num_negatives}, {temperature}")
        if negatives not in get_args(ItemNegatives):
            raise ValueError(f"unknown negatives {negatives!r}; choose one of {', '.join(get_args(ItemNegatives))}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        if item_frequency is not None and negatives != "mixed":
            raise ValueError("item_frequency (the logQ correction) is used by negatives='mixed' only")
        self._num_items = num_items
        self._num_negatives = num_negatives
        self._temperature = temperature
        self._shared = shared
        if negatives_block < 0:
            raise ValueError(f"negatives_block must be >= 0, got {negatives_block}")
        if negatives_block and (negatives != "uniform" or label_smoothing):
            raise ValueError("negatives_block applies to negatives='uniform' without label smoothing")
        self._negatives_block = negatives_block
        self._fused = fused
        self._negatives: ItemNegatives = negatives
        self._label_smoothing = float(label_smoothing)
        self._max_in_batch = max_in_batch
        self.item_frequency: Optional[torch.Tensor]
        self.register_buffer("item_frequency", None if item_frequency is None else item_frequency.float(),
                             persistent=False)

    @property
    def negatives(self) -> ItemNegatives:
        return self._negatives

    def sample_negatives(self, num_positions: int, generator: Optional[torch.Generator],
                         device: torch.device) -> torch.Tensor:
        """Negative ids: ``[T, R]``, ``[ceil(T / block), R]`` with ``negatives_block``, or
        ``[1, R]`` broadcast to every position when shared."""
        rows = 1 if self._shared else negative_rows(num_positions, self._negatives_block or 1)
        return uniform_item_ids(self._num_items, (rows, self._num_negatives), generator, device)

    def forward(self, query: torch.Tensor, pos_ids: torch.Tensor, item_vectors_fn: Optional[ItemVectorsFn] = None,
                generator: Optional[torch.Generator] = None,
                negative_ids: Optional[torch.Tensor] = None,
                negative_log_counts: Optional[torch.Tensor] = None,
                in_batch_ids: Optional[torch.Tensor] = None,
                candidate_vectors: Optional[torch.Tensor] = None,
                candidate_index: Optional[torch.Tensor] = None) -> LossOutput:
        """Mean NLL of each position's positive against its negatives.

        Args:
            query: ``[T, D]`` model outputs (normalised here).
            pos_ids: ``[T]`` target item ids in ``1..N``.
            item_vectors_fn: ``ids [K] -> [K, D]``; called once, on the unique ids needed
                (on ``1..N`` with ``negatives='all'``).
            generator: random source of the negatives.
            negative_ids: ``[T, R]`` or ``[1, R]`` fixed negatives instead of sampling (tests);
                with ``mixed``, ``[R]`` fixed uniform ones.
            negative_log_counts: shaped like ``negative_ids``: log of each negative's expected
                number of copies among the R draws, subtracted from its logit (sampling-bias
                correction, "logQ"), so the sampled denominator estimates the full softmax's
                even when the ids are not drawn uniformly (e.g. items mapped to SIDs).
            in_batch_ids: ``mixed``: the in-batch pool ``[M]`` (default: ``pos_ids``, the targets
                of every position of the batch).
            candidate_vectors, candidate_index: ``uniform`` with ``negative_ids``: the candidates
                already looked up (batch-side lookups): ``[U, D]`` vectors of the unique ids of
                ``cat([pos_ids, negative_ids.flatten()])`` and the ``[T + K]`` index into them;
                ``item_vectors_fn`` is then not called.
        """
        num_positions = pos_ids.numel()
        if candidate_vectors is not None:
            if self._negatives != "uniform" or negative_ids is None or candidate_index is None:
                raise ValueError("candidate_vectors need negatives='uniform', negative_ids and candidate_index")
        if num_positions == 0:
            return _zero_loss(query)
        if self._negatives == "all":
            return LossOutput(self._full_softmax(query, pos_ids, item_vectors_fn), num_positions)
        if self._negatives == "mixed":
            negative_ids, negative_log_counts = self.mixed_pool(pos_ids if in_batch_ids is None else in_batch_ids,
                                                                generator, negative_ids)
        elif negative_ids is None:
            negative_ids = self.sample_negatives(num_positions, generator, pos_ids.device)
        if self._uses_op(candidate_vectors, negative_ids.shape[0], num_positions):
            return self._forward_op(query, pos_ids, negative_ids, item_vectors_fn, negative_log_counts)
        if candidate_vectors is not None:
            vectors, inverse = l2_normalize(candidate_vectors), candidate_index
        else:
            assert item_vectors_fn is not None
            vectors, inverse = _lookup_unique(torch.cat([pos_ids, negative_ids.reshape(-1)]), item_vectors_fn)
        q = l2_normalize(query)  # [T, D]
        pos_logits = (q * vectors[inverse[:num_positions]]).sum(-1, keepdim=True)  # [T, 1]
        neg_index = inverse[num_positions:].view(negative_ids.shape)  # [T or 1, R]
        if neg_index.shape[0] == 1:  # shared: one matmul against R vectors
            neg_logits = q @ vectors[neg_index[0]].T  # [T, R]
        else:
            neg_logits = _indexed_scores(q, vectors, neg_index)  # [T, R]
        neg_logits = neg_logits / self._temperature
        if negative_log_counts is not None:
            neg_logits = neg_logits - negative_log_counts
        collide = negative_ids == pos_ids.unsqueeze(1)  # [T, R]
        neg_logits = neg_logits.masked_fill(collide, MASKED_LOGIT)
        logits = torch.cat([pos_logits / self._temperature, neg_logits], dim=1)  # [T, 1 + R]
        if self._label_smoothing == 0.0:
            return LossOutput(_nll_of_first(logits), num_positions)
        valid = torch.cat([torch.ones_like(pos_logits, dtype=torch.bool), ~collide], dim=1)
        return LossOutput(_smoothed_nll_of_first(logits, valid, self._label_smoothing), num_positions)

    def mixed_pool(self, in_batch_ids: torch.Tensor, generator: Optional[torch.Generator] = None,
                   uniform_ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``mixed``'s shared pool ``[1, M + R]`` (in-batch entries, at most ``max_in_batch``, then
        R uniform ids) and, with ``item_frequency``, the log of each entry's expected copies
        ``log(M * freq(id) + R / N)`` (``[1, M + R]``; else None)."""
        pool = in_batch_ids.reshape(-1)
        if self._max_in_batch and pool.numel() > self._max_in_batch:
            gen_device = generator.device if generator is not None else torch.device("cpu")
            keep = torch.randperm(pool.numel(), generator=generator, device=gen_device)[: self._max_in_batch]
            pool = pool[keep.to(pool.device)]
        if uniform_ids is None:
            uniform_ids = uniform_item_ids(self._num_items, (self._num_negatives,), generator, pool.device)
        uniform_ids = uniform_ids.reshape(-1)
        ids = torch.cat([pool, uniform_ids]).unsqueeze(0)
        if self.item_frequency is None:
            return ids, None
        freq = self.item_frequency.to(ids.device)
        expected = pool.numel() * freq[ids] + uniform_ids.numel() / self._num_items
        return ids, expected.clamp(min=1e-12).log()

    def _full_softmax(self, query: torch.Tensor, pos_ids: torch.Tensor, item_vectors_fn: ItemVectorsFn) -> torch.Tensor:
        """Exact cross-entropy over items ``1..N``: ``cos(q, item) / temperature`` for every item."""
        ids = torch.arange(1, self._num_items + 1, device=pos_ids.device)
        logits = l2_normalize(query) @ l2_normalize(item_vectors_fn(ids)).T / self._temperature  # [T, N]
        return F.cross_entropy(logits, pos_ids - 1, label_smoothing=self._label_smoothing)

    def _uses_op(self, candidate_vectors: Optional[torch.Tensor], rows: int, num_positions: int) -> bool:
        """Whether :meth:`forward` runs :func:`sampled_softmax_nll`: with ``fused`` or blocked
        negatives (its only path), unless the row needs what only the plain path does: label
        smoothing, or candidates looked up by the batch (``candidate_vectors``)."""
        if self._label_smoothing or candidate_vectors is not None:
            return False
        return self._fused or rows not in (1, num_positions)

    def _forward_op(self, query: torch.Tensor, pos_ids: torch.Tensor, negative_ids: torch.Tensor,
                    item_vectors_fn: ItemVectorsFn, negative_log_counts: Optional[torch.Tensor]) -> LossOutput:
        """:meth:`forward` through :func:`sampled_softmax_nll` (fused, or its reference): the only
        path for blocked negatives (``[ceil(T / block), R]``)."""
        num_positions = pos_ids.numel()
        unique, inverse = unique_ids(torch.cat([pos_ids, negative_ids.reshape(-1)]), self._num_items + 1)
        vectors = l2_normalize(item_vectors_fn(unique))
        rows = negative_ids.shape[0]
        block = 1 if rows == num_positions else self._negatives_block or 1
        loss = sampled_softmax_nll(l2_normalize(query), vectors[inverse[:num_positions]], vectors,
                                   inverse[num_positions:].view(negative_ids.shape), self._temperature, block=block,
                                   pos_keys=pos_ids, neg_keys=negative_ids, neg_bias=negative_log_counts,
                                   fused=self._fused)
        return LossOutput(loss, num_positions)


# ----------------------------------------------------------------------------- InfoNCE


class CandidatePool(NamedTuple):
    ids: torch.Tensor
    """``[M]`` item id of each entry."""
    vectors: torch.Tensor
    """``[M, D]`` its vector (SID-space or VID-space)."""
    is_sid: torch.Tensor
    """``[M]`` bool: True for SID-space entries, which never enter the VID contrast."""

    def vid_only(self) -> "CandidatePool":
        keep = ~self.is_sid
        return CandidatePool(self.ids[keep], self.vectors[keep], self.is_sid[keep])

    @staticmethod
    def cat(pools: "list[CandidatePool]") -> "CandidatePool":
        return CandidatePool(*(torch.cat([getattr(p, f) for p in pools]) for f in CandidatePool._fields))


class VectorQueue(nn.Module):
    """FIFO memory of the most recent ``size`` (id, vector) pairs, detached from the graph.

    Buffers (saved in checkpoints): ``ids [size]`` (-1 = empty), ``vectors [size, D]``,
    ``ptr`` (next slot to write) and ``count`` (filled slots).
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"queue size and dim must be positive, got {size} and {dim}")
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("vectors", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.ids.numel()

    def __len__(self) -> int:
        return int(self.count)

    @torch.no_grad()
    def push(self, ids: torch.Tensor, vectors: torch.Tensor) -> None:
        """Appends ``ids [n]``, ``vectors [n, D]``, overwriting the oldest entries when full."""
        ids, vectors = ids[-self.size:], vectors[-self.size:].detach()  # only the newest fit
        slots = (int(self.ptr) + torch.arange(ids.numel(), device=self.ids.device)) % self.size
        self.ids[slots] = ids.to(self.ids.device)
        self.vectors[slots] = vectors.to(self.vectors.dtype).to(self.vectors.device)
        self.ptr.fill_((int(self.ptr) + ids.numel()) % self.size)
        self.count.fill_(min(self.size, int(self.count) + ids.numel()))

    def contents(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(ids [n], vectors [n, D])`` of the filled entries, oldest first."""
        n = int(self.count)
        start = (int(self.ptr) - n) % self.size
        order = (start + torch.arange(n, device=self.ids.device)) % self.size
        return self.ids[order], self.vectors[order]


class InfoNCELoss(nn.Module):
    """InfoNCE of VID queries against a configurable negative pool (COBRA VID positions).

    Logits per query: ``[<q, own target>, <q, pool entries>] / temperature`` over the VID
    entries of the pool, with entries that carry the target's id masked to -5e4 (the
    target's own in-batch entry among them: it is already the first column).

    Args:
        num_items: N; global negatives are drawn from ``1..N``.
        negatives: ``in_batch`` (the batch's entries, as the original), ``in_batch_global``
            (plus R uniform items looked up through ``item_vectors_fn``) or ``queue`` (plus a
            :class:`VectorQueue` of the last ``queue_size`` batches' VID entries) or ``all`` (every
            item ``1..N`` through ``item_vectors_fn``: the exact softmax, nothing to correct).
        num_negatives: R of ``in_batch_global``.
        queue_size: entries kept by ``queue``.
        dim: vector width (needed by ``queue``).
        temperature: divides the cosine similarities.
        max_in_batch: keep at most this many in-batch VID entries (a uniform subset); 0 = all.
            Bounds the ``[P, M]`` logits when batches are large.
        item_frequency: optional ``[N + 1]`` share of each item among training events. When
            given, every pool logit is corrected by the log of its id's expected number of
            copies in the pool (``M_pop * freq + R / N``: in-batch and queue entries are drawn
            by popularity, global ones uniformly), the "logQ" sampling-bias correction. Without
            it, popular items are over-represented among negatives and pushed down, which
            full-catalogue ranking punishes. The correction is taken relative to a uniform pool
            of the same size (``log(E[count] / (M / N))``), so the pool weighs what M uniform
            negatives weigh, as in the reference's sampled softmax.
        fused: compute the loss with the chunked kernel of :mod:`sidvid_rec.ops.sampled_softmax`
            (the pool shared by every query; never holds ``[P, M]``) instead of :meth:`logits`.
    """

    def __init__(self, num_items: int, negatives: VidNegatives = "in_batch", num_negatives: int = 128,
                 queue_size: int = 4096, dim: int = 0, temperature: float = 0.05,
                 max_in_batch: int = 0, item_frequency: Optional[torch.Tensor] = None, fused: bool = True) -> None:
        super().__init__()
        if negatives not in get_args(VidNegatives):
            choices = ", ".join(get_args(VidNegatives))
            raise ValueError(f"unknown VID negative pool {negatives!r}; choose one of {choices}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self._num_items = num_items
        self._negatives: VidNegatives = negatives
        self._num_negatives = num_negatives
        self._temperature = temperature
        self._max_in_batch = max_in_batch
        self._fused = fused
        self.queue: Optional[VectorQueue] = VectorQueue(queue_size, dim) if negatives == "queue" else None
        self.item_frequency: Optional[torch.Tensor]
        self.register_buffer("item_frequency", None if item_frequency is None else item_frequency.float(),
                             persistent=False)

    def build_pool(self, batch: CandidatePool, item_vectors_fn: Optional[ItemVectorsFn] = None,
                   generator: Optional[torch.Generator] = None) -> Tuple[CandidatePool, Optional[torch.Tensor]]:
        """The VID negative pool for this batch (SID entries already removed), and the log of
        each entry's expected copies in such a pool (``[M]``; None without ``item_frequency``)."""
        if self._negatives == "all":  # the whole catalogue once: exact, so no sampling bias to correct
            if item_vectors_fn is None:
                raise ValueError("negatives=all needs item_vectors_fn")
            ids = torch.arange(1, self._num_items + 1, device=batch.ids.device)
            return CandidatePool(ids, item_vectors_fn(ids), torch.zeros_like(ids, dtype=torch.bool)), None
        pool = batch.vid_only()
        if self._max_in_batch and pool.ids.numel() > self._max_in_batch:
            gen_device = generator.device if generator is not None else torch.device("cpu")
            keep = torch.randperm(pool.ids.numel(), generator=generator, device=gen_device)[: self._max_in_batch]
            keep = keep.to(pool.ids.device)
            pool = CandidatePool(pool.ids[keep], pool.vectors[keep], pool.is_sid[keep])
        if self._negatives == "in_batch_global":
            if item_vectors_fn is None:
                raise ValueError("in_batch_global negatives need item_vectors_fn")
            ids = uniform_item_ids(self._num_items, (self._num_negatives,), generator, pool.ids.device)
            extra = CandidatePool(ids, item_vectors_fn(ids), torch.zeros_like(ids, dtype=torch.bool))
            pool = CandidatePool.cat([pool, extra])
        elif self._negatives == "queue" and self.queue is not None and len(self.queue):
            ids, vectors = self.queue.contents()
            extra = CandidatePool(ids, vectors.to(pool.vectors.dtype), torch.zeros_like(ids, dtype=torch.bool))
            pool = CandidatePool.cat([pool, extra])
        if self.item_frequency is None:
            return pool, None
        num_uniform = self._num_negatives if self._negatives == "in_batch_global" else 0
        num_popular = pool.ids.numel() - num_uniform  # in-batch (kept) + queue entries
        expected = num_popular * self.item_frequency[pool.ids] + num_uniform / self._num_items
        # Relative to a uniform pool of the same size (M / N copies of each item): removes the
        # popularity bias but keeps the negatives' total weight that of M uniform draws.
        uniform = pool.ids.numel() / self._num_items
        return pool, (expected.clamp(min=1e-12) / uniform).log()

    def logits(self, query: torch.Tensor, pos_ids: torch.Tensor, pos_vectors: torch.Tensor,
               pool: CandidatePool, pool_log_counts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[P, 1 + M]`` logits: own target first, then the (VID) pool with collisions masked
        (and corrected by ``pool_log_counts [M]`` when given)."""
        q = l2_normalize(query)  # [P, D]
        pos_logits = (q * l2_normalize(pos_vectors)).sum(-1, keepdim=True)  # [P, 1]
        pool_logits = q @ l2_normalize(pool.vectors).T / self._temperature  # [P, M]
        if pool_log_counts is not None:
            pool_logits = pool_logits - pool_log_counts
        masked = (pool.ids.unsqueeze(0) == pos_ids.unsqueeze(1)) | pool.is_sid.unsqueeze(0)  # [P, M]
        pool_logits = pool_logits.masked_fill(masked, MASKED_LOGIT)
        return torch.cat([pos_logits / self._temperature, pool_logits], dim=1)

    def forward(self, query: torch.Tensor, pos_ids: torch.Tensor, pos_vectors: torch.Tensor,
                batch: CandidatePool, item_vectors_fn: Optional[ItemVectorsFn] = None,
                generator: Optional[torch.Generator] = None) -> LossOutput:
        """Mean InfoNCE over the P VID queries.

        Args:
            query: ``[P, D]`` outputs at VID positions.
            pos_ids: ``[P]`` target item ids.
            pos_vectors: ``[P, D]`` each target's own VID vector (the positive).
            batch: the batch's entries (SID and VID, no dedup) for the in-batch pool.
            item_vectors_fn: VID vectors of global negatives (``in_batch_global``).
            generator: random source of global negatives / the in-batch subset.

        In training mode with ``queue``, the batch's VID entries enter the queue afterwards.
        """
        if pos_ids.numel() == 0:
            return _zero_loss(query)
        pool, log_counts = self.build_pool(batch, item_vectors_fn, generator)
        if self._fused:
            keep = ~pool.is_sid  # SID entries are masked out of the contrast: dropping them is the same
            counts = None if log_counts is None else log_counts[keep].unsqueeze(0)
            loss = sampled_softmax_nll(l2_normalize(query), l2_normalize(pos_vectors), l2_normalize(pool.vectors[keep]),
                                       None, self._temperature, pos_keys=pos_ids, neg_keys=pool.ids[keep].unsqueeze(0),
                                       neg_bias=counts)
        else:
            loss = _nll_of_first(self.logits(query, pos_ids, pos_vectors, pool, log_counts))
        if self.queue is not None and self.training:
            vid = batch.vid_only()
            self.queue.push(vid.ids, vid.vectors)
        return LossOutput(loss, pos_ids.numel())


def code_softmax_loss(query: torch.Tensor, target_codes: torch.Tensor, levels: torch.Tensor, heads: torch.Tensor,
                      level_offsets: torch.Tensor, temperature: float) -> LossOutput:
    """Next-code cross-entropy of SID generation: each row of ``query [P, D]`` against every
    code of its level (full softmax over the ``K_l`` rows ``heads[level_offsets[l]:level_offsets[l+1]]``,
    cosine / temperature), target ``target_codes [P]`` (within-level code), ``levels [P]``; mean over rows."""
    if query.shape[0] == 0:
        return _zero_loss(query)
    total = query.new_zeros(())
    normed = l2_normalize(query)
    for level in range(level_offsets.numel() - 1):
        rows = torch.nonzero(levels == level).flatten()
        if rows.numel() == 0:
            continue
        keys = l2_normalize(heads[int(level_offsets[level]):int(level_offsets[level + 1])])
        logits = normed[rows] @ keys.T / temperature  # [P_l, K_l]
        total = total + torch.nn.functional.cross_entropy(logits, target_codes[rows], reduction="sum")
    return LossOutput(total / query.shape[0], int(query.shape[0]))


def code_head_loss(queries: torch.Tensor, codes: torch.Tensor, heads: torch.Tensor, level_offsets: torch.Tensor,
                   temperature: float) -> LossOutput:
    """``-log p(SID)`` of a code-by-code SID head: ``queries [P, L, D]`` (level ``l``'s query of
    each position, teacher-forced on the target's codes before ``l``), target SIDs ``codes [P, L]``;
    the sum of the ``L`` per-level cross-entropies (:func:`code_softmax_loss`), mean over positions
    (the scale of a whole-SID softmax: both are the SID's negative log-likelihood)."""
    positions, levels = codes.shape
    level = torch.arange(levels, device=codes.device).repeat(positions)
    out = code_softmax_loss(queries.reshape(positions * levels, -1), codes.reshape(-1), level, heads, level_offsets,
                            temperature)
    return LossOutput(out.loss * levels, int(positions))  # mean over P * L rows -> sum over the levels
