"""Batches of jagged sequences as TorchRec ``KeyedJaggedTensor`` s, never padded.

A :class:`SequenceBatch` holds one KJT with keys ``item_id``, ``timestamp`` (lengths
``[B]``: the input tokens) and ``target_id``, ``target_timestamp``: for training the next
item of every input position and its time (same lengths), for evaluation one target per
sequence (lengths all 1). HSTU's time bias uses the target times as query times.

Global batches are formed from one seeded permutation per epoch and each rank takes a
contiguous slice of every global batch, so ``world_size`` ranks see exactly the examples
one process would see in a batch of the same global size.
"""

from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional

import numpy as np
import torch

from sidvid_rec.errors import DataError
from sidvid_rec.stack import require_fbgemm

require_fbgemm()
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from sidvid_rec.data.sequences import Split  # noqa: E402

FEATURE_KEYS = ["item_id", "timestamp", "target_id", "target_timestamp"]


@dataclass
class SequenceBatch:
    """``features``: KJT (``item_id``, ``timestamp``, ``target_id``, ``target_timestamp``); ``user_index [B]``;
    ``weights [B]``: 1 for real examples, 0 for the fillers that even out ranks' batches."""

    features: KeyedJaggedTensor
    user_index: torch.Tensor
    weights: torch.Tensor
    next_item_targets: bool
    """True for training batches (a target per position), False for evaluation (one per sequence)."""
    host_offsets: Optional[torch.Tensor] = None
    """``[B+1]`` int64 offsets of the input tokens (``item_id``), on the CPU whatever device the
    batch is on: the encoder's length checks and attention chunking read them there, so a batch
    on a GPU is never read back to the host."""

    @property
    def batch_size(self) -> int:
        return int(self.user_index.numel())

    def jagged(self, key: str) -> JaggedTensor:
        return self.features[key]

    def input_host_offsets(self) -> torch.Tensor:
        """:attr:`host_offsets`, or the ``item_id`` offsets copied to the CPU (a batch built by hand)."""
        if self.host_offsets is not None:
            return self.host_offsets
        return self.jagged("item_id").offsets().detach().to("cpu", torch.int64)

    def to(self, device: torch.device, non_blocking: bool = False) -> "SequenceBatch":
        return SequenceBatch(self.features.to(device, non_blocking=non_blocking),
                             self.user_index.to(device, non_blocking=non_blocking),
                             self.weights.to(device, non_blocking=non_blocking), self.next_item_targets,
                             self.host_offsets)

    def pin_memory(self) -> "SequenceBatch":
        return SequenceBatch(self.features.pin_memory(), self.user_index.pin_memory(), self.weights.pin_memory(),
                             self.next_item_targets, self.host_offsets)

    def check_item_ids(self, num_items: int) -> None:
        """Raises a one-line :class:`DataError` unless every item id of this (CPU) batch lies in
        ``[0, num_items]``: the host-side check, so the lookups on a GPU need not read ids back."""
        for key in ("item_id", "target_id"):
            ids = self.jagged(key).values()
            if ids.device.type != "cpu" or ids.numel() == 0:
                continue
            bad = (ids < 0) | (ids > num_items)
            if bool(bad.any()):
                raise DataError(f"item id {int(ids[bad][0])} is outside the item table [0, {num_items}]")


def to_device(batch: SequenceBatch, device: torch.device) -> SequenceBatch:
    """``batch`` on ``device``: through pinned memory with non-blocking copies on CUDA (the copy
    overlaps the GPU's work and the host does not wait), a plain ``.to`` elsewhere."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def prefetch_to_device(batches: Iterable[SequenceBatch], device: torch.device) -> Iterator[SequenceBatch]:
    """Yields ``batches`` on ``device``, one batch ahead: batch i+1 is collated, pinned and its
    copy queued before batch i is handed out, so on CUDA the host prepares the next batch while
    the GPU still runs the current step. On the CPU it is a plain ``.to`` per batch."""
    if device.type != "cuda":
        for batch in batches:
            yield batch.to(device)
        return
    it = iter(batches)
    try:
        current = to_device(next(it), device)
    except StopIteration:
        return
    for batch in it:
        upcoming = to_device(batch, device)
        yield current
        current = upcoming
    yield current


def collate(split: Split, examples: np.ndarray, weights: np.ndarray) -> SequenceBatch:
    """Gathers ``examples`` of ``split`` into one jagged batch (vectorised, no Python loop)."""
    if examples.size == 0:
        raise ValueError("cannot build an empty batch")
    starts, ends = split.offsets[examples], split.offsets[examples + 1]
    if split.targets is None:  # training: inputs s[:-1], targets s[1:]
        lengths = ends - starts - 1
        index = _ranges(starts, lengths)
        item_ids, timestamps = split.values[index], split.timestamps[index]
        target_ids, target_lengths = split.values[index + 1], lengths
        target_timestamps = split.timestamps[index + 1]
    else:
        lengths = ends - starts
        index = _ranges(starts, lengths)
        item_ids, timestamps = split.values[index], split.timestamps[index]
        target_ids, target_lengths = split.targets[examples], np.ones_like(lengths)
        target_timestamps = split.target_timestamps[examples]
    values = np.concatenate([item_ids, timestamps, target_ids, target_timestamps])
    all_lengths = np.concatenate([lengths, lengths, target_lengths, target_lengths])
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=FEATURE_KEYS,
        values=torch.from_numpy(values.astype(np.int64)),
        lengths=torch.from_numpy(all_lengths.astype(np.int32)),
    )
    host_offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    return SequenceBatch(features, torch.from_numpy(split.user_index[examples]),
                         torch.from_numpy(weights.astype(np.float32)), split.targets is None, host_offsets)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(starts[e], starts[e] + lengths[e])`` over e."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])


class BatchIterator:
    """Iterates one rank's share of a split in global batches of ``batch_size``.

    Args:
        split: the examples.
        batch_size: global batch size (all ranks together).
        shuffle: a new seeded permutation each epoch (``set_epoch``); else file order.
        seed: permutation seed.
        rank, world_size: this process's slice of every global batch.

    Every rank yields the same number of batches. When the last global batch has fewer
    examples than ranks, ranks without an example get one filler with weight 0.
    """

    def __init__(self, split: Split, batch_size: int, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if split.num_examples == 0:
            raise ValueError("the split has no examples")
        if batch_size < world_size:
            raise ValueError(f"batch_size {batch_size} is smaller than the world size {world_size}")
        self._split = split
        self._batch_size = batch_size
        self._shuffle = shuffle
        self._seed = seed
        self._rank = rank
        self._world_size = world_size
        self._epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the epoch's permutation; ``start_batch`` skips batches already trained (resume)."""
        self._epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return -(-self._split.num_examples // self._batch_size)

    def _order(self) -> np.ndarray:
        if not self._shuffle:
            return np.arange(self._split.num_examples)
        rng = np.random.default_rng([self._seed, self._epoch])
        return rng.permutation(self._split.num_examples)

    def global_batches(self) -> List[np.ndarray]:
        order = self._order()
        return [order[i : i + self._batch_size] for i in range(0, order.size, self._batch_size)]

    def __iter__(self) -> Iterator[SequenceBatch]:
        for examples in self.global_batches()[self.start_batch :]:
            mine = np.array_split(examples, self._world_size)[self._rank]
            weights = np.ones(mine.size, dtype=np.float32)
            if mine.size == 0:
                mine, weights = examples[:1], np.zeros(1, dtype=np.float32)
            yield collate(self._split, mine, weights)
