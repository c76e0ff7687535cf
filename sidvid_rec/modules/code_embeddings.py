"""``sid_gen`` code-token table: one TorchRec ``EmbeddingBagCollection`` table ``sid_code``
of ``sum_l K_l`` rows, one block of ``K_l`` rows per SID level (a token's row is
``level_offsets[l] + code``, :mod:`sidvid_rec.modules.sid_tokens`).

Like :class:`~sidvid_rec.modules.embeddings.ItemEmbeddings` (whose conventions it shares):
rows stored ``dim`` rounded up to a multiple of 4 and sliced back, built on ``meta`` for
DMP, each token one bag of length 1, so the table is sharded and trained by the fused
in-backward optimizer.
"""

from typing import Optional, Union

import torch
from torch import nn

from sidvid_rec.modules.embeddings import LOOKUP_CHUNK, TABLE_DIM_MULTIPLE, _table_init
from sidvid_rec.stack import require_fbgemm

require_fbgemm()

from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

CODE_FEATURE = "sid_code"
"""Feature (and table) name of the code-token lookup."""


class CodeTokenEmbeddings(nn.Module):
    """``num_rows`` code-token rows of width ``dim``; :meth:`vectors` looks tokens up."""

    def __init__(self, num_rows: int, dim: int, device: Optional[Union[str, torch.device]] = None) -> None:
        super().__init__()
        if num_rows <= 0 or dim <= 0:
            raise ValueError(f"num_rows and dim must be positive, got {num_rows} and {dim}")
        self._num_rows, self._dim = num_rows, dim
        self._table_dim = -(-dim // TABLE_DIM_MULTIPLE) * TABLE_DIM_MULTIPLE
        config = EmbeddingBagConfig(name=CODE_FEATURE, embedding_dim=self._table_dim, num_embeddings=num_rows,
                                    feature_names=[CODE_FEATURE], pooling=PoolingType.SUM, init_fn=_table_init)
        self.ebc = EmbeddingBagCollection(tables=[config], device=torch.device(device) if device else None)

    @property
    def num_rows(self) -> int:
        return self._num_rows

    @property
    def dim(self) -> int:
        return self._dim

    def vectors(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``token_ids [T]`` in ``[0, num_rows)`` -> ``[T, D]``."""
        ids = token_ids.reshape(-1).long()
        if ids.numel() == 0:
            return torch.zeros(0, self._dim, device=ids.device)
        if int(ids.min()) < 0 or int(ids.max()) >= self._num_rows:
            raise ValueError(f"code token ids must lie in [0, {self._num_rows})")
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[CODE_FEATURE], values=ids, lengths=torch.ones_like(ids))
        return self.ebc(kjt).to_dict()[CODE_FEATURE][:, : self._dim]

    def all_vectors(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """``[num_rows, D]`` every row (a collective under sharding: every rank must call it)."""
        ids = torch.arange(self._num_rows, device=device)
        return torch.cat([self.vectors(ids[i:i + LOOKUP_CHUNK]) for i in range(0, ids.numel(), LOOKUP_CHUNK)])
