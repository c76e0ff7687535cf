"""Sequence models assembled from modules: HSTU over item tables (id/sid/sid_id) and COBRA."""

from typing import Dict, Protocol

from torch import Tensor


class RetrievalModel(Protocol):
    """What export and serving need of any trained model, whatever its mode."""

    encoder: "object"
    """The HSTU encoder (its ``params`` go into the export manifest)."""

    def export_vectors(self) -> Dict[str, Tensor]:
        """Named tensors of the export's ``item_vectors.safetensors``: at least ``inputs`` and
        ``candidates`` (``[N+1, D]``), plus whatever the mode's decoder needs."""
