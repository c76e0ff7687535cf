"""Incremental HSTU attention: new tokens attend to a cached history plus the tokens appended
before them, with the same ``silu(q k^T + rab) v / n`` as :mod:`sidvid_rec.ops.hstu_attention`.

Decoding appends one token per *beam* at a time. A batch of ``B`` histories carries ``W``
beams each (rows ``R = B * W``, user-major: rows ``b * W .. b * W + W - 1`` belong to history
``b``), and all beams of one history append their token at the same position and time; so
the bias against the history's keys is one row ``[B, N]`` shared by the ``W`` beams, and the
scores against the history are one batched matmul ``[B, H, W, N]`` (never ``W`` copies of
the history). Keys of the appended tokens are per beam: ``[R, m, H * d]``.

The bias index is the one of :func:`~sidvid_rec.ops.hstu_attention.relative_bias_table`
(time bucket x relative distance), computed with the same arithmetic as the full attention
plan, so the incremental scores equal re-encoding's to float32 rounding. History rows past a
sequence's length (padding of the ``[B, N]`` cache) get the masked entry: ``silu`` of them is
exactly 0.
"""

from typing import Tuple

import torch
from torch import Tensor

from sidvid_rec.ops.jagged import TIME_BUCKET_DIVISOR


def bias_index(query_ts: Tensor, query_pos: Tensor, key_ts: Tensor, key_pos: Tensor, key_valid: Tensor,
               max_len: int, num_time_buckets: int) -> Tensor:
    """``[B, M]`` int64 index into the flat bias table for one query per history.

    Args:
        query_ts, query_pos: ``[B]`` time and position of the appended token of history ``b``.
        key_ts, key_pos: ``[B, M]`` time and position of the keys it attends to.
        key_valid: ``[B, M]`` bool; ``False`` keys get the masked entry.
    """
    # Same rounding as ops.hstu_attention._chunk_bias_index: exact float64 difference, float32 log.
    mag = (query_ts.to(torch.float64).unsqueeze(1) - key_ts.to(torch.float64)).to(torch.float32)
    bucket = mag.abs_().clamp_(min=1).log_().div_(TIME_BUCKET_DIVISOR).to(torch.int64).clamp_(max=num_time_buckets)
    dist = (query_pos.unsqueeze(1) - key_pos).clamp(0, max_len - 1)
    column = torch.where(key_valid & (key_pos <= query_pos.unsqueeze(1)), dist, torch.full_like(dist, max_len))
    return bucket * (2 * max_len) + column


def _heads(rows: Tensor, num_heads: int) -> Tensor:
    """``[..., n, H * d]`` -> ``[..., H, n, d]``."""
    *lead, n, width = rows.shape
    return rows.reshape(*lead, n, num_heads, width // num_heads).transpose(-3, -2)


def step_attention(q: Tensor, hist_k: Tensor, hist_v: Tensor, hist_bias: Tensor, step_k: Tensor, step_v: Tensor,
                   step_bias: Tensor, inv_scale: Tensor, num_heads: int) -> Tensor:
    """Attention output ``[R, H * dv]`` of one appended token per beam.

    Args:
        q: ``[R, H * dqk]`` queries (``R = B * W``, user-major).
        hist_k, hist_v: ``[B, N, H * dqk | H * dv]`` the histories' cached keys and values.
        hist_bias: ``[B, N]`` bias of the appended token against each history key (masked
            entries for padding).
        step_k, step_v: ``[R, m, H * dqk | H * dv]`` keys and values of the beam's appended
            tokens, the current one last (``m >= 1``).
        step_bias: ``[B, m]`` bias against them (shared by a history's beams).
        inv_scale: ``[B]`` ``1 / n`` with ``n`` the length re-encoding would divide by.
    """
    batch = hist_k.shape[0]
    beams = q.shape[0] // batch
    qh = _heads(q.view(batch, beams, -1), num_heads)  # [B, H, W, dqk]
    s_hist = torch.matmul(qh, _heads(hist_k, num_heads).transpose(-1, -2))  # [B, H, W, N]
    s_hist.add_(hist_bias.view(batch, 1, 1, -1))
    out_hist = torch.matmul(torch.nn.functional.silu(s_hist), _heads(hist_v, num_heads))  # [B, H, W, dv]
    out_hist = out_hist.transpose(1, 2).reshape(batch * beams, -1)  # [R, H * dv]
    q_step = _heads(q.unsqueeze(1), num_heads)  # [R, H, 1, dqk]
    s_step = torch.matmul(q_step, _heads(step_k, num_heads).transpose(-1, -2))  # [R, H, 1, m]
    s_step.add_(step_bias.repeat_interleave(beams, dim=0).view(batch * beams, 1, 1, -1))
    out_step = torch.matmul(torch.nn.functional.silu(s_step), _heads(step_v, num_heads))  # [R, H, 1, dv]
    out = out_hist + out_step.transpose(1, 2).reshape(batch * beams, -1)
    return out * inv_scale.repeat_interleave(beams).unsqueeze(1)


def pad_rows(rows: Tensor, offsets: Tensor, width: int) -> Tuple[Tensor, Tensor]:
    """Jagged ``rows [T, F]`` -> ``([B, width, F]`` zero-padded, ``[B, width]`` bool valid``)``."""
    lengths = offsets[1:] - offsets[:-1]
    cols = torch.arange(width, device=rows.device)
    valid = cols.unsqueeze(0) < lengths.unsqueeze(1)
    out = rows.new_zeros(lengths.numel(), width, *rows.shape[1:])
    out[valid] = rows
    return out, valid
