"""Hand-built ``SequenceBatch`` es for the model and decoder tests (a helper module, not a test file)."""

from typing import Callable, Iterator, List, Sequence, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from sidvid_rec.data.batches import FEATURE_KEYS, SequenceBatch


def linear_times(position: int, sequence: int) -> int:
    """Timestamp of a history position: 100 * (position + 1) + 7 * sequence."""
    return 100 * (position + 1) + 7 * sequence


def make_batch(histories: Sequence[List[int]], targets: Sequence[int], training: bool,
               time_of: Callable[[int, int], int] = linear_times) -> SequenceBatch:
    """A batch of ``histories`` (item ids, oldest first) and their next items ``targets``; with
    ``training`` every position's target is the next item, else one target per sequence.
    ``time_of(position, sequence)`` gives the timestamps (the target's position is ``len(hist)``)."""
    items, times, tgt, tgt_times, lengths, tgt_lengths = [], [], [], [], [], []
    for b, (hist, target) in enumerate(zip(histories, targets)):
        ts = [time_of(i, b) for i in range(len(hist) + 1)]
        items += hist
        times += ts[:-1]
        lengths.append(len(hist))
        if training:  # a target per position: the next item
            full = list(hist) + [target]
            tgt += full[1:]
            tgt_times += ts[1:]
            tgt_lengths.append(len(hist))
        else:
            tgt.append(target)
            tgt_times.append(ts[-1])
            tgt_lengths.append(1)
    values = torch.tensor(items + times + tgt + tgt_times, dtype=torch.int64)
    all_lengths = torch.tensor(lengths + lengths + tgt_lengths + tgt_lengths, dtype=torch.int32)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=FEATURE_KEYS, values=values, lengths=all_lengths)
    n = len(histories)
    return SequenceBatch(kjt, torch.arange(n), torch.ones(n), training)


def histories_of(batch: SequenceBatch) -> Iterator[Tuple[int, List[int], List[int], int]]:
    """``(row, history ids, history timestamps, target timestamp)`` of each sequence of ``batch``."""
    items, times = batch.jagged("item_id"), batch.jagged("timestamp")
    offsets, targets = items.offsets(), batch.jagged("target_timestamp").values()
    for b in range(offsets.numel() - 1):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        yield b, items.values()[lo:hi].tolist(), times.values()[lo:hi].tolist(), int(targets[b])
