"""Jagged HSTU encoder (Zhai et al., "Actions Speak Louder than Words", ICML'24).

Follows the research HSTU of meta-recsys/generative-recommenders:

* input: ``x * sqrt(d) + pos_emb(position)``, dropout;
* each layer: ``u, v, q, k = split(silu(LN(x) @ W_uvqk))`` (LayerNorm without affine,
  eps 1e-6, no bias on ``W_uvqk``),
  ``A = silu(q k^T + rab) / n`` under a causal mask inside each sequence,
  ``x = x + W_o(dropout(u * LN(A v)))``;
* final L2 normalisation (eps 1e-6).

Relative attention bias ``rab`` (one per layer): a learned scalar per relative distance
``pos[i] - pos[j]`` (``0 .. max_len - 1``) plus a learned scalar per time bucket
``clamp(floor(ln(max(|dt|, 1)) / 0.301), 0, num_time_buckets)`` with
``dt = query_ts[i] - ts[j]``. The reference uses the *next* item's timestamp as
``query_ts[i]`` (the target's timestamp for a sequence's last item); that is the default here
(:func:`~sidvid_rec.ops.jagged.next_timestamps`), with the last item's own timestamp when no
target time is passed.

Normaliser ``n`` (``attention_scale``): ``"length"`` divides by each sequence's true length;
``"max_len"`` by the fixed ``max_len``. The reference divides by its padded length (211 for
ML-1M), i.e. a constant like ``"max_len"``.

Sequences are never padded to the batch maximum: attention
(:mod:`sidvid_rec.ops.hstu_attention`) runs per chunk of similar-length sequences
(:func:`~sidvid_rec.ops.jagged.plan_length_chunks`); all other ops act on the jagged rows
``[T, D]``. Relative distances at or beyond ``max_len`` (possible only with explicit
``positions``) share the last distance weight. :mod:`sidvid_rec.modules.hstu_reference` is the padded reference with
the same parameters (same ``state_dict`` keys).

Incremental decoding (:meth:`HSTUEncoder.encode_cached`, :meth:`HSTUEncoder.extend`): the
history is encoded once, keeping every layer's keys and values (:class:`HistoryCache`); then
each step appends one token per beam, which attends to the history and to its beam's earlier
tokens (:class:`StepCache`, reordered as beams are pruned) with the same relative bias
(:mod:`sidvid_rec.ops.hstu_cached`). HSTU's ``"length"`` normaliser depends on the whole
sequence, so the history is encoded for its *final* length (``appended`` tokens to come): the
history's outputs, keys and values, and every appended token's, are those of re-encoding the
whole sequence (``tests/test_hstu_cache.py``).
"""

import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sidvid_rec.errors import ConfigError, DataError
from sidvid_rec.ops import hstu_attention, hstu_cached, jagged
from sidvid_rec.types import AttentionScale, Precision

LAYER_NORM_EPS: float = 1e-6
L2_NORM_EPS: float = 1e-6


def autocast_dtype(precision: Precision) -> Optional[torch.dtype]:
    """The autocast dtype of ``precision`` (``bf16`` -> bfloat16; ``fp32``/``tf32`` -> None: no autocast)."""
    if precision not in ("fp32", "tf32", "bf16"):
        raise ConfigError(f"train.precision must be fp32, tf32 or bf16, got {precision!r}")
    return torch.bfloat16 if precision == "bf16" else None


def set_matmul_precision(precision: Precision) -> None:
    """TF32 matmuls on CUDA for ``tf32``, off otherwise (torch's default); no effect on the CPU."""
    autocast_dtype(precision)  # validates
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"


def fast_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout like ``F.dropout``, from a uniform draw (~3x faster than its
    ``bernoulli_`` on CPU; a different random stream)."""
    if not training or p == 0.0:
        return x
    keep = torch.rand_like(x).ge_(p).mul_(1.0 / (1.0 - p))
    return x * keep


class RelativeBias(nn.Module):
    """Learned relative attention bias: ``ts_w[time bucket] + pos_w[relative distance]``.

    Parameters: ``ts_w [num_time_buckets + 1]``, ``pos_w [max_len]`` (std 0.02 normal init,
    as in the reference; the reference stores ``2 * max_len - 1`` distance weights of which
    a causal model reads only ``max_len``).
    """

    def __init__(self, max_len: int, num_time_buckets: int) -> None:
        super().__init__()
        self.ts_w = nn.Parameter(torch.empty(num_time_buckets + 1).normal_(std=0.02))
        self.pos_w = nn.Parameter(torch.empty(max_len).normal_(std=0.02))

    def table(self) -> Tensor:
        """Flat bias table ``[(K+1) * 2 * max_len]`` read through the batch's attention plan."""
        return hstu_attention.relative_bias_table(self.ts_w, self.pos_w)


class HSTULayer(nn.Module):
    """One HSTU layer on jagged rows ``[T, D]``.

    Parameters: ``uvqk [D, H*(2*dv + 2*dqk)]`` (columns ``u | v | q | k``), ``o`` (Linear
    ``H*dv -> D`` with bias), ``rel_bias`` (:class:`RelativeBias`).
    """

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
        self._num_heads = num_heads
        self._split = [num_heads * dv, num_heads * dv, num_heads * dqk, num_heads * dqk]
        self._dropout = dropout
        self._attn_dropout = attn_dropout
        self.uvqk = nn.Parameter(torch.empty(dim, sum(self._split)).normal_(std=0.02))
        self.o = nn.Linear(num_heads * dv, dim)
        nn.init.xavier_uniform_(self.o.weight)
        self.rel_bias = RelativeBias(max_len, num_time_buckets)

    def _uvqk(self, x: Tensor) -> List[Tensor]:
        normed = F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS)
        return list(torch.split(F.silu(normed @ self.uvqk), self._split, dim=1))  # [T, H*dv|dqk]

    def _output(self, x: Tensor, u: Tensor, attn: Tensor) -> Tensor:
        gated = u * F.layer_norm(attn, attn.shape[-1:], eps=LAYER_NORM_EPS)
        return x + self.o(fast_dropout(gated, self._dropout, self.training))

    def forward(self, x: Tensor, plan: hstu_attention.AttentionPlan, fused: bool = True,
                kv: Optional[List[Tuple[Tensor, Tensor]]] = None) -> Tensor:
        """``x [T, D]`` -> ``[T, D]``; ``plan`` is the batch's shared attention plan. With
        ``kv`` (a list) this layer's keys and values ``[T, H*dqk]``, ``[T, H*dv]`` are appended to it."""
        u, v, q, k = self._uvqk(x)
        attn = hstu_attention.jagged_pointwise_attention(
            q, k, v, self.rel_bias.table(), plan, self._num_heads,
            attn_dropout=self._attn_dropout, training=self.training, fused=fused,
        )  # [T, H*dv]
        if kv is not None:
            kv.append((k, v))
        return self._output(x, u, attn)

    def step(self, x: Tensor, hist_k: Tensor, hist_v: Tensor, hist_index: Tensor, prev_k: Optional[Tensor],
             prev_v: Optional[Tensor], step_index: Tensor, inv_scale: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """One appended token per beam (``x [R, D]``) against the cached history and the beam's
        earlier tokens (``prev_k``, ``prev_v [R, m-1, ...]`` or ``None``); bias indices
        ``hist_index [B, N]``, ``step_index [B, m]``. Returns ``(out [R, D], keys, values [R, m, ...])``."""
        u, v, q, k = self._uvqk(x)
        step_k = k.unsqueeze(1) if prev_k is None else torch.cat([prev_k, k.unsqueeze(1)], dim=1)
        step_v = v.unsqueeze(1) if prev_v is None else torch.cat([prev_v, v.unsqueeze(1)], dim=1)
        table = self.rel_bias.table()
        attn = hstu_cached.step_attention(q, hist_k, hist_v, table[hist_index], step_k, step_v, table[step_index],
                                          inv_scale, self._num_heads)
        return self._output(x, u, attn), step_k, step_v


def _l2(h: Tensor) -> Tensor:
    return h / h.norm(dim=-1, keepdim=True).clamp(min=L2_NORM_EPS)


@dataclass
class HistoryCache:
    """Per-layer keys and values of encoded histories (:meth:`HSTUEncoder.encode_cached`),
    padded to the longest: ``keys[l] [B, N, H*dqk]``, ``values[l] [B, N, H*dv]``; ``valid``,
    ``timestamps``, ``positions [B, N]``; ``inv_scale [B]`` the attention's ``1 / n``; ``room``:
    tokens each sequence may still receive."""

    keys: List[Tensor]
    values: List[Tensor]
    valid: Tensor
    timestamps: Tensor
    positions: Tensor
    inv_scale: Tensor
    room: int


@dataclass
class StepCache:
    """Keys and values of the tokens appended so far by :meth:`HSTUEncoder.extend`, per beam:
    ``keys[l] [R, m, H*dqk]``, ``values[l] [R, m, H*dv]`` (``R = B * W`` user-major);
    ``timestamps``, ``positions [B, m]`` (shared by a history's beams)."""

    keys: List[Tensor]
    values: List[Tensor]
    timestamps: Tensor
    positions: Tensor

    def select(self, rows: Tensor) -> "StepCache":
        """The cache of beams ``rows [R']`` (indices into the current ``R`` rows, user-major,
        the same number per history): what a beam search keeps after pruning."""
        return StepCache([k[rows] for k in self.keys], [v[rows] for v in self.values], self.timestamps,
                         self.positions)


@dataclass
class HSTUParams:
    """The hyperparameters of an :class:`HSTUEncoder` (its constructor's arguments), in one place:
    built from the config by ``models/build.py``, recorded in an export's manifest (dropouts
    left out: an export only infers) and read back by the serving side."""

    max_len: int
    dim: int
    num_blocks: int
    num_heads: int
    dqk: int
    dv: int
    dropout: float = 0.0
    attn_dropout: float = 0.0
    num_time_buckets: int = 128
    attention_scale: AttentionScale = "length"

    def inference_dict(self) -> dict:
        """Every field but the dropouts (what an export records)."""
        return {k: v for k, v in asdict(self).items() if k not in ("dropout", "attn_dropout")}


class HSTUEncoder(nn.Module):
    """Stack of :class:`HSTULayer` over jagged sequences; one L2-normalised output per input.

    Args:
        max_len: longest sequence (tokens) accepted; size of the position tables.
        dim: model width ``d`` (= item embedding width).
        num_blocks: layers.
        num_heads: attention heads ``H``.
        dqk, dv: query/key and value width per head.
        dropout: dropout of the input embeddings and of each layer's output branch.
        attn_dropout: dropout on the attention weights (the reference ignores its own; 0 is
            the fast path).
        num_time_buckets: time buckets ``K`` (``K + 1`` weights per layer).
        attention_scale: ``"length"`` divides attention by each sequence's true length,
            ``"max_len"`` by the constant ``max_len``.

    Example::

        enc = HSTUEncoder(max_len=200, dim=50, num_blocks=2, num_heads=1, dqk=50, dv=50,
                          dropout=0.2, attn_dropout=0.0)
        out = enc(item_emb, offsets, timestamps)   # [T, 50]
        last = out[offsets[1:] - 1]                # [B, 50] user states
    """

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
        if attention_scale not in ("length", "max_len"):
            raise ConfigError(f"attention_scale must be 'length' or 'max_len', got {attention_scale!r}")
        self.params = HSTUParams(max_len, dim, num_blocks, num_heads, dqk, dv, dropout, attn_dropout,
                                 num_time_buckets, attention_scale)
        self.max_len = max_len
        self.dim = dim
        self.num_time_buckets = num_time_buckets
        self.attention_scale: AttentionScale = attention_scale
        self._dropout = dropout
        self.fused = True
        """Use the fused attention kernel (``False``: plain autograd ops, for checks)."""
        self.chunk_overhead: float = jagged.DEFAULT_CHUNK_OVERHEAD
        """Per-chunk cost used to group sequences by length (see ``plan_length_chunks``)."""
        self.causal_block: int = hstu_attention.CAUSAL_BLOCK
        """Query rows per block of the block-causal attention kernel (``0``: whole chunks)."""
        self.precision: Precision = "fp32"
        """``bf16``: the layers run under bfloat16 autocast (inputs, plan and output stay float32;
        the attention casts explicitly); ``fp32``/``tf32``: float32 (TF32 is a global matmul switch,
        :func:`set_matmul_precision`). Set by the model builder from ``train.precision``."""
        self.pos_emb = nn.Embedding(max_len, dim)
        std = math.sqrt(1.0 / dim)  # the reference's truncated normal (at 2 std)
        nn.init.trunc_normal_(self.pos_emb.weight, std=std, a=-2 * std, b=2 * std)
        self.layers = nn.ModuleList(
            HSTULayer(max_len, dim, num_heads, dqk, dv, dropout, attn_dropout, num_time_buckets)
            for _ in range(num_blocks)
        )

    @classmethod
    def from_params(cls, p: HSTUParams) -> "HSTUEncoder":
        return cls(p.max_len, p.dim, p.num_blocks, p.num_heads, p.dqk, p.dv, p.dropout, p.attn_dropout,
                   p.num_time_buckets, p.attention_scale)

    def last_states(self, x: Tensor, offsets: Tensor, timestamps: Tensor, target_timestamps: Tensor,
                    host_offsets: Optional[Tensor] = None) -> Tensor:
        """``[B, D]`` state after each sequence's last item, every row querying with the next
        item's time and the last one with the target's ``target_timestamps [B]`` (the
        reference's evaluation): what scores the candidates of the next item."""
        query = jagged.next_timestamps(timestamps, offsets, last=target_timestamps)
        return self(x, offsets, timestamps, query_timestamps=query, host_offsets=host_offsets)[offsets[1:] - 1]

    def forward(
        self,
        x: Tensor,
        offsets: Tensor,
        timestamps: Tensor,
        positions: Optional[Tensor] = None,
        query_timestamps: Optional[Tensor] = None,
        host_offsets: Optional[Tensor] = None,
    ) -> Tensor:
        """Encodes a jagged batch.

        Args:
            x: ``[T, D]`` item embeddings (already looked up), jagged rows.
            offsets: ``[B+1]`` int64.
            timestamps: ``[T]`` int64 (seconds), each row's own time (the keys' time).
            positions: optional ``[T]`` int64 absolute positions (``< max_len``) for the
                position embedding and the relative distance; default: index within the
                sequence. COBRA passes its own (two tokens per item).
            query_timestamps: optional ``[T]`` int64 time of each query row for the time
                bias; default ``next_timestamps(timestamps, offsets)`` (next item's time,
                the last item's own time at the end). To match the reference exactly pass
                ``next_timestamps(timestamps, offsets, last=target_timestamps)``. COBRA
                passes its own (a SID/VID pair shares one time).
            host_offsets: optional ``offsets`` on the CPU (a batch keeps them): the length
                checks and the attention's chunking read them, so offsets on a GPU are never
                copied back to the host. Without them, offsets on a GPU cost one copy.

        Returns:
            ``[T, D]`` L2-normalised outputs; row ``offsets[b+1] - 1`` is sequence ``b``'s state.
        """
        host = jagged.host_offsets_of(offsets, host_offsets)  # the CPU copy, read once
        self._check_inputs(x, offsets, timestamps, positions, query_timestamps, host)
        return self._encode(x, offsets, timestamps, positions, query_timestamps, host=host)

    def _encode(self, x: Tensor, offsets: Tensor, timestamps: Tensor, positions: Optional[Tensor],
                query_timestamps: Optional[Tensor], scale_lengths: Optional[Tensor] = None,
                kv: Optional[List[Tuple[Tensor, Tensor]]] = None, host: Optional[Tensor] = None) -> Tensor:
        if query_timestamps is None:
            query_timestamps = jagged.next_timestamps(timestamps, offsets)
        plan = hstu_attention.build_attention_plan(
            offsets, timestamps, query_timestamps, positions, self.max_len, self.num_time_buckets,
            scale_by_length=self.attention_scale == "length", overhead=self.chunk_overhead, host_offsets=host,
            scale_lengths=scale_lengths, causal_block=self.causal_block,
        )
        if positions is None:
            positions = jagged.index_within_sequence(offsets, x.shape[0])
        h = x * math.sqrt(self.dim) + self.pos_emb(positions)
        h = fast_dropout(h, self._dropout, self.training)
        dtype = autocast_dtype(self.precision)
        if dtype is not None and h.device.type in ("cpu", "cuda"):
            with torch.autocast(h.device.type, dtype=dtype):
                for layer in self.layers:
                    h = layer(h, plan, fused=self.fused, kv=kv)
            h = h.float()
        else:
            for layer in self.layers:
                h = layer(h, plan, fused=self.fused, kv=kv)
        return _l2(h)

    # -- incremental decoding (inference only: no dropout)

    def encode_cached(self, x: Tensor, offsets: Tensor, timestamps: Tensor, positions: Optional[Tensor] = None,
                      query_timestamps: Optional[Tensor] = None, appended: int = 1) -> Tuple[Tensor, "HistoryCache"]:
        """Encodes histories once for incremental decoding: ``(out [T, D], cache)``.

        Same arguments and outputs as :meth:`forward`, plus ``appended``: how many tokens each
        sequence will get through :meth:`extend`. With ``attention_scale="length"`` every row
        divides by ``length + appended``, the length re-encoding the history with those tokens
        would divide by, so the history's outputs, keys and values are the re-encoding's.
        Pass the ``query_timestamps`` re-encoding would use (the last history row queries
        with the first appended token's time).
        """
        host = jagged.host_offsets_of(offsets)
        self._check_inputs(x, offsets, timestamps, positions, query_timestamps, host)
        lengths = jagged.offsets_to_lengths(offsets)
        if appended < 0 or (positions is None and int(lengths.max()) + appended > self.max_len):
            raise DataError(f"cannot append {appended} tokens to {int(lengths.max())} within max_len={self.max_len}")
        kv: List[Tuple[Tensor, Tensor]] = []
        out = self._encode(x, offsets, timestamps, positions, query_timestamps, lengths + appended, kv, host)
        if positions is None:
            positions = jagged.index_within_sequence(offsets, x.shape[0])
        width = int(lengths.max())
        keys = [hstu_cached.pad_rows(k, offsets, width)[0] for k, _ in kv]
        values = [hstu_cached.pad_rows(v, offsets, width)[0] for _, v in kv]
        ts, valid = hstu_cached.pad_rows(timestamps, offsets, width)
        pos, _ = hstu_cached.pad_rows(positions, offsets, width)
        return out, HistoryCache(keys, values, valid, ts, pos, self._inv_scale(lengths + appended), appended)

    def _inv_scale(self, lengths: Tensor) -> Tensor:
        if self.attention_scale == "length":
            return lengths.to(torch.float32).reciprocal()
        return torch.full(lengths.shape, 1.0 / self.max_len, device=lengths.device)

    def extend(self, cache: "HistoryCache", step: Optional["StepCache"], x: Tensor, timestamps: Tensor,
               positions: Tensor, query_timestamps: Tensor) -> Tuple[Tensor, "StepCache"]:
        """Appends one token per beam: ``x [R, D]`` item embeddings, ``R = B * W`` user-major
        (``W`` beams per history); ``timestamps``, ``positions``, ``query_timestamps [B]`` of
        the new token, shared by a history's beams. Each beam's token attends causally to the
        history and to the beam's earlier tokens (``step``, reordered to the beams with
        :meth:`StepCache.select`). Returns ``(out [R, D]`` L2-normalised, the extended step cache``)``."""
        batch = cache.valid.shape[0]
        done = 0 if step is None else step.positions.shape[1]
        if x.dim() != 2 or x.shape[1] != self.dim or x.shape[0] % batch:
            raise DataError(f"extend takes [B * W, {self.dim}] rows for B={batch} histories, got {tuple(x.shape)}")
        if done >= cache.room:
            raise DataError(f"the cache was encoded for {cache.room} appended tokens; {done} are there already")
        if int(positions.max()) >= self.max_len or int(positions.min()) < 0:
            raise DataError(f"positions must lie in [0, max_len={self.max_len})")
        beams = x.shape[0] // batch
        h = x * math.sqrt(self.dim) + self.pos_emb(positions).repeat_interleave(beams, dim=0)
        step_ts = timestamps.unsqueeze(1) if step is None else torch.cat([step.timestamps, timestamps.unsqueeze(1)], 1)
        step_pos = positions.unsqueeze(1) if step is None else torch.cat([step.positions, positions.unsqueeze(1)], 1)
        args = (self.max_len, self.num_time_buckets)
        hist_index = hstu_cached.bias_index(query_timestamps, positions, cache.timestamps, cache.positions,
                                            cache.valid, *args)
        step_index = hstu_cached.bias_index(query_timestamps, positions, step_ts, step_pos,
                                            torch.ones_like(step_pos, dtype=torch.bool), *args)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            prev_k = None if step is None else step.keys[i]
            prev_v = None if step is None else step.values[i]
            h, k, v = layer.step(h, cache.keys[i], cache.values[i], hist_index, prev_k, prev_v, step_index,
                                 cache.inv_scale)
            keys.append(k)
            values.append(v)
        return _l2(h), StepCache(keys, values, step_ts, step_pos)

    def _check_inputs(
        self,
        x: Tensor,
        offsets: Tensor,
        timestamps: Tensor,
        positions: Optional[Tensor],
        query_timestamps: Optional[Tensor],
        host_offsets: Tensor,
    ) -> None:
        """Raises :class:`DataError` (one line) on inconsistent shapes or too-long sequences.

        Shapes are checked on the tensors, values on the host: the offsets through their CPU copy
        ``host_offsets``; explicit ``positions`` only when they are on the CPU (reading them on a
        GPU would sync every step; the callers that pass them, COBRA, derive them from offsets).
        """
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise DataError(f"HSTU input must be [T, {self.dim}], got {tuple(x.shape)}")
        jagged.validate_offsets(offsets, x.shape[0], host_offsets)
        for name, t in (("timestamps", timestamps), ("positions", positions), ("query_timestamps", query_timestamps)):
            if t is not None and tuple(t.shape) != (x.shape[0],):
                raise DataError(f"{name} must be [T]=[{x.shape[0]}], got {tuple(t.shape)}")
        longest = int(jagged.offsets_to_lengths(host_offsets).max())
        if positions is None and longest > self.max_len:
            raise DataError(f"a sequence has {longest} tokens, more than max_len={self.max_len}")
        if positions is not None and positions.numel() and positions.device.type == "cpu" and not (
            0 <= int(positions.min()) and int(positions.max()) < self.max_len
        ):
            raise DataError(f"positions must lie in [0, max_len={self.max_len})")
