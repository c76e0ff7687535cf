"""Sampled-softmax NLL: a fused, chunked kernel and its plain reference, behind one signature.

``sampled_softmax_nll(query, pos_vectors, neg_vectors, neg_index, temperature, ...)`` is the mean
over the ``T`` positions of ``-log_softmax([pos_t, negs_t])[0]`` with

* ``pos_t = <query[t], pos_vectors[t]> / temperature``;
* ``negs_t[r] = <query[t], neg_vectors[neg_index[g(t), r]]> / temperature - neg_bias[g(t), r]``,
  masked to ``MASKED_LOGIT`` where ``neg_keys[g(t), r] == pos_keys[t]`` (a sampled copy of the
  positive); ``g(t) = t // block`` is the row of negatives position ``t`` uses: ``block=1`` one row
  per position (``[T, R]``, the reference HSTU), ``block=b`` one row per ``b`` consecutive
  positions (``[ceil(T / b), R]``), and a single row (``[1, R]``) is shared by every position.
  ``neg_index=None`` means every position scores every row of ``neg_vectors`` (``R = U``; an
  InfoNCE pool); ``neg_keys``/``neg_bias`` are then ``[1, U]``.

Inputs are already L2-normalised; gradients flow to ``query``, ``pos_vectors`` and
``neg_vectors`` (``[U, D]``: the unique candidates, so the caller's lookup backward is one
scatter of ``U`` rows).

``fused=False`` is the reference: plain autograd ops that materialise the ``[T, R, D]`` gather
(or the ``[T, U]`` pool scores) and the ``[T, 1 + R]`` logits. ``fused=True`` is
:class:`_FusedSampledSoftmax`: positions in chunks of ``CHUNK_POSITIONS`` (rounded to whole
blocks), each chunk's scores a matmul (shared / blocked negatives: ``[c, D] @ [D, R]`` per block;
per-position negatives: against the ``U`` unique vectors at once when ``U <= DENSE_PER_NEGATIVE * R``,
else the chunk's ``[c, R, D]`` gather), the log-sum-exp and, when a gradient is needed, the
gradient itself (softmax weights times vectors, by hand) while the chunk is in cache. Nothing
larger than one chunk's scores is ever held, nothing of shape ``[T, R, D]`` is saved for the
backward (only the three gradients, ``[T, D]``, ``[T, D]``, ``[U, D]``), and the backward is a
scaling. Without a gradient (evaluation) only the forward runs.
"""

import math
from typing import Optional

import torch

MASKED_LOGIT = -5e4
"""Logit of a masked candidate (finite: a row of all collisions stays finite)."""
CHUNK_POSITIONS = 512
"""Positions per chunk of the fused kernel (rounded to whole blocks)."""
DENSE_PER_NEGATIVE = 24
"""Per-position negatives: score a chunk against all ``U`` unique vectors (one matmul, then a
gather) when ``U <= DENSE_PER_NEGATIVE * R``; otherwise gather the chunk's ``[c, R, D]`` vectors.
Measured on this CPU (T = 10,281, R = 128, D = 50, fwd + bwd CPU ms, dense / gathered): U = 1,682:
107 / 135-270, U = 3,000: 155 / 272, U = 5,000: 267 / 284."""
DENSE_UNIQUE_PER_ID = 4
""":func:`unique_ids` marks a ``[bound]`` table instead of sorting when ``bound <= this x ids``."""


def unique_ids(ids: torch.Tensor, bound: int):
    """``torch.unique(ids, return_inverse=True)`` for ids in ``[0, bound)``: the same sorted
    unique ids and inverse, by marking a ``[bound]`` table (``O(K + bound)``) instead of a sort
    when the bound is small against ``K = ids.numel()``."""
    if bound > DENSE_UNIQUE_PER_ID * ids.numel():
        return torch.unique(ids, return_inverse=True)
    present = torch.zeros(bound, dtype=torch.bool, device=ids.device)
    present[ids] = True
    unique = present.nonzero().squeeze(1)
    slot = torch.empty(bound, dtype=torch.long, device=ids.device)
    slot[unique] = torch.arange(unique.numel(), device=ids.device)
    return unique, slot[ids]


def negative_rows(num_positions: int, block: int) -> int:
    """Rows of negatives for ``num_positions`` positions in blocks of ``block`` (``ceil(T / b)``)."""
    return -(-num_positions // max(block, 1))


def _check(query: torch.Tensor, pos_vectors: torch.Tensor, neg_vectors: torch.Tensor,
           neg_index: Optional[torch.Tensor], block: int) -> int:
    """The block size actually used (``T`` for a single shared row)."""
    num_positions = query.shape[0]
    if pos_vectors.shape != query.shape or neg_vectors.shape[1:] != query.shape[1:]:
        raise ValueError(f"shapes disagree: query {tuple(query.shape)}, pos_vectors {tuple(pos_vectors.shape)}, "
                         f"neg_vectors {tuple(neg_vectors.shape)}")
    rows = 1 if neg_index is None else neg_index.shape[0]
    if rows == 1:
        return max(num_positions, 1)
    if block < 1 or negative_rows(num_positions, block) != rows:
        raise ValueError(f"{rows} rows of negatives do not fit {num_positions} positions in blocks of {block}")
    return block


def _group_of_positions(num_positions: int, block: int, device: torch.device) -> torch.Tensor:
    return torch.arange(num_positions, device=device) // block


def reference_sampled_softmax_nll(query: torch.Tensor, pos_vectors: torch.Tensor, neg_vectors: torch.Tensor,
                                  neg_index: Optional[torch.Tensor], temperature: float, block: int = 1,
                                  pos_keys: Optional[torch.Tensor] = None, neg_keys: Optional[torch.Tensor] = None,
                                  neg_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain autograd version of :func:`sampled_softmax_nll` (materialises every position's negatives)."""
    block = _check(query, pos_vectors, neg_vectors, neg_index, block)
    num_positions = query.shape[0]
    groups = _group_of_positions(num_positions, block, query.device)
    pos_logits = (query * pos_vectors).sum(-1, keepdim=True) / temperature  # [T, 1]
    if neg_index is None:
        neg_logits = query @ neg_vectors.T  # [T, U]
    else:
        negs = neg_vectors[neg_index[groups]]  # [T, R, D]
        neg_logits = torch.bmm(negs, query.unsqueeze(-1)).squeeze(-1)  # [T, R]
    neg_logits = neg_logits / temperature
    if neg_bias is not None:
        neg_logits = neg_logits - neg_bias[groups]
    if pos_keys is not None and neg_keys is not None:
        neg_logits = neg_logits.masked_fill(neg_keys[groups] == pos_keys.unsqueeze(1), MASKED_LOGIT)
    logits = torch.cat([pos_logits, neg_logits], dim=1)
    return -torch.log_softmax(logits, dim=1)[:, 0].mean()


class _FusedSampledSoftmax(torch.autograd.Function):
    """Chunked scores + log-sum-exp + hand-written gradient (see the module docstring)."""

    @staticmethod
    def forward(ctx, query, pos_vectors, neg_vectors, neg_index, pos_keys, neg_keys, neg_bias,  # type: ignore[override]
                temperature: float, block: int, want_grad: bool):
        num_positions, dim = query.shape
        inv_t = 1.0 / temperature
        pos_logits = (query * pos_vectors).sum(-1) * inv_t  # [T]
        grad_q = torch.empty_like(query) if want_grad else None
        grad_pos = torch.empty_like(pos_vectors) if want_grad else None
        grad_neg = torch.zeros_like(neg_vectors) if want_grad else None
        masked = pos_keys is not None and neg_keys is not None
        total = query.new_zeros((), dtype=torch.float64)
        shared = neg_index is None or neg_index.shape[0] == 1
        if shared:
            shared_vectors = neg_vectors if neg_index is None else neg_vectors[neg_index[0]]  # [R, D]
            grad_shared = torch.zeros_like(shared_vectors) if want_grad and neg_index is not None else grad_neg
            chunk = CHUNK_POSITIONS
        else:
            num_unique, num_neg = neg_vectors.shape[0], neg_index.shape[1]
            dense = block == 1 and num_unique <= DENSE_PER_NEGATIVE * num_neg
            chunk = max(block, (CHUNK_POSITIONS // block) * block)
        for start in range(0, num_positions, chunk):
            stop = min(start + chunk, num_positions)
            qc = query[start:stop]  # [c, D]
            count = stop - start
            if shared:
                scores = qc @ shared_vectors.T  # [c, R]
                key_rows = None if not masked else neg_keys[0].unsqueeze(0)
                bias_rows = None if neg_bias is None else neg_bias[0].unsqueeze(0)
            elif dense:
                index = neg_index[start:stop]  # [c, R]
                scores = (qc @ neg_vectors.T).gather(1, index)  # [c, U] -> [c, R]
                key_rows = None if not masked else neg_keys[start:stop]
                bias_rows = None if neg_bias is None else neg_bias[start:stop]
            else:
                g0, g1 = start // block, negative_rows(stop, block)
                index = neg_index[g0:g1]  # [nb, R]
                vec = neg_vectors[index]  # [nb, R, D]
                full = count // block * block
                parts = []
                if full:
                    nb = full // block
                    parts.append(torch.bmm(qc[:full].view(nb, block, dim), vec[:nb].transpose(1, 2)).view(full, -1))
                if full < count:  # the batch's last, partial block
                    parts.append(qc[full:] @ vec[-1].T)
                scores = parts[0] if len(parts) == 1 else torch.cat(parts)
                rows = _group_of_positions(count, block, query.device) if block > 1 else None
                key_rows = None if not masked else (neg_keys[g0:g1] if rows is None else neg_keys[g0:g1][rows])
                bias_rows = None if neg_bias is None else (neg_bias[g0:g1] if rows is None else neg_bias[g0:g1][rows])
            scores.mul_(inv_t)
            if bias_rows is not None:
                scores.sub_(bias_rows)
            if key_rows is not None:
                scores.masked_fill_(key_rows == pos_keys[start:stop].unsqueeze(1), MASKED_LOGIT)
            pos_c = pos_logits[start:stop]
            top = torch.maximum(scores.amax(1), pos_c) if scores.shape[1] else pos_c.clone()  # [c]
            scores.sub_(top.unsqueeze(1)).exp_()  # unnormalised weights
            pos_w = (pos_c - top).exp_()
            denom = scores.sum(1).add_(pos_w)
            total += (denom.log() + top - pos_c).sum(dtype=torch.float64)
            if not want_grad:
                continue
            # d(-log p_0)/d logit: softmax - onehot(0); chain through the 1/temperature scale.
            scale = inv_t / denom  # [c]
            weights = scores.mul_(scale.unsqueeze(1))  # [c, R] = softmax_r / temperature
            pos_coef = (pos_w * scale).sub_(inv_t).unsqueeze(1)  # [c, 1] = (softmax_0 - 1) / temperature
            grad_pos[start:stop] = pos_coef * qc
            gq = pos_coef * pos_vectors[start:stop]
            if shared:
                gq.addmm_(weights, shared_vectors)
                grad_shared.addmm_(weights.T, qc)
            elif dense:
                dense_w = scores.new_zeros(count, neg_vectors.shape[0]).scatter_add_(1, index, weights)  # [c, U]
                gq.addmm_(dense_w, neg_vectors)
                grad_neg.addmm_(dense_w.T, qc)
            else:
                parts_v = []
                if full:
                    w3 = weights[:full].view(nb, block, -1)
                    gq[:full] += torch.bmm(w3, vec[:nb]).view(full, dim)
                    parts_v.append(torch.bmm(w3.transpose(1, 2), qc[:full].view(nb, block, dim)))  # [nb, R, D]
                if full < count:
                    gq[full:] += weights[full:] @ vec[-1]
                    parts_v.append((weights[full:].T @ qc[full:]).unsqueeze(0))
                grad_vec = parts_v[0] if len(parts_v) == 1 else torch.cat(parts_v)
                grad_neg.index_add_(0, index.reshape(-1), grad_vec.reshape(-1, dim))
            grad_q[start:stop] = gq
        if want_grad and shared and neg_index is not None:
            grad_neg.index_add_(0, neg_index[0], grad_shared)
        inv_n = 1.0 / num_positions
        if want_grad:
            for g in (grad_q, grad_pos, grad_neg):
                g.mul_(inv_n)
            ctx.save_for_backward(grad_q, grad_pos, grad_neg)
        return (total * inv_n).to(query.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_q, grad_pos, grad_neg = ctx.saved_tensors
        return grad_q * grad_out, grad_pos * grad_out, grad_neg * grad_out, None, None, None, None, None, None, None


def sampled_softmax_nll(query: torch.Tensor, pos_vectors: torch.Tensor, neg_vectors: torch.Tensor,
                        neg_index: Optional[torch.Tensor], temperature: float, block: int = 1,
                        pos_keys: Optional[torch.Tensor] = None, neg_keys: Optional[torch.Tensor] = None,
                        neg_bias: Optional[torch.Tensor] = None, fused: bool = True) -> torch.Tensor:
    """Mean sampled-softmax NLL (module docstring); ``fused=False``: the plain reference.

    Args:
        query: ``[T, D]`` normalised queries.
        pos_vectors: ``[T, D]`` each position's positive (normalised).
        neg_vectors: ``[U, D]`` candidate vectors (normalised).
        neg_index: ``[G, R]`` rows of ``neg_vectors`` per group of positions (``G = T`` with
            ``block=1``, ``ceil(T / block)``, or 1: shared), or None: all of ``neg_vectors``, shared.
        temperature: divides the cosine similarities.
        block: positions per row of ``neg_index`` (ignored when there is one row).
        pos_keys: ``[T]`` and neg_keys: shaped like ``neg_index`` (``[1, U]`` without it): a
            negative whose key equals its position's key is masked to ``MASKED_LOGIT``.
        neg_bias: shaped like ``neg_keys``: subtracted from each negative logit (logQ).
    """
    if not fused:
        return reference_sampled_softmax_nll(query, pos_vectors, neg_vectors, neg_index, temperature, block,
                                             pos_keys, neg_keys, neg_bias)
    block = _check(query, pos_vectors, neg_vectors, neg_index, block)
    if query.shape[0] == 0:
        return query.sum() * 0.0
    want_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, pos_vectors, neg_vectors))
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return _FusedSampledSoftmax.apply(query, pos_vectors, neg_vectors, neg_index, pos_keys, neg_keys, neg_bias,
                                      float(temperature), int(block), want_grad)
