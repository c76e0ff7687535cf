"""Padded HSTU: the plain PyTorch reference of :class:`~sidvid_rec.modules.hstu.HSTUEncoder`.

Written the obvious way on padded ``[B, N, D]`` batches (full ``[B, H, N, N]`` attention,
bias gathered from full ``[B, N, N]`` index tensors, causal and padding masks multiplied in)
so that the jagged encoder can be checked against it. Same parameters and ``state_dict``
keys as the jagged encoder: ``load_state_dict`` works in both directions. Not used for
training; it is also the "padded" baseline of ``benchmarks/jagged_vs_padded.py``.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sidvid_rec.modules.hstu import L2_NORM_EPS, LAYER_NORM_EPS, AttentionScale
from sidvid_rec.ops.jagged import time_bucket


class PaddedRelativeBias(nn.Module):
    """``ts_w[bucket(query_ts[i] - ts[j])] + pos_w[pos[i] - pos[j]]`` as a ``[B, N, N]`` tensor."""

    def __init__(self, max_len: int, num_time_buckets: int) -> None:
        super().__init__()
        self._num_time_buckets = num_time_buckets
        self.ts_w = nn.Parameter(torch.empty(num_time_buckets + 1).normal_(std=0.02))
        self.pos_w = nn.Parameter(torch.empty(max_len).normal_(std=0.02))

    def forward(self, timestamps: Tensor, query_timestamps: Tensor, positions: Tensor) -> Tensor:
        """``[B, N]`` int64 each -> ``[B, N, N]`` float."""
        dist = (positions.unsqueeze(2) - positions.unsqueeze(1)).clamp(0, self.pos_w.numel() - 1)
        bucket = time_bucket(query_timestamps.unsqueeze(2) - timestamps.unsqueeze(1), self._num_time_buckets)
        return self.pos_w[dist] + self.ts_w[bucket]


class PaddedHSTULayer(nn.Module):
    """One HSTU layer on padded ``[B, N, D]``; same parameters as ``HSTULayer``."""

    def __init__(
        self,
        max_len: int,
        dim: int,
        num_heads: int,
        dqk: int,
        dv: int,
        dropout: float,
        attn_dropout: float,
        num_time_buckets: int,
    ) -> None:
        super().__init__()
        self._num_heads, self._dqk, self._dv = num_heads, dqk, dv
        self._dropout, self._attn_dropout = dropout, attn_dropout
        self.uvqk = nn.Parameter(torch.empty(dim, num_heads * (2 * dv + 2 * dqk)).normal_(std=0.02))
        self.o = nn.Linear(num_heads * dv, dim)
        nn.init.xavier_uniform_(self.o.weight)
        self.rel_bias = PaddedRelativeBias(max_len, num_time_buckets)

    def forward(self, x: Tensor, bias_inputs: tuple, mask: Tensor, scale: Tensor) -> Tensor:
        """``x [B, N, D]``; ``mask [B, N, N]`` (1 = attend); ``scale [B]`` (``1/n``)."""
        batch, n, _ = x.shape
        heads = self._num_heads
        normed = F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS)
        split = [heads * self._dv, heads * self._dv, heads * self._dqk, heads * self._dqk]
        u, v, q, k = torch.split(F.silu(normed @ self.uvqk), split, dim=-1)
        scores = torch.einsum(
            "bnhd,bmhd->bhnm", q.reshape(batch, n, heads, -1), k.reshape(batch, n, heads, -1)
        )  # [B, H, N, N]
        scores = scores + self.rel_bias(*bias_inputs).unsqueeze(1)
        attn = F.silu(scores) * scale.view(-1, 1, 1, 1) * mask.unsqueeze(1)
        attn = F.dropout(attn, p=self._attn_dropout, training=self.training)
        out = torch.einsum("bhnm,bmhd->bnhd", attn, v.reshape(batch, n, heads, -1)).reshape(batch, n, -1)
        gated = u * F.layer_norm(out, out.shape[-1:], eps=LAYER_NORM_EPS)
        return x + self.o(F.dropout(gated, p=self._dropout, training=self.training))


class PaddedHSTUEncoder(nn.Module):
    """Padded twin of :class:`~sidvid_rec.modules.hstu.HSTUEncoder` (same constructor)."""

    def __init__(
        self,
        max_len: int,
        dim: int,
        num_blocks: int,
        num_heads: int,
        dqk: int,
        dv: int,
        dropout: float,
        attn_dropout: float,
        num_time_buckets: int = 128,
        attention_scale: AttentionScale = "length",
    ) -> None:
        super().__init__()
        self.max_len, self.dim = max_len, dim
        self.attention_scale: AttentionScale = attention_scale
        self._dropout = dropout
        self.pos_emb = nn.Embedding(max_len, dim)
        std = math.sqrt(1.0 / dim)
        nn.init.trunc_normal_(self.pos_emb.weight, std=std, a=-2 * std, b=2 * std)
        self.layers = nn.ModuleList(
            PaddedHSTULayer(max_len, dim, num_heads, dqk, dv, dropout, attn_dropout, num_time_buckets)
            for _ in range(num_blocks)
        )

    def forward(
        self,
        x: Tensor,
        lengths: Tensor,
        timestamps: Tensor,
        positions: Optional[Tensor] = None,
        query_timestamps: Optional[Tensor] = None,
    ) -> Tensor:
        """Encodes a padded batch.

        Args:
            x: ``[B, N, D]`` item embeddings; rows ``>= lengths[b]`` are ignored.
            lengths: ``[B]`` true lengths (``<= N``).
            timestamps: ``[B, N]`` int64.
            positions: optional ``[B, N]``; default ``0 .. N-1``.
            query_timestamps: optional ``[B, N]``; default: the next item's timestamp, the
                last item's own timestamp at ``lengths[b] - 1``.

        Returns:
            ``[B, N, D]`` L2-normalised outputs, zero at padded rows.
        """
        batch, n, _ = x.shape
        steps = torch.arange(n, device=x.device)
        valid = steps.unsqueeze(0) < lengths.unsqueeze(1)  # [B, N]
        if positions is None:
            positions = steps.unsqueeze(0).expand(batch, n)
        if query_timestamps is None:
            nxt = torch.minimum(steps + 1, (lengths - 1).clamp(min=0).unsqueeze(1))  # [B, N]
            query_timestamps = torch.gather(timestamps, 1, nxt)
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=x.device))
        mask = (causal.unsqueeze(0) & valid.unsqueeze(1) & valid.unsqueeze(2)).to(x.dtype)
        if self.attention_scale == "length":
            scale = 1.0 / lengths.to(x.dtype).clamp(min=1)
        else:
            scale = torch.full_like(lengths, 1.0 / self.max_len, dtype=x.dtype)
        h = x * math.sqrt(self.dim) + self.pos_emb(positions)
        h = F.dropout(h, p=self._dropout, training=self.training)
        for layer in self.layers:
            h = layer(h, (timestamps, query_timestamps, positions), mask, scale)
        h = h / h.norm(dim=-1, keepdim=True).clamp(min=L2_NORM_EPS)
        return h * valid.unsqueeze(-1).to(h.dtype)
