"""HSTU next-item model over TorchRec item tables: modes ``id``, ``sid`` and ``sid_id``.

Data flow of one training step (T = tokens of the jagged batch, B = sequences)::

    item_id [T] --ItemEmbeddings--> x [T, D] --HSTUEncoder--> h [T, D] (L2-normalised)
    target_id [T] + R sampled negatives per position --ItemEmbeddings (unique ids)--> candidates
    sampled softmax(h, candidates) -> loss (teacher forcing: every position predicts its next item)

Inputs and candidates share the item tables (as the reference HSTU does).

A batch with batch-side lookups (``SequenceBatch.lookups``, built by the data loader's
``LookupBuilder``) is trained with ONE table lookup of that KJT (inputs, then the unique
candidates) and the negatives it carries; the forward then builds no KJT, so torchrec's
``TrainPipelineSparseDist`` can trace it and run the lookup's input distribution a batch ahead.
Otherwise the forward builds its KJTs itself (two lookups: inputs, then candidates).
"""

from typing import Dict, NamedTuple, Optional

import torch
from torch import Tensor, nn

from sidvid_rec.data.batches import SequenceBatch
from sidvid_rec.losses import SampledSoftmaxLoss
from sidvid_rec.modules.embeddings import ItemEmbeddings
from sidvid_rec.modules.hstu import HSTUEncoder


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

    def forward(self, batch: SequenceBatch, generator: Optional[torch.Generator] = None) -> StepOutput:
        """Teacher-forced sampled-softmax loss of a training batch."""
        if batch.lookups is not None:
            return self._forward_batch_lookups(batch)
        items, times = batch.jagged("item_id"), batch.jagged("timestamp")
        target_ids = batch.jagged("target_id").values()  # [T]
        # Training: position i's query time is its target's time.
        query_times = batch.jagged("target_timestamp").values()
        h = self.encoder(self.embeddings.embed(items.values()), items.offsets(), times.values(),
                         query_timestamps=query_times, host_offsets=batch.input_host_offsets())  # [T, D]
        out = self.loss(h, target_ids, self.embeddings.embed, generator=generator)
        return StepOutput(out.loss, out.num_positions)

    def _forward_batch_lookups(self, batch: SequenceBatch) -> StepOutput:
        """The step on the batch's own lookups. Symbolically traceable: no control flow on the
        batch's values (torchrec's pipeline fx-traces it to find ``batch.lookups``)."""
        vectors = self.embeddings.lookup(batch.lookups)  # [T_in + U, D]
        num_inputs = batch.num_inputs
        items, times = batch.jagged("item_id"), batch.jagged("timestamp")
        target_ids = batch.jagged("target_id").values()
        h = self.encoder(vectors[:num_inputs], items.offsets(), times.values(),
                         query_timestamps=batch.jagged("target_timestamp").values(),
                         host_offsets=batch.input_host_offsets())
        candidates = vectors[num_inputs:num_inputs + batch.num_candidates]  # empty padding bags dropped
        out = self.loss(h, target_ids, negative_ids=batch.negative_ids, candidate_vectors=candidates,
                        candidate_index=batch.candidate_index)
        return StepOutput(out.loss, out.num_positions)

    def query(self, batch: SequenceBatch) -> Tensor:
        """``[B, D]``: the state after each sequence's last item (scores every candidate)."""
        items, times = batch.jagged("item_id"), batch.jagged("timestamp")
        return self.encoder.last_states(self.embeddings.embed(items.values()), items.offsets(), times.values(),
                                        batch.jagged("target_timestamp").values(),
                                        host_offsets=batch.input_host_offsets())

    @torch.no_grad()
    def export_vectors(self) -> Dict[str, Tensor]:
        """``{"inputs": [N+1, D], "candidates": [N+1, D]}``: what the model looks up for a
        history item, and the L2-normalised vectors it scores (what an index holds)."""
        inputs = self.embeddings.all_item_vectors()
        return {"inputs": inputs.contiguous(), "candidates": self.item_vectors_from(inputs).contiguous()}

    @staticmethod
    def item_vectors_from(inputs: Tensor) -> Tensor:
        return inputs / inputs.norm(dim=-1, keepdim=True).clamp(min=1e-6)

    def item_vectors(self) -> Tensor:
        """``[N + 1, D]`` L2-normalised candidate vectors (the same table as the inputs)."""
        return self.item_vectors_from(self.embeddings.all_item_vectors())
