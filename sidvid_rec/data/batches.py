"""Batches of jagged sequences as TorchRec ``KeyedJaggedTensor`` s, never padded.

A :class:`SequenceBatch` holds one KJT with keys ``item_id``, ``timestamp`` (lengths
``[B]``: the input tokens) and ``target_id``, ``target_timestamp``: for training the next
item of every input position and its time (same lengths), for evaluation one target per
sequence (lengths all 1). HSTU's time bias uses the target times as query times.

Global batches are formed from one seeded permutation per epoch and each rank takes a
contiguous slice of every global batch, so ``world_size`` ranks see exactly the examples
one process would see in a batch of the same global size.

Batch-side lookups (``train.pipeline=sparse_dist`` or ``train.batch_lookups``): a
:class:`LookupBuilder` also draws the sampled softmax's negatives in the loader and puts into the
batch the one KJT the model's tables look up (``lookups``: every input token's item, then every
*unique* candidate of the loss, positives and negatives), its inverse index and the negative ids.
The model then builds no KJT in its forward, which TorchRec's ``TrainPipelineSparseDist`` needs to
start the lookup's input distribution one batch ahead.
"""

from dataclasses import dataclass, replace
from typing import Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch

from sidvid_rec.errors import DataError
from sidvid_rec.stack import require_fbgemm

require_fbgemm()
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from sidvid_rec.data.sequences import Split  # noqa: E402

FEATURE_KEYS = ["item_id", "timestamp", "target_id", "target_timestamp"]
ITEM_FEATURE = "item_id"
"""Feature (and table) name of the item-ID lookup."""
SID_FEATURE = "sid_prefix"
"""Feature (and table) name of the SID-prefix lookup."""


def item_features(item_ids: torch.Tensor, feature_names: Sequence[str], sid_prefix_table: Optional[torch.Tensor],
                  num_bags: Optional[int] = None) -> KeyedJaggedTensor:
    """KJT with one bag per position: ``item_id`` (length 1) and/or ``sid_prefix`` (length L,
    the item's rows of ``sid_prefix_table [N + 1, L]``), padded with empty bags to ``num_bags``.

    The values per key are known on the host (1 or L per position), so the KJT is built without
    ``from_lengths_sync``'s read-back of the lengths (a host sync on a GPU).
    """
    ids = item_ids.reshape(-1).long()
    num_positions = ids.numel()
    num_bags = num_positions if num_bags is None else num_bags
    if num_bags < num_positions:
        raise ValueError(f"num_bags={num_bags} is smaller than the {num_positions} positions")
    pad = torch.zeros(num_bags - num_positions, dtype=torch.long, device=ids.device)
    values, lengths, per_key = [], [], []
    for name in feature_names:
        if name == ITEM_FEATURE:
            values.append(ids)
            lengths += [torch.ones_like(ids), pad]
            per_key.append(num_positions)
        elif name == SID_FEATURE:
            assert sid_prefix_table is not None
            prefixes = sid_prefix_table.to(ids.device)[ids]  # [T, L]
            values.append(prefixes.reshape(-1))
            lengths += [torch.full_like(ids, prefixes.shape[1]), pad]
            per_key.append(num_positions * prefixes.shape[1])
        else:
            raise ValueError(f"unknown item feature {name!r}")
    return KeyedJaggedTensor(keys=list(feature_names), values=torch.cat(values), lengths=torch.cat(lengths),
                             stride=num_bags, length_per_key=per_key)


@dataclass
class SequenceBatch(Pipelineable):
    """``features``: KJT (``item_id``, ``timestamp``, ``target_id``, ``target_timestamp``); ``user_index [B]``;
    ``weights [B]``: 1 for real examples, 0 for the fillers that even out ranks' batches.

    A TorchRec ``Pipelineable`` (``to``, ``record_stream``, ``pin_memory``), so torchrec's train
    pipelines can copy it on their own streams.
    """

    features: KeyedJaggedTensor
    user_index: torch.Tensor
    weights: torch.Tensor
    next_item_targets: bool
    """True for training batches (a target per position), False for evaluation (one per sequence)."""
    host_offsets: Optional[torch.Tensor] = None
    """``[B+1]`` int64 offsets of the input tokens (``item_id``), on the CPU whatever device the
    batch is on: the encoder's length checks and attention chunking read them there, so a batch
    on a GPU is never read back to the host."""
    lookups: Optional[KeyedJaggedTensor] = None
    """Batch-side lookups (:class:`LookupBuilder`), else None: the KJT of every table lookup of the
    training step, stride ``num_inputs + num_candidates``: one bag per input token (``item_id``
    values), then one per unique loss candidate (ascending id)."""
    candidate_index: Optional[torch.Tensor] = None
    """``[T + K]`` index into the unique candidates of each target (T), then of each negative
    (``negative_ids`` flattened, K)."""
    negative_ids: Optional[torch.Tensor] = None
    """``[T, R]`` negatives per target position, or ``[1, R]`` shared by all."""
    num_inputs: int = 0
    """Input tokens (the first bags of ``lookups``); a host number."""
    num_candidates: int = 0
    """Unique candidates (the next bags of ``lookups``; empty bags may follow); a host number."""

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

    def _device_fields(self) -> List[str]:
        return [name for name in ("features", "user_index", "weights", "lookups", "candidate_index", "negative_ids")
                if getattr(self, name) is not None]

    def to(self, device: torch.device, non_blocking: bool = False) -> "SequenceBatch":
        """A copy on ``device`` (``host_offsets`` stays on the CPU)."""
        return replace(self, **{name: getattr(self, name).to(device, non_blocking=non_blocking)
                                for name in self._device_fields()})

    def pin_memory(self) -> "SequenceBatch":
        return replace(self, **{name: getattr(self, name).pin_memory() for name in self._device_fields()})

    def record_stream(self, stream: torch.Stream) -> None:
        """Marks every device tensor as used by ``stream`` (torchrec's pipelines copy on their own)."""
        for name in self._device_fields():
            getattr(self, name).record_stream(stream)

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


class LookupBuilder:
    """Adds batch-side lookups to training batches: negatives drawn here, candidates deduplicated here.

    Args:
        num_items: N; negatives are uniform in ``1..N`` (never the padding id 0).
        num_negatives: R.
        shared: one set of R negatives for the whole batch (``[1, R]``) instead of R per position.
        feature_names: the tables' KJT keys (``item_id`` and/or ``sid_prefix``), in the model's order.
        sid_prefix_table: ``[N + 1, L]`` prefix ids (CPU), for the ``sid_prefix`` key.
        seed: base seed of the negatives.

    Random stream: batch ``b`` of epoch ``e`` on rank ``r`` draws from a fresh CPU generator seeded
    by ``(seed, e, b, r)`` (``r`` = 0 with ``shared``: every rank draws the set one process would),
    so the negatives depend on nothing but the batch: a resumed run (any mid-epoch step) draws
    exactly the uninterrupted run's, with no generator state in the checkpoint, and CPU and CUDA
    training draw the same ids. (The model-side path instead draws from one generator on the
    training device that runs on from step to step; the two paths draw different negatives.)
    """

    def __init__(self, num_items: int, num_negatives: int, shared: bool, feature_names: Sequence[str],
                 sid_prefix_table: Optional[torch.Tensor] = None, seed: int = 0) -> None:
        if num_items <= 0 or num_negatives <= 0:
            raise ValueError(f"num_items and num_negatives must be positive, got {num_items} and {num_negatives}")
        self.num_items, self.num_negatives, self.shared = num_items, num_negatives, shared
        self.feature_names = list(feature_names)
        self.sid_prefix_table = None if sid_prefix_table is None else sid_prefix_table.detach().to("cpu", torch.long)
        self.seed = seed

    def generator(self, epoch: int, batch_index: int, rank: int) -> torch.Generator:
        words = np.random.SeedSequence([self.seed, epoch, batch_index, 0 if self.shared else rank]).generate_state(2)
        return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))

    def _candidates(self, batch: SequenceBatch, epoch: int, batch_index: int, rank: int):
        targets = batch.jagged("target_id").values()
        rows = 1 if self.shared else targets.numel()
        negatives = torch.randint(1, self.num_items + 1, (rows, self.num_negatives),
                                  generator=self.generator(epoch, batch_index, rank))
        unique, inverse = torch.unique(torch.cat([targets, negatives.reshape(-1)]), return_inverse=True)
        return negatives, unique, inverse

    def bags(self, batch: SequenceBatch, epoch: int, batch_index: int, rank: int) -> int:
        """Bags of ``batch``'s lookups on ``rank``: its input tokens plus its unique candidates."""
        unique = self._candidates(batch, epoch, batch_index, rank)[1]
        return int(batch.jagged("item_id").values().numel()) + int(unique.numel())

    def __call__(self, batch: SequenceBatch, epoch: int, batch_index: int, rank: int,
                 num_bags: Optional[int] = None) -> SequenceBatch:
        """``batch`` with its lookups; ``num_bags``: pad them with empty bags to this stride."""
        batch.check_item_ids(self.num_items)  # one line on a bad id, before the prefix table is indexed
        inputs = batch.jagged("item_id").values()
        negatives, unique, inverse = self._candidates(batch, epoch, batch_index, rank)
        lookups = item_features(torch.cat([inputs, unique]), self.feature_names, self.sid_prefix_table, num_bags)
        return replace(batch, lookups=lookups, candidate_index=inverse, negative_ids=negatives,
                       num_inputs=int(inputs.numel()), num_candidates=int(unique.numel()))


class BatchIterator:
    """Iterates one rank's share of a split in global batches of ``batch_size``.

    Args:
        split: the examples.
        batch_size: global batch size (all ranks together).
        shuffle: a new seeded permutation each epoch (``set_epoch``); else file order.
        seed: permutation seed.
        rank, world_size: this process's slice of every global batch.
        lookups: adds batch-side lookups to every batch (training only).

    Every rank yields the same number of batches. When the last global batch has fewer
    examples than ranks, ranks without an example get one filler with weight 0.
    """

    def __init__(self, split: Split, batch_size: int, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, lookups: Optional[LookupBuilder] = None) -> None:
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
        self._lookups = lookups

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
        for index, examples in enumerate(self.global_batches()[self.start_batch :], start=self.start_batch):
            batch = self._rank_batch(examples, self._rank)
            if self._lookups is not None:
                batch = self._lookups(batch, self._epoch, index, self._rank, self._common_bags(examples, index))
            yield batch

    def _rank_batch(self, examples: np.ndarray, rank: int) -> SequenceBatch:
        mine = np.array_split(examples, self._world_size)[rank]
        weights = np.ones(mine.size, dtype=np.float32)
        if mine.size == 0:
            mine, weights = examples[:1], np.zeros(1, dtype=np.float32)
        return collate(self._split, mine, weights)

    def _common_bags(self, examples: np.ndarray, index: int) -> Optional[int]:
        """On several ranks: the largest lookup stride over the ranks' shares of this global batch,
        which every rank pads its lookups to (the row-wise all-gather needs equal bag counts on every
        rank, and the pipeline distributes the batch's KJT as it is). Every rank computes every
        rank's share (the negatives are seeded per rank), so no collective is needed: the loader
        does the candidate work of the whole global batch, what one process would do."""
        if self._world_size == 1:
            return None
        assert self._lookups is not None
        return max(self._lookups.bags(self._rank_batch(examples, r), self._epoch, index, r)
                   for r in range(self._world_size))
