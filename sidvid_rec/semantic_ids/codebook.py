"""What a semantic ID is: the one place that turns stored codes into SID tuples.

Glossary: ``N`` items with ids ``1..N`` (row 0 = padding item), ``L`` code layers, ``codes
[N + 1, L]`` int64 (row 0 = :data:`~sidvid_rec.semantic_ids.artifacts.PAD_CODE`), ``dedup
[N + 1]`` the TIGER disambiguation code (0, 1, 2, ... among items sharing the whole tuple).

A *SID* is an item's code tuple, with the disambiguation code appended as one more layer when
``use_dedup`` is on (then every item's SID is unique). The *valid SIDs* are the distinct
tuples of the item set, in lexicographic order; ``sid_of_item`` maps an item to its SID's
index among them. *Prefix ids* number every distinct prefix ``(c1..cl)`` of every depth, the
rows of the SID-prefix embedding table (:mod:`sidvid_rec.modules.embeddings`).

Everything that needs distinct tuples (the quality report, the disambiguation code, the SID
index on disk, COBRA's SID catalogue, the prefix table) calls :func:`distinct_tuples` here.

Example::

    book = SemanticIdCodebook.from_artifacts(load_sid_artifacts("out/sids"), use_dedup=True)
    book.codes              # [N + 1, L + 1]
    book.num_sids           # N: unique SIDs with the disambiguation code
    book.catalog().sid_of_item[7]   # index of item 7's SID among the valid SIDs
"""

from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from sidvid_rec.errors import DataError

if TYPE_CHECKING:
    from sidvid_rec.semantic_ids.artifacts import SidArtifacts

PADDING_PREFIX_ID = 0
"""Row of the SID-prefix table reserved for the padding item; no real prefix maps to it."""


def distinct_tuples(codes: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct rows of ``codes [n, L]`` in lexicographic order.

    Returns ``(tuples [S, L], first [S], inverse [n])``: the distinct rows, the index of the
    first row holding each, and each row's index among them.
    """
    tuples, first, inverse = np.unique(codes, axis=0, return_index=True, return_inverse=True)
    return tuples, first, inverse.reshape(-1)


class SidCatalog(NamedTuple):
    sid_of_item: torch.Tensor
    """``[N + 1]`` int64 index of each item's SID among the valid SIDs (-1 for the padding item)."""
    sid_items: torch.Tensor
    """``[S]`` one item carrying each valid SID (its SID vector is the SID's vector)."""


def sid_catalog(codes: np.ndarray) -> SidCatalog:
    """Valid SIDs of ``codes [N + 1, L]`` (row 0 = padding): distinct tuples in lexicographic order."""
    _, first, inverse = distinct_tuples(codes[1:])
    sid_of_item = np.concatenate([[-1], inverse]).astype(np.int64)
    return SidCatalog(torch.from_numpy(sid_of_item), torch.from_numpy(first.astype(np.int64) + 1))


class SidPrefixIds(NamedTuple):
    ids: torch.Tensor
    """``[N + 1, L]`` int64: row i holds ``h(c1), ..., h(c1..cL)`` of item i; row 0 is all 0."""
    table_size: int
    """Rows the ``sid_prefix`` table needs (row 0 included)."""
    num_prefixes: int
    """Distinct real prefixes over all depths (before any modulo)."""


def _prefix_ranks(codes: np.ndarray) -> np.ndarray:
    """Rank of each item's depth-l prefix among the distinct prefixes of all depths.

    ``codes [n, L]`` -> ``[n, L]`` int64. Depth 1 prefixes come first, then depth 2, ...;
    within a depth the order is lexicographic, so the ids are deterministic for a SID table.
    """
    n, num_layers = codes.shape
    ranks = np.empty((n, num_layers), dtype=np.int64)
    parent = np.zeros(n, dtype=np.int64)  # rank of the depth-(l-1) prefix within its depth
    offset = 0
    for layer in range(num_layers):
        col = codes[:, layer]
        radix = int(col.max()) + 1
        if (int(parent.max()) + 1) * radix >= 2**62:
            raise DataError(f"SID codes too large to index prefixes (layer {layer + 1} max code {radix - 1})")
        # (parent prefix, code) identifies the depth-l prefix; ``parent`` is already a rank.
        _, inverse = np.unique(parent * radix + col, return_inverse=True)  # 1-D: much faster than rows
        inverse = inverse.reshape(-1).astype(np.int64)
        ranks[:, layer] = offset + inverse
        offset += int(inverse.max()) + 1
        parent = inverse
    return ranks


def sid_prefix_ids(codes: Union[np.ndarray, torch.Tensor], table_size: int = 0) -> SidPrefixIds:
    """Integer ids of every item's SID prefixes ``h(c1), h(c1,c2), ..., h(c1..cL)``.

    ``h`` is the rank of a prefix among all distinct prefixes (of every depth) plus one, so
    distinct prefixes never collide and row 0 stays reserved for the padding item. With
    ``table_size > 0`` the ids wrap: ``h = 1 + rank mod (table_size - 1)`` (collisions now
    possible, row 0 still reserved).

    Args:
        codes: ``[N + 1, L]`` integer SID codes; row 0 (padding item) is ignored.
        table_size: rows of the prefix table; 0 = one row per distinct prefix (+ padding).

    Returns:
        :class:`SidPrefixIds` with ``ids [N + 1, L]`` (row 0 all ``PADDING_PREFIX_ID``).
    """
    array = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if array.ndim != 2 or array.shape[0] < 2 or array.shape[1] < 1:
        raise DataError(f"SID codes must be a [num_items + 1, layers] table, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"SID codes must be integers, got dtype {array.dtype}")
    real = array[1:].astype(np.int64)
    if real.min() < 0:
        raise DataError(f"SID codes must be non-negative, found {int(real.min())}")
    if table_size < 0 or table_size == 1:
        raise DataError(f"sid_table_size must be 0 (exact) or at least 2, got {table_size}")
    ranks = _prefix_ranks(real)
    num_prefixes = int(ranks[:, -1].max()) + 1
    if table_size == 0:
        real_ids, size = ranks + 1, num_prefixes + 1
    else:
        real_ids, size = 1 + ranks % (table_size - 1), table_size
    ids = np.full(array.shape, PADDING_PREFIX_ID, dtype=np.int64)
    ids[1:] = real_ids
    return SidPrefixIds(torch.from_numpy(ids), size, num_prefixes)


class SemanticIdCodebook:
    """Every item's SID tuple, with or without the disambiguation code.

    Args:
        codes: ``[N + 1, L]`` int64 codes (row 0 = padding).
        dedup: ``[N + 1]`` disambiguation code (row 0 = padding); needed when ``use_dedup``.
        use_dedup: append ``dedup`` as one more SID layer (every SID then unique).
    """

    def __init__(self, codes: np.ndarray, dedup: Optional[np.ndarray] = None, use_dedup: bool = False) -> None:
        if use_dedup:
            if dedup is None:
                raise ValueError("use_dedup needs the disambiguation codes")
            codes = np.concatenate([codes, dedup[:, None]], axis=1)
        self._codes = np.asarray(codes, dtype=np.int64)
        self.use_dedup = use_dedup

    @classmethod
    def from_artifacts(cls, artifacts: "SidArtifacts", use_dedup: bool) -> "SemanticIdCodebook":
        return cls(artifacts.codes, artifacts.dedup, use_dedup)

    @property
    def codes(self) -> np.ndarray:
        """``[N + 1, L']`` SID tuples (``L' = L + 1`` with the disambiguation code)."""
        return self._codes

    @property
    def num_items(self) -> int:
        return int(self._codes.shape[0] - 1)

    @property
    def num_layers(self) -> int:
        return int(self._codes.shape[1])

    @property
    def num_sids(self) -> int:
        """Distinct SID tuples of the item set."""
        return int(distinct_tuples(self._codes[1:])[0].shape[0])

    def truncated(self, layers: int) -> "SemanticIdCodebook":
        """The codebook of the first ``layers`` layers (coarser SIDs); 0 = all layers."""
        if layers < 0 or layers > self.num_layers:
            raise ValueError(f"layers must lie in [0, {self.num_layers}], got {layers}")
        return SemanticIdCodebook(self._codes[:, :layers]) if layers else self

    def catalog(self) -> SidCatalog:
        """The valid SIDs: each item's SID index and one item per SID."""
        return sid_catalog(self._codes)

    def items_of(self, sid: Sequence[int]) -> np.ndarray:
        """Items whose SID equals ``sid`` (empty when no item has it)."""
        return np.flatnonzero((self._codes[1:] == np.asarray(sid, dtype=np.int64)).all(axis=1)) + 1

    def prefix_ids(self, table_size: int = 0) -> SidPrefixIds:
        """Rows of the SID-prefix embedding table of every item (:func:`sid_prefix_ids`)."""
        return sid_prefix_ids(self._codes, table_size)
