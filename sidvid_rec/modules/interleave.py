"""COBRA token layout: each item step becomes a SID token then a VID token, jagged, never padded.

A batch of ``B`` sequences of *steps* (items) ``values [S]`` + ``offsets [B+1]`` becomes a
batch of *tokens* ``SID_1, VID_1, SID_2, VID_2, ...``: lengths double (minus one when the
last step's VID is dropped, see below), rows stay jagged. Per token the layout keeps

* ``source [T2]``: the step (row of the step arrays) it comes from;
* ``token_type [T2]``: :data:`SID_TYPE` (0) or :data:`VID_TYPE` (1), for the type embedding;
* ``positions [T2]``: its index within its own token sequence;
* ``timestamps [T2]``: the step's time, **cloned** to both tokens of a step, so the relative
  time bias sees delta 0 between the twins and delta > 0 across steps;
* ``query_timestamps [T2]``: the time of the step whose token this row generates
  (``query_time="target"``: a SID token generates its own step's VID -> its step's time, a VID
  token generates the next step's SID -> the next step's time; as HSTU queries with the
  target's time) or simply the token's own time (``query_time="own"``).

Under the standard causal mask the VID token of step t attends to the SID token of step t.
Supervision (teacher forcing): the output at the VID token of step t predicts the SID of step
t + 1; the output at the SID token of step t predicts the VID of step t. The last step of a
sequence is therefore fed as a SID token only (``drop_last_vid``): its VID would have no target.

Example::

    layout = interleave_layout(step_offsets, step_timestamps)      # steps [S] -> tokens [T2]
    x = interleave(sid_vectors, vid_vectors, layout)                # [S, D] x 2 -> [T2, D]
    sup = supervision(layout, step_items)                           # rows + targets of both losses
"""

from dataclasses import dataclass
from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sidvid_rec.modules.hstu import HistoryCache, HSTUEncoder
from sidvid_rec.ops import jagged
from sidvid_rec.types import QueryTime

SID_TYPE = 0
"""Token type of a SID token."""
VID_TYPE = 1
"""Token type of a VID token."""


@dataclass
class TokenLayout:
    """Interleaved token layout of a jagged batch of steps (see the module docstring).

    ``offsets [B+1]`` token offsets; ``source``, ``token_type``, ``positions``,
    ``timestamps``, ``query_timestamps``: ``[T2]`` each; ``step_offsets [B+1]`` the steps'.
    """

    offsets: Tensor
    source: Tensor
    token_type: Tensor
    positions: Tensor
    timestamps: Tensor
    query_timestamps: Tensor
    step_offsets: Tensor

    @property
    def sid_mask(self) -> Tensor:
        """``[T2]`` bool: SID tokens."""
        return self.token_type == SID_TYPE

    @property
    def vid_mask(self) -> Tensor:
        """``[T2]`` bool: VID tokens."""
        return self.token_type == VID_TYPE

    def last_rows(self) -> Tensor:
        """``[B]`` row of each sequence's last token."""
        return self.offsets[1:] - 1


def interleave_layout(step_offsets: Tensor, step_timestamps: Tensor, drop_last_vid: bool = True,
                      query_time: QueryTime = "target") -> TokenLayout:
    """Token layout of steps ``[S]`` with offsets ``[B+1]`` (every sequence non-empty).

    Args:
        step_offsets: ``[B+1]`` int64 offsets of the steps.
        step_timestamps: ``[S]`` int64 time of each step.
        drop_last_vid: feed each sequence's last step as a SID token only (``2 n - 1`` tokens).
        query_time: ``target`` (time of the step the token generates) or ``own``.

    Returns:
        :class:`TokenLayout` with ``2 S - B`` tokens (``2 S`` without ``drop_last_vid``).
    """
    if query_time not in ("target", "own"):
        raise ValueError(f"query_time must be 'target' or 'own', got {query_time!r}")
    num_steps = step_timestamps.numel()
    device = step_timestamps.device
    lengths = jagged.offsets_to_lengths(step_offsets)
    if lengths.device.type == "cpu" and bool((lengths == 0).any()):  # (append_step gives every sequence one)
        raise ValueError("every sequence needs at least one step")
    source = torch.arange(num_steps, device=device).repeat_interleave(2)  # [2S]
    token_type = torch.tensor([SID_TYPE, VID_TYPE], device=device).repeat(num_steps)  # [2S]
    token_lengths = 2 * lengths
    if drop_last_vid:
        is_last_step = torch.zeros(num_steps, dtype=torch.bool, device=device)
        is_last_step[step_offsets[1:] - 1] = True
        keep = ~(is_last_step[source] & (token_type == VID_TYPE))
        source, token_type, token_lengths = source[keep], token_type[keep], token_lengths - 1
    offsets = jagged.lengths_to_offsets(token_lengths)
    positions = jagged.index_within_sequence(offsets, source.numel())
    timestamps = step_timestamps[source]  # cloned: both tokens of a step share its time
    if query_time == "own":
        query_timestamps = timestamps
    else:
        # VID of step t generates SID of step t+1; the last step of a sequence has no VID
        # when dropped, otherwise its VID keeps its own time (no next step).
        next_step = _next_step(source, step_offsets, num_steps)
        query_timestamps = torch.where(token_type == VID_TYPE, step_timestamps[next_step], timestamps)
    return TokenLayout(offsets, source, token_type, positions, timestamps, query_timestamps, step_offsets)


def _next_step(source: Tensor, step_offsets: Tensor, num_steps: int) -> Tensor:
    """``[T2]``: the step after each token's step, clamped to its sequence's last step."""
    last_of_seq = (step_offsets[1:] - 1)[jagged.sequence_ids(step_offsets, num_steps)]  # [S]
    return torch.minimum(source + 1, last_of_seq[source])


def interleave(sid_tokens: Tensor, vid_tokens: Tensor, layout: TokenLayout) -> Tensor:
    """Token inputs ``[T2, D]``: row r is ``sid_tokens[source[r]]`` or ``vid_tokens[source[r]]``.

    ``sid_tokens``, ``vid_tokens``: ``[S, D]`` per-step vectors.
    """
    pairs = torch.stack([sid_tokens, vid_tokens], dim=1)  # [S, 2, D]
    return pairs[layout.source, layout.token_type]  # [T2, D]


class Deinterleaved(NamedTuple):
    sid: Tensor
    """``[S, D]`` rows of the SID tokens, one per step (step order)."""
    vid: Tensor
    """``[S', D]`` rows of the VID tokens (``S' = S - B`` when the last VID was dropped)."""
    vid_steps: Tensor
    """``[S']`` the step of each VID row."""


def deinterleave(tokens: Tensor, layout: TokenLayout) -> Deinterleaved:
    """Splits token rows ``[T2, D]`` back into per-step SID rows and VID rows."""
    sid_rows, vid_rows = torch.nonzero(layout.sid_mask).flatten(), torch.nonzero(layout.vid_mask).flatten()
    return Deinterleaved(tokens[sid_rows], tokens[vid_rows], layout.source[vid_rows])


class Supervision(NamedTuple):
    """Which token rows are supervised, and by which item (teacher forcing)."""

    sid_rows: Tensor
    """``[P]`` rows whose output predicts a SID: the VID tokens (step t -> SID of step t + 1)."""
    sid_targets: Tensor
    """``[P]`` item whose SID is the target."""
    vid_rows: Tensor
    """``[Q]`` rows whose output predicts a VID: the SID tokens (step t -> VID of step t)."""
    vid_targets: Tensor
    """``[Q]`` item whose VID is the target."""


def supervision(layout: TokenLayout, step_items: Tensor) -> Supervision:
    """Training targets of a layout built with ``drop_last_vid=True`` (``step_items [S]``)."""
    vid_tokens = torch.nonzero(layout.vid_mask).flatten()
    sid_tokens = torch.nonzero(layout.sid_mask).flatten()
    # With the last VID dropped, every VID token's step has a next step in its sequence.
    return Supervision(
        sid_rows=vid_tokens, sid_targets=step_items[layout.source[vid_tokens] + 1],
        vid_rows=sid_tokens, vid_targets=step_items[layout.source[sid_tokens]],
    )


def append_step(values: Tensor, offsets: Tensor, extra: Tensor) -> Tuple[Tensor, Tensor]:
    """Appends one value per sequence: ``values [S]``, ``offsets [B+1]``, ``extra [B]`` ->
    ``(values [S + B], offsets [B+1])`` with ``extra[b]`` last in sequence ``b``."""
    num_seqs = offsets.numel() - 1
    new_offsets = offsets + torch.arange(num_seqs + 1, device=offsets.device, dtype=offsets.dtype)
    out = values.new_empty(values.numel() + num_seqs)
    seq = jagged.sequence_ids(offsets, values.numel())
    out[torch.arange(values.numel(), device=values.device) + seq] = values
    out[new_offsets[1:] - 1] = extra.to(values.dtype)
    return out, new_offsets


# ----------------------------------------------------------------------------- decoding
# Shared by the trained model (models/cobra.py) and an export (export/cobra.py), so
# both run the very same token pipeline.


class DecodeInputs(NamedTuple):
    """A batch prepared for decoding: history steps plus one placeholder step per sequence."""

    layout: TokenLayout
    sid_tokens: Tensor
    """``[S + B, D]`` SID-token inputs per step (the placeholders' rows are replaced per query)."""
    vid_tokens: Tensor
    """``[S + B, D]`` VID-token inputs per step (the placeholders' are unused: their VID is dropped)."""
    placeholder_steps: Tensor
    """``[B]`` step row of each sequence's placeholder."""


def encode_tokens(encoder: nn.Module, type_emb: Tensor, layout: TokenLayout, sid_tokens: Tensor,
                  vid_tokens: Tensor) -> Tensor:
    """Per-step token inputs ``[S, D]`` x 2 -> interleaved, plus the type embedding
    ``type_emb [2, D]`` -> HSTU outputs ``[T2, D]``."""
    x = interleave(sid_tokens, vid_tokens, layout) + type_emb[layout.token_type]  # [T2, D]
    return encoder(x, layout.offsets, layout.timestamps, positions=layout.positions,
                   query_timestamps=layout.query_timestamps)


def next_sid_states(encoder: nn.Module, type_emb: Tensor, inputs: DecodeInputs) -> Tensor:
    """``[B, D]`` output at each history's last VID token (predicts the next SID)."""
    h = encode_tokens(encoder, type_emb, inputs.layout, inputs.sid_tokens, inputs.vid_tokens)
    return h[inputs.layout.last_rows() - 1]


def vid_queries(encoder: nn.Module, type_emb: Tensor, inputs: DecodeInputs, next_sid: Tensor) -> Tensor:
    """``[B, D]`` VID queries: outputs at the appended SID token carrying ``next_sid [B, D]``."""
    sid_tokens = inputs.sid_tokens.index_copy(0, inputs.placeholder_steps, next_sid.to(inputs.sid_tokens.dtype))
    h = encode_tokens(encoder, type_emb, inputs.layout, sid_tokens, inputs.vid_tokens)
    return h[inputs.layout.last_rows()]


class CobraCache(NamedTuple):
    """A history encoded once for decoding (:func:`encode_history_cached`): the next-SID
    states, the encoder's KV cache, and where the appended SID token sits."""

    states: Tensor
    """``[B, D]`` output at each history's last VID token (predicts the next SID)."""
    cache: HistoryCache
    """Per-layer keys and values of the history tokens (the placeholder's SID token excluded)."""
    timestamps: Tensor
    """``[B]`` time of the appended SID token."""
    positions: Tensor
    """``[B]`` its position."""
    query_timestamps: Tensor
    """``[B]`` its query time."""


def encode_history_cached(encoder: HSTUEncoder, type_emb: Tensor, inputs: DecodeInputs) -> CobraCache:
    """Encodes the history tokens once (every token of the layout but the placeholder's SID
    token, which is appended per query by :func:`vid_queries_cached`)."""
    layout = inputs.layout
    x = interleave(inputs.sid_tokens, inputs.vid_tokens, layout) + type_emb[layout.token_type]  # [T2, D]
    last = layout.last_rows()  # the placeholder SID token of each sequence
    history = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    history[last] = False
    offsets = layout.offsets - torch.arange(layout.offsets.numel(), device=x.device, dtype=layout.offsets.dtype)
    out, cache = encoder.encode_cached(x[history], offsets, layout.timestamps[history],
                                       positions=layout.positions[history],
                                       query_timestamps=layout.query_timestamps[history], appended=1)
    return CobraCache(out[offsets[1:] - 1], cache, layout.timestamps[last], layout.positions[last],
                      layout.query_timestamps[last])


def vid_queries_cached(encoder: HSTUEncoder, type_emb: Tensor, encoded: CobraCache, next_sids: Tensor) -> Tensor:
    """``[B, W, D]`` VID queries: the appended SID token carrying each of ``next_sids [B, W, D]``
    (``W`` candidate SIDs per history), each attending to the cached history only; equal to
    :func:`vid_queries` per candidate."""
    batch, beams, dim = next_sids.shape
    x = next_sids.reshape(batch * beams, dim).to(type_emb.dtype) + type_emb[SID_TYPE]
    out, _ = encoder.extend(encoded.cache, None, x, encoded.timestamps, encoded.positions, encoded.query_timestamps)
    return out.view(batch, beams, dim)


def sid_logits(states: Tensor, sid_table: Tensor, temperature: float) -> Tensor:
    """``states [B, D]`` x ``sid_table [S, D]`` -> cosine / temperature ``[B, S]``."""
    return F.normalize(states, dim=-1) @ F.normalize(sid_table, dim=-1).T / temperature
