"""Item embedding tables as one TorchRec ``EmbeddingBagCollection`` (item-ID and SID-prefix).

Glossary: ``N`` items with ids ``1..N`` (id 0 = padding), SIDs of ``L`` codes, width ``D``.

* **item-ID table** ``item_id``: ``N + 1`` rows; each position is one bag of length 1.
* **SID-prefix table** ``sid_prefix`` (prefixN): an item with SID ``(c1, ..., cL)`` is the
  SUM bag of rows ``h(c1), h(c1, c2), ..., h(c1..cL)``, so items sharing a prefix share
  that part of their vector (helps long-tail items). ``h`` is computed once, offline, by
  :func:`sid_prefix_ids`; the resulting ``[N + 1, L]`` id table is a buffer of the module.

The sparse lookup (``self.ebc``) is a separate submodule from the dense fusion
(``self.fusion``), so ``DistributedModelParallel`` shards the tables (fbgemm kernels,
fused optimizer) and wraps the rest in DDP. Build the module with ``device="meta"`` to
let DMP materialise only the local shards; the prefix-id buffer and the fusion layer are
then created on the CPU (DMP would zero a meta buffer), and move with ``.to()``.
fbgemm's kernels need row widths divisible by 4, so rows are stored ``table_dim`` wide
(``dim`` rounded up) and every lookup is sliced back to ``dim``; the extra columns get no
gradient (row-wise Adagrad then averages g^2 over ``table_dim`` columns: for D = 50 its
step is sqrt(52/50) = 1.02x larger). Exported tables should be sliced to ``[:, :dim]``.
Let the planner choose table-wise/row-wise/column-wise with the *fused* kernel: for small
tables it otherwise picks data-parallel + dense kernel, which drops the in-backward optimizer.

Modes: ``id`` (item-ID table only), ``sid`` (SID-prefix only), ``sid_id`` (both, fused
by :class:`~sidvid_rec.modules.fusion.SidIdFusion`), ``cobra`` (both, kept apart: the
SID vector feeds the SID token, the ID vector the VID token).

Example::

    prefix = sid_prefix_ids(codes)                          # codes [N + 1, L]
    emb = ItemEmbeddings(num_items=N, dim=50, mode="sid_id", sid_prefix_table=prefix.ids,
                         sid_table_size=prefix.table_size, fusion="gate")
    x = emb.embed(item_ids)                                 # item_ids [T] -> [T, 50]
"""

from typing import List, Literal, NamedTuple, Optional, Union, get_args

import numpy as np
import torch
from torch import nn

from sidvid_rec.errors import DataError
from sidvid_rec.modules.fusion import FusionKind, SidIdFusion
from sidvid_rec.stack import require_fbgemm

require_fbgemm()

from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

EmbeddingMode = Literal["id", "sid", "sid_id", "cobra"]

ITEM_FEATURE = "item_id"
"""Feature (and table) name of the item-ID lookup."""
SID_FEATURE = "sid_prefix"
"""Feature (and table) name of the SID-prefix lookup."""
PADDING_PREFIX_ID = 0
"""Row of the SID-prefix table reserved for the padding item; no real prefix maps to it."""
INIT_STD = 0.02
"""Rows start as N(0, 0.02) truncated at 2 std, like the reference HSTU's item table."""
TABLE_DIM_MULTIPLE = 4
"""fbgemm's TBE kernels (the fused optimizer path) need table widths divisible by 4; a
width D = 50 (the reference's) is stored as 52 columns and the lookups sliced to 50."""
LOOKUP_CHUNK = 65536
"""Items looked up per EBC call in :meth:`ItemEmbeddings.all_vectors` (bounds peak memory)."""


# ----------------------------------------------------------------------------- prefix ids


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
        _, inverse = np.unique(parent * radix + col, return_inverse=True)
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


# ----------------------------------------------------------------------------- module


class ItemVectors(NamedTuple):
    id_vec: Optional[torch.Tensor]
    """``[T, D]`` item-ID row per position (None when the mode has no ID table)."""
    sid_vec: Optional[torch.Tensor]
    """``[T, D]`` sum of the item's prefix rows per position (None without a SID table)."""


def _table_init(weight: torch.Tensor) -> None:
    torch.nn.init.trunc_normal_(weight, mean=0.0, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)


def _is_meta(device: Optional[Union[str, torch.device]]) -> bool:
    return device is not None and torch.device(device).type == "meta"


class ItemEmbeddings(nn.Module):
    """Item-ID and SID-prefix tables in one ``EmbeddingBagCollection``, plus SID/ID fusion.

    Args:
        num_items: N; the item table has ``N + 1`` rows (0 = padding).
        dim: D, width of every row and of the output vectors.
        mode: ``id``, ``sid``, ``sid_id`` or ``cobra`` (which tables exist, how they combine).
        sid_prefix_table: ``[N + 1, L]`` prefix ids from :func:`sid_prefix_ids`; needed by
            every mode but ``id``.
        sid_table_size: rows of the prefix table; 0 = ``max(sid_prefix_table) + 1``.
        fusion: ``sum``, ``fc``, ``mlp`` or ``gate``; used by ``sid_id`` only.
        device: where the tables are built; ``"meta"`` for DMP (see the module docstring).
    """

    def __init__(
        self,
        num_items: int,
        dim: int,
        mode: EmbeddingMode = "id",
        sid_prefix_table: Optional[torch.Tensor] = None,
        sid_table_size: int = 0,
        fusion: FusionKind = "sum",
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        super().__init__()
        if mode not in get_args(EmbeddingMode):
            raise ValueError(f"unknown embedding mode {mode!r}; choose one of {', '.join(get_args(EmbeddingMode))}")
        if num_items <= 0 or dim <= 0:
            raise ValueError(f"num_items and dim must be positive, got {num_items} and {dim}")
        self._num_items = num_items
        self._dim = dim
        self._table_dim = -(-dim // TABLE_DIM_MULTIPLE) * TABLE_DIM_MULTIPLE
        self._mode: EmbeddingMode = mode
        dense_device = None if _is_meta(device) else device
        table = self._checked_prefix_table(sid_prefix_table) if self.uses_sid else torch.zeros(0, 0, dtype=torch.long)
        self._sid_table_size = 0
        if self.uses_sid:
            self._sid_table_size = sid_table_size or int(table.max()) + 1
            if int(table.max()) >= self._sid_table_size:
                raise DataError(f"SID prefix id {int(table.max())} does not fit a table of {self._sid_table_size} rows")
        self.register_buffer("sid_prefix_table", table.to(dense_device))
        self.ebc = EmbeddingBagCollection(tables=self._table_configs(), device=torch.device(device) if device else None)
        self.fusion: Optional[SidIdFusion] = SidIdFusion(dim, fusion, dense_device) if mode == "sid_id" else None

    @classmethod
    def from_codes(
        cls,
        num_items: int,
        dim: int,
        mode: EmbeddingMode,
        codes: Optional[Union[np.ndarray, torch.Tensor]] = None,
        sid_table_size: int = 0,
        fusion: FusionKind = "sum",
        device: Optional[Union[str, torch.device]] = None,
    ) -> "ItemEmbeddings":
        """Builds the module from raw SID codes ``[N + 1, L]`` (hashing their prefixes here)."""
        prefix = None
        if mode != "id":
            if codes is None:
                raise DataError(f"model mode {mode!r} needs semantic IDs (set sids.dir)")
            prefix = sid_prefix_ids(codes, sid_table_size)
        return cls(num_items, dim, mode, prefix.ids if prefix else None,
                   prefix.table_size if prefix else 0, fusion, device)

    # -- properties

    @property
    def num_items(self) -> int:
        return self._num_items

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def table_dim(self) -> int:
        """Stored row width: ``dim`` rounded up to a multiple of 4 (extra columns unused)."""
        return self._table_dim

    @property
    def mode(self) -> EmbeddingMode:
        return self._mode

    @property
    def uses_id(self) -> bool:
        return self._mode != "sid"

    @property
    def uses_sid(self) -> bool:
        return self._mode != "id"

    @property
    def sid_table_size(self) -> int:
        return self._sid_table_size

    @property
    def feature_names(self) -> List[str]:
        """KJT keys, in the order :meth:`features` writes them."""
        return [name for name, used in ((ITEM_FEATURE, self.uses_id), (SID_FEATURE, self.uses_sid)) if used]

    # -- construction helpers

    def _checked_prefix_table(self, table: Optional[torch.Tensor]) -> torch.Tensor:
        if table is None:
            raise DataError(f"model mode {self._mode!r} needs a SID prefix table (set sids.dir)")
        table = torch.as_tensor(table, dtype=torch.long)
        if table.dim() != 2 or table.shape[0] != self._num_items + 1:
            raise DataError(
                f"SID prefix table has shape {tuple(table.shape)}, expected [{self._num_items + 1}, layers]: "
                "the semantic IDs were built for another item set"
            )
        if int(table.min()) < 0:
            raise DataError(f"SID prefix ids must be non-negative, found {int(table.min())}")
        return table

    def _table_configs(self) -> List[EmbeddingBagConfig]:
        init = _table_init
        configs = []
        if self.uses_id:
            configs.append(EmbeddingBagConfig(
                name=ITEM_FEATURE, embedding_dim=self._table_dim, num_embeddings=self._num_items + 1,
                feature_names=[ITEM_FEATURE], pooling=PoolingType.SUM, init_fn=init,
            ))
        if self.uses_sid:
            configs.append(EmbeddingBagConfig(
                name=SID_FEATURE, embedding_dim=self._table_dim, num_embeddings=self._sid_table_size,
                feature_names=[SID_FEATURE], pooling=PoolingType.SUM, init_fn=init,
            ))
        return configs

    # -- lookups

    def check_ids(self, item_ids: torch.Tensor) -> None:
        """Raises a one-line :class:`DataError` naming the first id outside ``[0, N]``."""
        if item_ids.numel() == 0:
            return
        bad = (item_ids < 0) | (item_ids > self._num_items)
        if bool(bad.any()):
            first = int(item_ids[bad][0])
            raise DataError(f"item id {first} is outside the item table [0, {self._num_items}]")

    def features(self, item_ids: torch.Tensor, num_bags: Optional[int] = None) -> KeyedJaggedTensor:
        """KJT with one bag per position: ``item_id`` (length 1) and/or ``sid_prefix`` (length L).

        Args:
            item_ids: ``[T]`` ids in ``[0, N]``.
            num_bags: pad with empty bags to this many per feature (row-wise sharding on gloo
                needs equal bag counts on every rank); default ``T``.

        Returns:
            KJT with keys :attr:`feature_names`, stride ``num_bags``; values feature-major.
        """
        ids = item_ids.reshape(-1).long()
        self.check_ids(ids)
        num_positions = ids.numel()
        num_bags = num_positions if num_bags is None else num_bags
        if num_bags < num_positions:
            raise ValueError(f"num_bags={num_bags} is smaller than the {num_positions} positions")
        pad = torch.zeros(num_bags - num_positions, dtype=torch.long, device=ids.device)
        values, lengths = [], []
        if self.uses_id:
            values.append(ids)
            lengths += [torch.ones_like(ids), pad]
        if self.uses_sid:
            prefixes = self.sid_prefix_table.to(ids.device)[ids]  # [T, L]
            values.append(prefixes.reshape(-1))
            lengths += [torch.full_like(ids, prefixes.shape[1]), pad]
        return KeyedJaggedTensor.from_lengths_sync(
            keys=self.feature_names, values=torch.cat(values), lengths=torch.cat(lengths)
        )

    def forward(self, features: KeyedJaggedTensor) -> ItemVectors:
        """Pooled lookups: KJT from :meth:`features` -> :class:`ItemVectors` ``[B, D]`` each.

        Read by feature name: a sharded EBC may return its keys in another order.
        """
        pooled = self.ebc(features).to_dict()
        return ItemVectors(id_vec=self._narrow(pooled.get(ITEM_FEATURE)), sid_vec=self._narrow(pooled.get(SID_FEATURE)))

    def _narrow(self, pooled: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Drops the padding columns of the stored rows: ``[B, table_dim]`` -> ``[B, D]``."""
        if pooled is None or self._table_dim == self._dim:
            return pooled
        return pooled[:, : self._dim]

    def vectors(self, item_ids: torch.Tensor, num_bags: Optional[int] = None) -> ItemVectors:
        """``item_ids [T]`` -> :class:`ItemVectors` with ``[T, D]`` tensors (padding bags dropped)."""
        num_positions = item_ids.numel()
        if num_positions == 0 and not num_bags:  # a KJT of stride 0 breaks the EBC
            empty = torch.zeros(0, self._dim, device=item_ids.device)
            return ItemVectors(empty if self.uses_id else None, empty if self.uses_sid else None)
        out = self(self.features(item_ids, num_bags))
        return ItemVectors(
            id_vec=None if out.id_vec is None else out.id_vec[:num_positions],
            sid_vec=None if out.sid_vec is None else out.sid_vec[:num_positions],
        )

    def fuse(self, vectors: ItemVectors) -> torch.Tensor:
        """The item vector of modes ``id`` / ``sid`` / ``sid_id`` from its parts: ``[T, D]``."""
        if self._mode == "id":
            return vectors.id_vec
        if self._mode == "sid":
            return vectors.sid_vec
        if self._mode == "sid_id":
            assert self.fusion is not None
            return self.fusion(vectors.sid_vec, vectors.id_vec)
        raise ValueError("mode 'cobra' keeps SID and ID vectors apart: use vectors() instead of embed()/fuse()")

    def embed(self, item_ids: torch.Tensor, num_bags: Optional[int] = None) -> torch.Tensor:
        """``item_ids [T]`` -> fused item vector ``[T, D]`` (modes ``id``, ``sid``, ``sid_id``)."""
        return self.fuse(self.vectors(item_ids, num_bags))

    def all_vectors(self, chunk: int = LOOKUP_CHUNK) -> ItemVectors:
        """Vectors of every item id ``0..N``: ``[N + 1, D]`` each, looked up in chunks.

        With a sharded EBC every rank must call this (each chunk is a collective).
        """
        ids = torch.arange(self._num_items + 1, device=self.sid_prefix_table.device)
        parts = [self.vectors(ids[start:start + chunk]) for start in range(0, ids.numel(), chunk)]
        return ItemVectors(
            id_vec=torch.cat([p.id_vec for p in parts]) if self.uses_id else None,
            sid_vec=torch.cat([p.sid_vec for p in parts]) if self.uses_sid else None,
        )

    def all_item_vectors(self, chunk: int = LOOKUP_CHUNK) -> torch.Tensor:
        """Fused vector of every item id ``0..N``: ``[N + 1, D]`` (full-ranking evaluation)."""
        return self.fuse(self.all_vectors(chunk))
