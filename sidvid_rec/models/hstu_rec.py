"""HSTU next-item model over TorchRec item tables: modes ``id``, ``sid`` and ``sid_id``.

Data flow of one training step (T = tokens of the jagged batch, B = sequences)::

    item_id [T] --ItemEmbeddings--> x [T, D] --HSTUEncoder--> h [T, D] (L2-normalised)
    target_id [T] + R sampled negatives per position --ItemEmbeddings (unique ids)--> candidates
    sampled softmax(h, candidates) -> loss (teacher forcing: every position predicts its next item)

Inputs and candidates share the item tables (as the reference HSTU does).
"""

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from sidvid_rec.data.batches import SequenceBatch
from sidvid_rec.losses import SampledSoftmaxLoss
from sidvid_rec.modules.embeddings import ItemEmbeddings
from sidvid_rec.modules.hstu import HSTUEncoder
from sidvid_rec.ops import jagged


class StepOutput(NamedTuple):
    loss: Tensor
    """Scalar training loss."""
    num_positions: int
    """Supervised positions in the batch."""


class HSTURecommender(nn.Module):
    """Next-item HSTU whose items are embedded by ``embeddings`` (ID, SID prefixes, or fused).

    Args:
        embeddings: the TorchRec item tables (+ fusion).
        encoder: jagged HSTU stack.
        loss: sampled softmax over the whole item set.
    """

    def __init__(self, embeddings: ItemEmbeddings, encoder: HSTUEncoder, loss: SampledSoftmaxLoss) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.encoder = encoder
        self.loss = loss

    @property
    def num_items(self) -> int:
        return self.embeddings.num_items

    def _encode(self, batch: SequenceBatch, x: Tensor) -> Tensor:
        """Runs HSTU over the looked-up inputs ``x [T, D]``; returns ``[T, D]``."""
        items, times = batch.jagged("item_id"), batch.jagged("timestamp")
        target_times = batch.jagged("target_timestamp").values()
        if batch.next_item_targets:  # training: position i's query time is its target's time
            query_times = target_times
        else:  # evaluation: the last position's query time is the held-out target's time
            query_times = jagged.next_timestamps(times.values(), items.offsets(), last=target_times)
        return self.encoder(x, items.offsets(), times.values(), query_timestamps=query_times)

    def forward(self, batch: SequenceBatch, generator: Optional[torch.Generator] = None) -> StepOutput:
        """Teacher-forced sampled-softmax loss of a training batch."""
        item_ids = batch.jagged("item_id").values()  # [T]
        target_ids = batch.jagged("target_id").values()  # [T]
        h = self._encode(batch, self.embeddings.embed(item_ids))  # [T, D]
        out = self.loss(h, target_ids, self.embeddings.embed, generator=generator)
        return StepOutput(out.loss, out.num_positions)

    def query(self, batch: SequenceBatch) -> Tensor:
        """``[B, D]``: the state after each sequence's last item (scores every candidate)."""
        items = batch.jagged("item_id")
        h = self._encode(batch, self.embeddings.embed(items.values()))
        return h[items.offsets()[1:] - 1]

    def item_vectors(self) -> Tensor:
        """``[N + 1, D]`` L2-normalised candidate vectors (the same table as the inputs)."""
        vectors = self.embeddings.all_item_vectors()
        return vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=1e-6)
