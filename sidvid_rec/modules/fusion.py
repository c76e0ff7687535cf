"""Fusion of an item's SID vector and its item-ID vector (``prefixN-indEmb``).

Both inputs are per-position item vectors ``[T, D]`` (``T`` = jagged positions or items);
the output has the same shape. Kinds:

* ``sum``:  ``s + i`` (no parameters);
* ``fc``:   ``W [s; i] + b`` (concat + linear);
* ``mlp``:  ``W2 SiLU(W1 [s; i] + b1) + b2``;
* ``gate``: ``g = sigmoid(W [s; i] + b)``, ``g * s + (1 - g) * i`` (a per-dimension learned gate).

Example::

    fusion = SidIdFusion(dim=50, kind="gate")
    item_vec = fusion(sid_vec, id_vec)  # [T, 50]
"""

from typing import Optional, get_args

import torch
from torch import nn

from sidvid_rec.types import Fusion



class SidIdFusion(nn.Module):
    """Combines SID and ID vectors ``[T, D]`` into one item vector ``[T, D]``.

    Args:
        dim: vector width D of both inputs and of the output.
        kind: ``sum``, ``fc``, ``mlp`` or ``gate`` (see the module docstring).
        device: where the parameters live.
    """

    def __init__(self, dim: int, kind: Fusion = "sum", device: Optional[torch.device] = None) -> None:
        super().__init__()
        if kind not in get_args(Fusion):
            raise ValueError(f"unknown fusion {kind!r}; choose one of {', '.join(get_args(Fusion))}")
        self._kind: Fusion = kind
        self._proj: Optional[nn.Module] = None
        if kind in ("fc", "gate"):
            self._proj = nn.Linear(2 * dim, dim, device=device)
        elif kind == "mlp":
            self._proj = nn.Sequential(
                nn.Linear(2 * dim, dim, device=device), nn.SiLU(), nn.Linear(dim, dim, device=device)
            )

    @property
    def kind(self) -> Fusion:
        return self._kind

    def forward(self, sid_vec: torch.Tensor, id_vec: torch.Tensor) -> torch.Tensor:
        """``sid_vec [T, D]``, ``id_vec [T, D]`` -> fused ``[T, D]``."""
        if sid_vec.shape != id_vec.shape:
            raise ValueError(f"SID and ID vectors differ in shape: {tuple(sid_vec.shape)} vs {tuple(id_vec.shape)}")
        if self._kind == "sum":
            return sid_vec + id_vec
        both = torch.cat([sid_vec, id_vec], dim=-1)  # [T, 2D]
        assert self._proj is not None
        if self._kind == "gate":
            gate = torch.sigmoid(self._proj(both))  # [T, D], in (0, 1)
            return gate * sid_vec + (1.0 - gate) * id_vec
        return self._proj(both)  # fc, mlp
