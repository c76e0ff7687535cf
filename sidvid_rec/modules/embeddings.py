"""Item embedding tables as one TorchRec ``EmbeddingBagCollection`` (item-ID and SID-prefix).

Glossary: ``N`` items with ids ``1..N`` (id 0 = padding), SIDs of ``L`` codes, width ``D``.

* **item-ID table** ``item_id``: ``N + 1`` rows; each position is one bag of length 1.
* **SID-prefix table** ``sid_prefix`` (prefixN): an item with SID ``(c1, ..., cL)`` is the
  SUM bag of rows ``h(c1), h(c1, c2), ..., h(c1..cL)``, so items sharing a prefix share
  that part of their vector (helps long-tail items). ``h`` is computed once, offline, by
  :func:`~sidvid_rec.semantic_ids.codebook.sid_prefix_ids`; the resulting ``[N + 1, L]`` id table is a buffer of the module.

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

from typing import List, NamedTuple, Optional, Union, get_args

import numpy as np
import torch
from torch import nn

from sidvid_rec.data.batches import ITEM_FEATURE, SID_FEATURE, item_features
from sidvid_rec.errors import DataError
from sidvid_rec.types import Fusion, ModelMode, uses_sids
from sidvid_rec.modules.fusion import SidIdFusion
from sidvid_rec.semantic_ids.codebook import sid_prefix_ids
from sidvid_rec.stack import require_fbgemm

require_fbgemm()

from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

INIT_STD = 0.02
"""Rows start as N(0, 0.02) truncated at 2 std, like the reference HSTU's item table."""
TABLE_DIM_MULTIPLE = 4
"""fbgemm's TBE kernels (the fused optimizer path) need table widths divisible by 4; a
width D = 50 (the reference's) is stored as 52 columns and the lookups sliced to 50."""
LOOKUP_CHUNK = 65536
"""Items looked up per EBC call in :meth:`ItemEmbeddings.all_vectors` (bounds peak memory)."""


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
        mode: ModelMode = "id",
        sid_prefix_table: Optional[torch.Tensor] = None,
        sid_table_size: int = 0,
        fusion: Fusion = "sum",
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        super().__init__()
        if mode not in get_args(ModelMode):
            raise ValueError(f"unknown embedding mode {mode!r}; choose one of {', '.join(get_args(ModelMode))}")
        if num_items <= 0 or dim <= 0:
            raise ValueError(f"num_items and dim must be positive, got {num_items} and {dim}")
        self._num_items = num_items
        self._dim = dim
        self._table_dim = -(-dim // TABLE_DIM_MULTIPLE) * TABLE_DIM_MULTIPLE
        self._mode: ModelMode = mode
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
        mode: ModelMode,
        codes: Optional[Union[np.ndarray, torch.Tensor]] = None,
        sid_table_size: int = 0,
        fusion: Fusion = "sum",
        device: Optional[Union[str, torch.device]] = None,
    ) -> "ItemEmbeddings":
        """Builds the module from raw SID codes ``[N + 1, L]`` (hashing their prefixes here)."""
        prefix = None
        if uses_sids(mode):
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
    def mode(self) -> ModelMode:
        return self._mode

    @property
    def uses_id(self) -> bool:
        return self._mode != "sid"

    @property
    def uses_sid(self) -> bool:
        return uses_sids(self._mode)

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
        """Raises a one-line :class:`DataError` naming the first id outside ``[0, N]``.

        Checked on CPU tensors only: reading ids on a GPU would sync the host every lookup. Ids on
        a GPU come from batches already checked on the host (``SequenceBatch.check_item_ids``),
        or are computed (``arange``, sampled negatives, the SID catalogue) in range.
        """
        if item_ids.numel() == 0 or item_ids.device.type != "cpu":
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
        return item_features(ids, self.feature_names, self.sid_prefix_table if self.uses_sid else None, num_bags)

    def forward(self, features: KeyedJaggedTensor) -> ItemVectors:
        """Pooled lookups: KJT from :meth:`features` -> :class:`ItemVectors` ``[B, D]`` each.

        Read by feature name: a sharded EBC may return its keys in another order.
        """
        pooled = self.ebc(features).to_dict()
        return ItemVectors(id_vec=self._narrow(pooled.get(ITEM_FEATURE)), sid_vec=self._narrow(pooled.get(SID_FEATURE)))

    def lookup(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Fused item vectors ``[stride, D]`` of a batch-provided KJT (modes ``id``, ``sid``,
        ``sid_id``): one table lookup, no KJT built here. Symbolically traceable (torchrec's
        pipeline traces it to find the lookup's input in the batch)."""
        return self.fuse(self(features))

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
