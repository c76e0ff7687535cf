"""Jagged HSTU attention: ``silu(q k^T + rab) v / n`` under a causal mask, no batch padding.

Sequences are grouped into chunks of similar lengths (:func:`~sidvid_rec.ops.jagged.plan_length_chunks`)
and each chunk runs as dense batched matmuls, block-causally: its rows are cut into query blocks
of :data:`CAUSAL_BLOCK` rows and block ``[r0, r1)`` attends to keys ``[0, r1)`` only, so the
key blocks above the diagonal (all masked) are never computed (at width 200 and blocks of 64, the
kernel computes 65% of the ``[b, n, n]`` square). The relative attention bias
(time bucket x relative distance) and the causal mask are one gather from a small flat
table (:func:`relative_bias_table`) through an index built once per batch
(:func:`build_attention_plan`) and shared by every layer. The fused autograd function keeps
only the scores for backward; :func:`jagged_pointwise_attention` with ``fused=False`` runs the
same maths with plain autograd ops (the reference for the parity tests).

Shapes: jagged rows ``[T, H * d]`` with ``offsets [B+1]``; per chunk ``b`` sequences padded to
width ``n``; ``H`` heads.
"""

import contextlib
from dataclasses import dataclass
from typing import ContextManager, List, Optional, Tuple

import torch
from torch import Tensor

from sidvid_rec.ops.jagged import (
    DEFAULT_CHUNK_OVERHEAD,
    TIME_BUCKET_DIVISOR,
    ChunkPlan,
    plan_length_chunks,
)
from sidvid_rec.types import ATTENTION_BLOCK


CAUSAL_BLOCK: int = ATTENTION_BLOCK  # the default block (its reason: sidvid_rec.types)

# Bias of positions outside the causal mask: silu(s - 1e9) is exactly 0 in float32 and so
# is its gradient, which makes the mask free (it rides on the bias gather).
MASKED_BIAS: float = -1e9


def masked_bias(dtype: torch.dtype) -> float:
    """The mask bias in ``dtype``: :data:`MASKED_BIAS` where it is representable (float32,
    bfloat16), else half the dtype's largest magnitude (float16: -32752; -1e9 would overflow to
    -inf there and silu(-inf) = -inf * 0 = nan). silu of it is still exactly 0, and q k^T added
    to it cannot overflow."""
    return max(MASKED_BIAS, -0.5 * torch.finfo(dtype).max)


def autocast_off(device: torch.device) -> ContextManager:
    """Autocast disabled on ``device`` (the attention casts explicitly); a no-op context on a
    device type autocast does not know (e.g. ``meta``)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def compute_table(table: Tensor, dtype: torch.dtype) -> Tensor:
    """The flat bias table cast to the attention's compute dtype, its masked entries clamped
    to :func:`masked_bias` first (float32: unchanged; no overflow to -inf in float16)."""
    if table.dtype == dtype:
        return table
    return table.clamp(min=masked_bias(dtype)).to(dtype)


@dataclass
class AttentionPlan:
    """Per-batch attention metadata, built once and shared by every HSTU layer.

    ``blocks[c]``: the query blocks ``(r0, r1)`` of chunk ``c``; block ``(r0, r1)`` attends to
    the keys ``[0, r1)``. ``bias_index[c][j] [b, r1 - r0, r1]`` (int32) indexes the flat bias
    table of :func:`relative_bias_table` (time bucket x relative distance, or a masked entry)
    for block ``j``; ``row_scale[c] [b, 1, 1]`` is ``1 / n`` of each sequence (true length or
    ``max_len``).
    """

    layout: ChunkPlan
    blocks: List[List[Tuple[int, int]]]
    bias_index: List[List[Tensor]]
    row_scale: List[Tensor]

    def executed_area(self) -> int:
        """Attention-matrix elements the kernel computes (over every chunk's query blocks)."""
        return sum(c.num_seqs * (r1 - r0) * r1 for c, blocks in zip(self.layout.chunks, self.blocks)
                   for r0, r1 in blocks)


def query_blocks(width: int, block: int) -> List[Tuple[int, int]]:
    """Query blocks ``(r0, r1)`` of ``block`` rows covering ``[0, width)`` (one block: ``block <= 0``)."""
    if block <= 0 or width <= block:
        return [(0, width)]
    return [(r0, min(r0 + block, width)) for r0 in range(0, width, block)]


def relative_bias_table(time_weights: Tensor, position_weights: Tensor) -> Tensor:
    """Flat bias table ``[(K+1) * 2 * max_len]`` read by :class:`AttentionPlan` indices.

    Entry ``k * 2 * max_len + d`` is ``time_weights[k] + position_weights[d]`` for
    ``d < max_len`` and :data:`MASKED_BIAS` for ``d >= max_len`` (the keys after the query),
    so the causal mask costs no extra pass over the ``[b, n, n]`` blocks.

    Args:
        time_weights: ``[K+1]`` one scalar per time bucket.
        position_weights: ``[max_len]`` one scalar per relative distance ``i - j``.
    """
    pairs = time_weights.unsqueeze(1) + position_weights.unsqueeze(0)  # [K+1, max_len]
    return torch.cat([pairs, torch.full_like(pairs, MASKED_BIAS)], dim=1).reshape(-1)


def split_bias_index(index: Tensor, max_len: int) -> Tuple[Tensor, Tensor]:
    """Decodes a :class:`AttentionPlan` bias index into ``(time bucket, column)``.

    ``column < max_len`` is the relative distance ``pos[i] - pos[j]``; ``column >= max_len``
    marks a masked pair (key after the query). Use this instead of the table layout.
    """
    return torch.div(index, 2 * max_len, rounding_mode="floor"), torch.remainder(index, 2 * max_len)


def _relative_columns(rows: Tuple[int, int], n: int, max_len: int, device: torch.device) -> Tensor:
    """``[r1 - r0, n]`` int32 table column of ``(i, j)`` for query rows ``i in [r0, r1)``:
    ``min(i - j, max_len - 1)`` when ``j <= i``, else ``max_len`` (masked)."""
    steps = torch.arange(n, device=device, dtype=torch.int32)
    diff = steps[rows[0] : rows[1]].unsqueeze(1) - steps.unsqueeze(0)  # i - j
    return torch.where(diff >= 0, diff.clamp(max=max_len - 1), max_len)


def _chunk_bias_index(
    key_ts: Tensor,
    query_ts: Tensor,
    pos: Optional[Tensor],
    max_len: int,
    num_time_buckets: int,
    rows: Optional[Tuple[int, int]] = None,
) -> Tensor:
    """``[b, r1 - r0, r1]`` int32 bias-table index of one chunk's query block ``rows = (r0, r1)``
    (default: the whole chunk, ``[b, n, n]``) against its keys ``[0, r1)``
    (``key_ts, query_ts, pos: [b, n]``)."""
    r0, r1 = rows if rows is not None else (0, key_ts.shape[1])
    b = key_ts.shape[0]
    # time_bucket() inlined with one float32 buffer (fresh [b, n, n] allocations cost page
    # faults): float64 holds the integer difference exactly, and writing it to float32
    # rounds it exactly like the reference's int64 -> float32 conversion.
    mag = torch.empty(b, r1 - r0, r1, dtype=torch.float32, device=key_ts.device)
    torch.sub(query_ts[:, r0:r1].to(torch.float64).unsqueeze(2), key_ts[:, :r1].to(torch.float64).unsqueeze(1),
              out=mag)
    mag.abs_().clamp_(min=1).log_().div_(TIME_BUCKET_DIVISOR)
    bucket = mag.to(torch.int32).clamp_(max=num_time_buckets)
    del mag
    columns = _relative_columns((r0, r1), r1, max_len, key_ts.device)  # [r1 - r0, r1]
    index = bucket.mul_(2 * max_len)
    if pos is None:
        return index.add_(columns)
    dist = (pos[:, r0:r1].unsqueeze(2) - pos[:, :r1].unsqueeze(1)).clamp_(0, max_len - 1).to(torch.int32)
    return index.add_(dist.masked_fill_(columns == max_len, max_len))


def build_attention_plan(
    offsets: Tensor,
    timestamps: Tensor,
    query_timestamps: Tensor,
    positions: Optional[Tensor],
    max_len: int,
    num_time_buckets: int,
    scale_by_length: bool,
    overhead: float = DEFAULT_CHUNK_OVERHEAD,
    host_offsets: Optional[Tensor] = None,
    scale_lengths: Optional[Tensor] = None,
    causal_block: int = CAUSAL_BLOCK,
) -> AttentionPlan:
    """Chunks the batch and precomputes each chunk's bias index and ``1/n`` scale.

    The chunking is host-side metadata: it reads ``host_offsets`` (the same offsets on the CPU)
    when given, else copies ``offsets`` to the CPU (a host sync when they are on a GPU).

    Args:
        offsets: ``[B+1]``.
        timestamps: ``[T]`` int64 key timestamps (item ``j``'s time).
        query_timestamps: ``[T]`` int64 query times; ``dt = query_timestamps[i] - timestamps[j]``.
        positions: optional ``[T]`` positions for the relative distance ``pos[i] - pos[j]``;
            ``None`` = index within the sequence (no pairwise work needed for it).
        scale_by_length: divide by each sequence's true length, else by ``max_len``.
        scale_lengths: optional ``[B]`` lengths to divide by instead of the true ones (with
            ``scale_by_length``): a history encoded for incremental decoding divides by the
            length it will have once the decoded tokens are appended, as re-encoding would.
        causal_block: query rows per block of the block-causal kernel; ``0`` = whole chunks
            (the full ``[b, n, n]`` square, masked above the diagonal).
    """
    layout = plan_length_chunks(offsets, overhead, host_offsets=host_offsets)
    rows = layout.gather_rows
    key_rows, query_rows = timestamps.index_select(0, rows), query_timestamps.index_select(0, rows)
    pos_rows = None if positions is None else positions.index_select(0, rows).to(torch.int32)
    blocks, bias_index, row_scale = [], [], []
    for chunk in layout.chunks:
        span = slice(chunk.row_begin, chunk.row_begin + chunk.num_seqs * chunk.width)
        shape = (chunk.num_seqs, chunk.width)
        pos = None if pos_rows is None else pos_rows[span].view(shape)
        keys, queries = key_rows[span].view(shape), query_rows[span].view(shape)
        blocks.append(query_blocks(chunk.width, causal_block))
        bias_index.append([_chunk_bias_index(keys, queries, pos, max_len, num_time_buckets, block)
                           for block in blocks[-1]])
        if scale_by_length:
            lengths = chunk.lengths if scale_lengths is None else scale_lengths.to(chunk.seq_ids.device)[chunk.seq_ids]
            denom = lengths.to(torch.float32)
        else:
            denom = torch.full(shape[:1], float(max_len), device=chunk.lengths.device)
        row_scale.append(denom.to(timestamps.device).reciprocal().view(-1, 1, 1))
    return AttentionPlan(layout, blocks, bias_index, row_scale)


def _heads(rows: Tensor, num_seqs: int, width: int, num_heads: int) -> Tensor:
    """``[b * n, H * d]`` rows -> ``[b * H, n, d]`` (a view when ``H == 1``)."""
    if num_heads == 1:
        return rows.view(num_seqs, width, -1)
    per_head = rows.shape[1] // num_heads
    return rows.reshape(num_seqs, width, num_heads, per_head).transpose(1, 2).reshape(-1, width, per_head)


def _unheads(x: Tensor, num_seqs: int, num_heads: int) -> Tensor:
    """``[b * H, n, d]`` -> ``[b, n, H * d]``."""
    if num_heads == 1:
        return x
    width, per_head = x.shape[1], x.shape[2]
    return x.view(num_seqs, num_heads, width, per_head).transpose(1, 2).reshape(num_seqs, width, -1)


def _scores(q: Tensor, k: Tensor, bias: Tensor, num_seqs: int, num_heads: int) -> Tensor:
    """``q k^T + bias`` as ``[b * H, n, n]``; ``bias [b, n, n]`` is shared by the heads."""
    if num_heads == 1:
        return torch.baddbmm(bias, q, k.transpose(1, 2))
    s = torch.bmm(q, k.transpose(1, 2))
    s.view(num_seqs, num_heads, *s.shape[1:]).add_(bias.unsqueeze(1))
    return s


def _repeat_scale(scale: Tensor, num_heads: int) -> Tensor:
    """``[b, 1, 1]`` -> ``[b * H, 1, 1]``."""
    return scale if num_heads == 1 else scale.repeat_interleave(num_heads, dim=0)


def _head_major_grad(rows: Tensor, num_seqs: int, width: int, num_heads: int) -> Tensor:
    """A zeroed ``[b * H, n, d]`` gradient accumulator for the padded rows ``[b * n, H * d]``:
    a view of them when ``H == 1``, else a buffer that :func:`_store_grad` copies back."""
    if num_heads == 1:
        return rows.view(num_seqs, width, -1).zero_()
    return rows.new_zeros(num_seqs * num_heads, width, rows.shape[1] // num_heads)


def _store_grad(grad: Tensor, rows: Tensor, num_seqs: int, num_heads: int) -> None:
    """Writes a :func:`_head_major_grad` accumulator back into its rows (a no-op for one head)."""
    if num_heads > 1:
        rows.view(num_seqs, grad.shape[1], -1).copy_(_unheads(grad, num_seqs, num_heads))


class _PointwiseAttention(torch.autograd.Function):
    """Fused ``silu(q k^T + bias) v / n`` over all chunks, jagged rows in and out.

    Each chunk runs block-causally (:class:`AttentionPlan` ``blocks``): query block ``(r0, r1)``
    against keys ``[0, r1)``. Saves only the padded q, k, v rows and each block's scores. Padded
    rows (past a sequence's end) get exactly zero gradient (they are masked as keys and unused as
    queries), so the backward reads each jagged row's gradient from its own padded row instead of
    scatter-adding the duplicates.
    """

    @staticmethod
    def forward(ctx, q, k, v, table, plan, num_heads):  # type: ignore[override]
        # Explicit dtypes, autocast off: everything runs in q's dtype (float32, or bfloat16 when
        # the encoder runs under bf16 autocast), the bias table cast to it with a safe mask value.
        with autocast_off(q.device):
            return _PointwiseAttention._forward(ctx, q, k, v, table, plan, num_heads)

    @staticmethod
    def _forward(ctx, q, k, v, table, plan, num_heads):  # type: ignore[no-untyped-def]
        dtype = q.dtype
        k, v = k.to(dtype), v.to(dtype)
        table_c = compute_table(table, dtype)
        gather, scatter = plan.layout.gather_rows, plan.layout.scatter_rows
        q_rows, k_rows, v_rows = (t.index_select(0, gather) for t in (q, k, v))  # [P, H*d]
        out_rows = v_rows.new_empty(v_rows.shape)
        keep_scores = any(ctx.needs_input_grad[:4])  # inference keeps one block's scores at a time
        saved_scores = []
        for c, chunk in enumerate(plan.layout.chunks):
            b, n = chunk.num_seqs, chunk.width
            span = slice(chunk.row_begin, chunk.row_begin + b * n)
            qc, kc, vc = (_heads(r[span], b, n, num_heads) for r in (q_rows, k_rows, v_rows))
            out = out_rows[span].view(b, n, -1)
            for (r0, r1), index in zip(plan.blocks[c], plan.bias_index[c]):
                bias = table_c.index_select(0, index.view(-1)).view(b, r1 - r0, r1)
                s = _scores(qc[:, r0:r1], kc[:, :r1], bias, b, num_heads)  # [b*H, r1 - r0, r1]
                # reuse buffers: fresh [b, n, n] allocations cost page faults on CPU
                a = torch.ops.aten.silu.out(s, out=bias) if num_heads == 1 else torch.nn.functional.silu(s)
                del bias
                out[:, r0:r1] = _unheads(torch.bmm(a, vc[:, :r1]), b, num_heads)
                del a
                if keep_scores:
                    saved_scores.append(s)
            out.mul_(plan.row_scale[c].to(dtype))
        # saved tensors (not ctx attributes) are freed right after backward
        indices = [index for per_chunk in plan.bias_index for index in per_chunk]
        ctx.save_for_backward(q_rows, k_rows, v_rows, table, *indices, *saved_scores)
        ctx.layout, ctx.blocks, ctx.row_scale, ctx.num_heads = plan.layout, plan.blocks, plan.row_scale, num_heads
        return out_rows.index_select(0, scatter)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        with autocast_off(grad_out.device):
            return _PointwiseAttention._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        q_rows, k_rows, v_rows, table, *rest = ctx.saved_tensors
        dtype = q_rows.dtype
        grad_out = grad_out.to(dtype)
        layout, heads = ctx.layout, ctx.num_heads
        num_blocks = sum(len(blocks) for blocks in ctx.blocks)
        bias_index, scores = iter(rest[:num_blocks]), iter(rest[num_blocks:])
        scatter = layout.scatter_rows
        grad_rows = grad_out.new_zeros(v_rows.shape).index_copy_(0, scatter, grad_out.contiguous())
        grads = [torch.empty_like(r) for r in (q_rows, k_rows, v_rows)]
        grad_table = torch.zeros_like(table)
        for c, chunk in enumerate(layout.chunks):
            b, n = chunk.num_seqs, chunk.width
            span = slice(chunk.row_begin, chunk.row_begin + b * n)
            qc, kc, vc = (_heads(r[span], b, n, heads) for r in (q_rows, k_rows, v_rows))
            g = _heads(grad_rows[span], b, n, heads) * _repeat_scale(ctx.row_scale[c], heads).to(dtype)  # [bH, n, dv]
            dq, dk, dv = (_head_major_grad(gr[span], b, n, heads) for gr in grads)
            for r0, r1 in ctx.blocks[c]:
                s, index, g_block = next(scores), next(bias_index), g[:, r0:r1]
                a = torch.nn.functional.silu(s)
                dv[:, :r1].baddbmm_(a.transpose(1, 2), g_block)
                grad_s = torch.bmm(g_block, vc[:, :r1].transpose(1, 2), out=a)  # dA, in a's buffer
                torch.ops.aten.silu_backward.grad_input(grad_s, s, grad_input=grad_s)  # dS, in place
                dq[:, r0:r1].baddbmm_(grad_s, kc[:, :r1])
                dk[:, :r1].baddbmm_(grad_s.transpose(1, 2), qc[:, r0:r1])
                grad_bias = grad_s if heads == 1 else grad_s.view(b, heads, r1 - r0, r1).sum(1)
                # index_add_, not bincount: a weighted bincount on CUDA reads its input's maximum
                # back to the host (a sync per block and layer); sums accumulate in the table's dtype.
                grad_table.index_add_(0, index.view(-1), grad_bias.reshape(-1).to(grad_table.dtype))
            for grad, gr in zip((dq, dk, dv), grads):
                _store_grad(grad, gr[span], b, heads)
        grad_q, grad_k, grad_v = (gr.index_select(0, scatter) for gr in grads)
        return grad_q, grad_k, grad_v, grad_table, None, None


def _chunk_bias(table: Tensor, plan: AttentionPlan, c: int) -> Tensor:
    """The whole ``[b, n, n]`` bias of chunk ``c`` (masked above the diagonal), assembled from
    its query blocks: what the plain reference adds to every score."""
    chunk = plan.layout.chunks[c]
    n = chunk.width
    # the table's last entry (last time bucket, column 2 * max_len - 1) is a masked one
    full = table[-1].expand(chunk.num_seqs, n, n).clone()
    for (r0, r1), index in zip(plan.blocks[c], plan.bias_index[c]):
        full[:, r0:r1, :r1] = table[index.long()]
    return full


def _pointwise_attention_autograd(
    q_rows: Tensor,
    k_rows: Tensor,
    v_rows: Tensor,
    table: Tensor,
    plan: AttentionPlan,
    num_heads: int,
    attn_dropout: float,
    training: bool,
) -> Tensor:
    """Same maths as :class:`_PointwiseAttention` with plain autograd ops over each chunk's whole
    ``[b, n, n]`` square (and attention dropout)."""
    outs = []
    dtype = q_rows.dtype
    k_rows, v_rows = k_rows.to(dtype), v_rows.to(dtype)
    table = compute_table(table, dtype)
    for c, chunk in enumerate(plan.layout.chunks):
        b, n = chunk.num_seqs, chunk.width
        span = slice(chunk.row_begin, chunk.row_begin + b * n)
        q, k, v = (_heads(r[span], b, n, num_heads) for r in (q_rows, k_rows, v_rows))
        a = torch.nn.functional.silu(_scores(q, k, _chunk_bias(table, plan, c), b, num_heads))
        a = torch.nn.functional.dropout(a, p=attn_dropout, training=training)
        o = torch.bmm(a, v) * _repeat_scale(plan.row_scale[c], num_heads).to(dtype)
        outs.append(_unheads(o, b, num_heads).reshape(b * n, -1))
    return torch.cat(outs, dim=0)


def jagged_pointwise_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor,
    plan: AttentionPlan,
    num_heads: int,
    attn_dropout: float = 0.0,
    training: bool = False,
    fused: bool = True,
) -> Tensor:
    """HSTU attention ``silu(q k^T + rab) v / n`` under a causal mask, on jagged rows.

    Args:
        q, k: ``[T, H * dqk]``; v: ``[T, H * dv]`` (jagged rows, ``T = offsets[-1]``).
        table: flat bias table of :func:`relative_bias_table` (differentiable).
        plan: the batch's :class:`AttentionPlan`.
        attn_dropout: dropout on the attention weights (uses the unfused path when active).
        fused: use the fused autograd function (saves only the scores); ``False`` = plain ops.

    Returns:
        ``[T, H * dv]`` jagged rows.
    """
    if fused and not (training and attn_dropout > 0):
        return _PointwiseAttention.apply(q, k, v, table, plan, num_heads)
    rows = plan.layout.gather_rows
    with autocast_off(q.device):  # explicit dtypes, as the fused path
        out_rows = _pointwise_attention_autograd(
            q[rows], k[rows], v[rows], table, plan, num_heads, attn_dropout, training
        )
    return out_rows[plan.layout.scatter_rows]
