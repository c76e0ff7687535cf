"""Jagged-tensor helpers: offsets, per-token indices, padding conversions, length chunks.

A jagged batch of ``B`` sequences is ``values [T, ...]`` plus ``offsets [B+1]`` (int64,
``offsets[0] == 0``, ``offsets[B] == T``); sequence ``b`` owns rows
``values[offsets[b]:offsets[b+1]]``. Every fast helper here has a plain PyTorch
reference (``*_reference``) with the same signature, used by the parity tests.

:func:`plan_length_chunks` is the core of the jagged HSTU attention
(:mod:`sidvid_rec.ops.hstu_attention`): it sorts the batch's sequences by length and cuts
them into chunks whose members have similar lengths, so that attention runs as dense batched
matmuls per chunk (``[b_c, n_c, n_c]``) with little padding instead of padding every
sequence to the batch's maximum length.

Example::

    offsets = lengths_to_offsets(torch.tensor([3, 1, 2]))  # tensor([0, 3, 4, 6])
    index_within_sequence(offsets)                         # tensor([0, 1, 2, 0, 0, 1])
"""

import functools
from dataclasses import dataclass
from typing import List, Optional, Union

import torch

try:  # numpy runs the chunking DP fastest; a torch-only install (benchmarks/gpu_check.py) uses torch
    import numpy as np
except ImportError:  # pragma: no cover - numpy is part of the supported stack
    np = None  # type: ignore[assignment]
from torch import Tensor

from sidvid_rec.errors import DataError

@functools.lru_cache(maxsize=None)
def _fbgemm_jagged(device_type: str) -> bool:
    """Whether fbgemm's jagged <-> padded kernels can run on ``device_type`` (an optional fast
    path). Imported lazily: this module needs torch alone (benchmarks/gpu_check.py runs it on a
    machine without fbgemm), and a CPU-only fbgemm has no CUDA kernels."""
    try:
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)

        if not hasattr(torch.ops.fbgemm, "jagged_to_padded_dense"):
            return False
        if device_type != "cpu":
            probe = torch.zeros(1, 1, device=device_type)
            torch.ops.fbgemm.jagged_to_padded_dense(probe, [torch.tensor([0, 1], device=device_type)], [1], 0.0)
        return True
    except Exception:  # noqa: BLE001  (not installed, a mismatched build, no kernel for the device)
        return False

# Relative-time buckets as in the reference HSTU: floor(ln(max(|dt|, 1)) / 0.301).
TIME_BUCKET_DIVISOR: float = 0.301


def lengths_to_offsets(lengths: Tensor) -> Tensor:
    """``lengths [B]`` -> ``offsets [B+1]`` (int64, exclusive cumulative sum with a leading 0)."""
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths.to(torch.int64), dim=0, out=offsets[1:])
    return offsets


def offsets_to_lengths(offsets: Tensor) -> Tensor:
    """``offsets [B+1]`` -> ``lengths [B]`` (int64)."""
    return (offsets[1:] - offsets[:-1]).to(torch.int64)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``; a CPU tensor goes to CUDA through pinned memory with a non-blocking
    copy, so the host does not wait for the GPU's queue (a pageable copy would)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def host_offsets_of(offsets: Tensor, host_offsets: Optional[Tensor] = None) -> Tensor:
    """The offsets on the CPU (int64): ``host_offsets`` when the caller has them (a batch keeps
    its host-side offsets), ``offsets`` itself when it is on the CPU, else one device -> host
    copy (a sync; the training path passes ``host_offsets`` to avoid it)."""
    if host_offsets is not None:
        if host_offsets.device.type != "cpu":
            raise ValueError(f"host_offsets must be a CPU tensor, got one on {host_offsets.device}")
        return host_offsets.to(torch.int64)
    return offsets.detach().to("cpu", torch.int64)


def validate_offsets(offsets: Tensor, num_values: int, host_offsets: Optional[Tensor] = None) -> None:
    """Raises :class:`DataError` unless ``offsets`` is a valid ``[B+1]`` offsets vector for ``T`` rows.

    Shape and dtype are checked on ``offsets``; the values (``0 .. T``, non-decreasing) on a
    CPU tensor only: ``host_offsets`` when given, ``offsets`` when it is on the CPU. Offsets on
    a GPU without a host copy are not read (that would sync the host with the GPU every step);
    batches are built on the host, which is where their values are checked.
    """
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise DataError(f"offsets must be a 1-D tensor [B+1], got shape {tuple(offsets.shape)}")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise DataError(f"offsets must be int32 or int64, got {offsets.dtype}")
    if offsets.numel() == 1:
        raise DataError("empty batch: offsets has no sequences")
    values = host_offsets if host_offsets is not None else (offsets if offsets.device.type == "cpu" else None)
    if values is None:
        return
    if tuple(values.shape) != tuple(offsets.shape):
        raise DataError(f"host offsets {tuple(values.shape)} do not match offsets {tuple(offsets.shape)}")
    first, last = int(values[0]), int(values[-1])
    if first != 0 or last != num_values:
        raise DataError(f"offsets must run from 0 to T={num_values}, got {first}..{last}")
    if bool((values[1:] < values[:-1]).any()):
        raise DataError("offsets must be non-decreasing")


def sequence_ids(offsets: Tensor, num_values: Optional[int] = None) -> Tensor:
    """``[T]`` int64: the sequence index ``b`` of every jagged row."""
    lengths = offsets_to_lengths(offsets)
    batch = torch.arange(lengths.numel(), device=offsets.device)
    return torch.repeat_interleave(batch, lengths, output_size=num_values)


def index_within_sequence(offsets: Tensor, num_values: Optional[int] = None) -> Tensor:
    """``[T]`` int64: the position of every jagged row inside its own sequence (0-based)."""
    total = int(offsets[-1]) if num_values is None else num_values
    seq = sequence_ids(offsets, total)
    return torch.arange(total, device=offsets.device) - offsets[seq]


def next_timestamps(timestamps: Tensor, offsets: Tensor, last: Optional[Tensor] = None) -> Tensor:
    """Query timestamps of the relative time bias: the *next* item's timestamp, ``[T]``.

    Row ``i`` gets ``timestamps[i + 1]`` from the same sequence. The last row of a sequence
    gets ``last[b]`` when given (the reference HSTU scatters the target item's timestamp
    there, so pass the targets' timestamps ``[B]`` to match it), else its own timestamp.
    """
    total = timestamps.numel()
    if total == 0:
        return torch.empty_like(timestamps)
    # One spare row at the end: empty sequences write there (no data-dependent mask, so no
    # host sync on a GPU), and it is cut off.
    out = torch.empty(total + 1, dtype=timestamps.dtype, device=timestamps.device)
    out[:total - 1] = timestamps[1:]
    nonempty = offsets[1:] > offsets[:-1]
    ends = torch.where(nonempty, offsets[1:] - 1, total)  # last row of each sequence, or the spare row
    if last is None:
        src = timestamps[(offsets[1:] - 1).clamp(min=0)]
    else:
        src = last.to(timestamps.dtype)
    out.index_copy_(0, ends.to(torch.int64), src)
    return out[:total]


def next_timestamps_reference(timestamps: Tensor, offsets: Tensor, last: Optional[Tensor] = None) -> Tensor:
    """Plain loop version of :func:`next_timestamps`."""
    out = timestamps.clone()
    for b in range(offsets.numel() - 1):
        start, end = int(offsets[b]), int(offsets[b + 1])
        for i in range(start, end):
            if i + 1 < end:
                out[i] = timestamps[i + 1]
            elif last is not None:
                out[i] = last[b]
    return out


def time_bucket(dt: Tensor, num_buckets: int) -> Tensor:
    """Reference HSTU time bucket ``clamp(floor(ln(max(|dt|, 1)) / 0.301), 0, num_buckets)``.

    ``dt`` is integer seconds (any shape); the result is int64 of the same shape. The
    logarithm is taken in float32 exactly like the reference (``torch.log`` of an integer
    tensor), so bucket boundaries match it bit for bit.
    """
    mag = dt.abs().clamp_(min=1).to(torch.float32)
    return mag.log_().div_(TIME_BUCKET_DIVISOR).to(torch.int64).clamp_(0, num_buckets)


def jagged_to_padded(values: Tensor, offsets: Tensor, max_len: int, padding_value: float = 0.0) -> Tensor:
    """``values [T, ...]`` -> ``[B, max_len, ...]``; rows past a sequence's length hold ``padding_value``.

    Sequences longer than ``max_len`` keep their first ``max_len`` rows (like fbgemm).
    """
    if values.dim() == 2 and values.dtype == torch.float32 and _fbgemm_jagged(values.device.type):
        return torch.ops.fbgemm.jagged_to_padded_dense(values, [offsets], [max_len], padding_value)
    batch = offsets.numel() - 1
    lengths = offsets_to_lengths(offsets).clamp(max=max_len)
    cols = torch.arange(max_len, device=values.device)
    valid = cols.unsqueeze(0) < lengths.unsqueeze(1)  # [B, N]
    src = (offsets[:-1].unsqueeze(1) + cols.unsqueeze(0))[valid]
    out = values.new_full((batch, max_len) + tuple(values.shape[1:]), padding_value)
    out[valid] = values[src]
    return out


def jagged_to_padded_reference(
    values: Tensor, offsets: Tensor, max_len: int, padding_value: float = 0.0
) -> Tensor:
    """Plain loop version of :func:`jagged_to_padded`."""
    batch = offsets.numel() - 1
    out = values.new_full((batch, max_len) + tuple(values.shape[1:]), padding_value)
    for b in range(batch):
        start, end = int(offsets[b]), int(offsets[b + 1])
        n = min(end - start, max_len)
        out[b, :n] = values[start : start + n]
    return out


def padded_to_jagged(padded: Tensor, offsets: Tensor) -> Tensor:
    """``[B, N, ...]`` -> ``values [T, ...]`` (the first ``length_b`` rows of each sequence)."""
    if padded.dim() == 3 and padded.dtype == torch.float32 and _fbgemm_jagged(padded.device.type):
        return torch.ops.fbgemm.dense_to_jagged(padded, [offsets])[0]
    lengths = offsets_to_lengths(offsets)
    cols = torch.arange(padded.shape[1], device=padded.device)
    return padded[cols.unsqueeze(0) < lengths.unsqueeze(1)]


def padded_to_jagged_reference(padded: Tensor, offsets: Tensor) -> Tensor:
    """Plain loop version of :func:`padded_to_jagged`."""
    lengths = offsets_to_lengths(offsets).tolist()
    return torch.cat([padded[b, :n] for b, n in enumerate(lengths)], dim=0)


@dataclass
class LengthChunk:
    """One dense block of similar-length sequences inside a :class:`ChunkPlan`.

    Rows ``[row_begin, row_begin + num_seqs * width)`` of the plan's padded layout, viewed
    as ``[num_seqs, width, ...]``; ``lengths [num_seqs]`` are the members' true lengths
    (all ``<= width``) and ``seq_ids [num_seqs]`` their indices in the batch.
    """

    row_begin: int
    num_seqs: int
    width: int
    lengths: Tensor
    seq_ids: Tensor


@dataclass
class ChunkPlan:
    """How a jagged batch is laid out as per-chunk padded blocks.

    ``gather_rows [P]``: the jagged row copied into each padded row (padded rows past a
    sequence's end repeat its last row, so they stay finite; causal masking keeps them
    invisible to real rows). ``scatter_rows [T]``: the padded row holding each jagged row.
    """

    chunks: List[LengthChunk]
    gather_rows: Tensor
    scatter_rows: Tensor
    num_rows: int


# Per-chunk fixed cost (python, op dispatch, thread sync; forward and backward) in units of
# attention-matrix elements. On ML-100k batches (128 users, <= 200 items) 6k..100k cost the
# same single-threaded; 50k gives ~6 chunks for ~13% padding, and fewer chunks mean fewer
# thread barriers when intra-op threads have to wait for a busy CPU.
DEFAULT_CHUNK_OVERHEAD: int = 50_000


def _partition_sorted(lengths_desc: Union[Tensor, "np.ndarray"], overhead: float) -> List[int]:
    """Optimal cut points of descending lengths into chunks minimising ``sum(b_c * n_c^2 + overhead)``.

    Returns the chunk start indices. Dynamic programming over runs of equal lengths (a cut
    inside a run never beats the cut at the run's start), O(distinct lengths^2) numpy.
    """
    if np is None:
        return _partition_sorted_torch(lengths_desc, overhead)
    if isinstance(lengths_desc, Tensor):
        lengths_desc = lengths_desc.numpy()
    values, counts = np.unique(lengths_desc, return_counts=True)
    values, counts = values[::-1].astype(np.float64), counts[::-1]
    before = np.concatenate([[0], np.cumsum(counts)])  # sequences before each run
    runs = len(values)
    best = np.zeros(runs + 1)
    start_of = np.zeros(runs + 1, dtype=np.int64)
    for end in range(1, runs + 1):
        # chunk = runs start..end-1; its width is the first (longest) run's length
        costs = best[:end] + (before[end] - before[:end]) * values[:end] ** 2 + overhead
        start_of[end] = int(np.argmin(costs))
        best[end] = costs[start_of[end]]
    cuts, end = [], runs
    while end > 0:
        end = int(start_of[end])
        cuts.append(int(before[end]))
    return cuts[::-1]


def _partition_sorted_torch(lengths_desc: Tensor, overhead: float) -> List[int]:
    """:func:`_partition_sorted` with torch ops (CPU), for an install without numpy: same DP,
    same ties (``argmin`` returns the first minimum in both)."""
    values, counts = torch.unique(lengths_desc, return_counts=True)
    values, counts = values.flip(0).to(torch.float64), counts.flip(0)
    before = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)]).to(torch.float64)
    runs = values.numel()
    best = torch.zeros(runs + 1, dtype=torch.float64)
    start_of = [0] * (runs + 1)
    for end in range(1, runs + 1):
        costs = best[:end] + (before[end] - before[:end]) * values[:end] ** 2 + overhead
        start_of[end] = int(torch.argmin(costs))
        best[end] = costs[start_of[end]]
    cuts, end = [], runs
    while end > 0:
        end = start_of[end]
        cuts.append(int(before[end]))
    return cuts[::-1]


def plan_length_chunks(offsets: Tensor, overhead: float = DEFAULT_CHUNK_OVERHEAD,
                       host_offsets: Optional[Tensor] = None) -> ChunkPlan:
    """Groups the sequences of a jagged batch into dense chunks of similar lengths.

    Args:
        offsets: ``[B+1]`` jagged offsets (read on the CPU: the plan is host-side metadata).
        overhead: fixed cost of one chunk, in attention-matrix elements; ``0`` gives one chunk
            per distinct length (no padding at all), a huge value one chunk (pad to max length).
        host_offsets: the same offsets on the CPU, when the caller has them (no device -> host
            copy then; the index tensors go to the device with non-blocking copies).

    Returns:
        A :class:`ChunkPlan`; its index tensors live on ``offsets.device``.
    """
    device = offsets.device
    offsets_cpu = host_offsets_of(offsets, host_offsets)
    lengths = offsets_to_lengths(offsets_cpu)
    nonempty = torch.nonzero(lengths > 0).flatten()
    order = nonempty[torch.argsort(lengths[nonempty], descending=True, stable=True)]
    sorted_lengths = lengths[order]
    cuts = _partition_sorted(sorted_lengths, overhead) + [order.numel()]
    widths = torch.empty_like(sorted_lengths)
    chunks: List[LengthChunk] = []
    row = 0
    for begin, end in zip(cuts[:-1], cuts[1:]):
        width = int(sorted_lengths[begin])
        widths[begin:end] = width
        members = slice(begin, end)
        chunks.append(
            LengthChunk(row, end - begin, width, to_device(sorted_lengths[members], device),
                        to_device(order[members], device))
        )
        row += (end - begin) * width
    row_start = lengths_to_offsets(widths)[:-1]  # first padded row of each sorted sequence
    seq_of_row = torch.repeat_interleave(torch.arange(order.numel()), widths, output_size=row)
    col = torch.arange(row) - row_start[seq_of_row]
    last_col = sorted_lengths[seq_of_row] - 1
    gather_rows = offsets_cpu[order][seq_of_row] + torch.minimum(col, last_col)
    start_by_seq = torch.zeros_like(lengths)
    start_by_seq[order] = row_start
    total = int(offsets_cpu[-1])
    scatter_rows = start_by_seq[sequence_ids(offsets_cpu, total)] + index_within_sequence(offsets_cpu, total)
    return ChunkPlan(chunks, to_device(gather_rows, device), to_device(scatter_rows, device), row)
