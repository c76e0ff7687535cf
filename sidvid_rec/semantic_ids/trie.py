"""The trie of valid SIDs: which code may follow a prefix, and which item a full SID names.

``codes [N + 1, L]`` (row 0 = padding) with unique rows over items 1..N (the disambiguation
level makes them unique). Level ``l`` (0-based) has ``K_l = max code + 1`` codes; its *nodes*
are the distinct prefixes ``(c_0..c_l)``, numbered ``0 .. M_l - 1`` in lexicographic order.
The root (the empty prefix) is the single node of level ``-1``.

Tensors (all int64):

* ``node_of_item[l] [N + 1]``: the level-``l`` node of each item (-1 for padding);
* ``children[l] [M_{l-1}, K_l]``: the level-``l`` node reached from a level-``l-1`` node by
  code ``c``, or -1 when no item has that prefix (``M_{-1} = 1``, the root);
* ``node_code[l] [M_l]``: the last code of each node; ``node_parent[l] [M_l]`` its level-``l-1``
  node (0, the root, at level 0); ``items_under[l] [M_l]`` its item count;
* ``item_of_leaf [M_{L-1}]``: the item a full SID names;
* ``child_nodes[l] [M_{l-1}, C_l]`` / ``child_codes[l]``: each node's existing children and their
  codes, packed to the left (``C_l`` = the most children any node has; -1 pads): what scoring
  only the valid children reads without a ``K_l``-wide gather per row.

A beam search masks children that are -1 (never an invalid prefix) and, with history
filtering, children whose every item is in the history (:meth:`SidTrie.available_children`;
:meth:`SidTrie.available` is its dense reference).

Example::

    trie = SidTrie.from_codes(codebook.codes)
    trie.children[0][0]          # [K_0] nodes of the first code, -1 where no item starts so
"""

from typing import List

import numpy as np
import torch
from torch import Tensor

from sidvid_rec.errors import DataError


class SidTrie:
    """Valid-SID trie of ``codes [N + 1, L]`` (see the module docstring)."""

    def __init__(self, codes: np.ndarray) -> None:
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] < 2:
            raise DataError(f"SID codes must be a [num_items + 1, levels] table, got shape {codes.shape}")
        real = codes[1:].astype(np.int64)
        if real.min() < 0:
            raise DataError(f"SID codes must be non-negative, found {int(real.min())}")
        self.num_items = real.shape[0]
        self.num_levels = real.shape[1]
        self.level_sizes: List[int] = [int(real[:, level].max()) + 1 for level in range(self.num_levels)]
        self.node_of_item: List[Tensor] = []
        self.children: List[Tensor] = []
        self.node_code: List[Tensor] = []
        self.node_parent: List[Tensor] = []
        self.items_under: List[Tensor] = []
        self.child_nodes: List[Tensor] = []
        self.child_codes: List[Tensor] = []
        parent = np.zeros(self.num_items, dtype=np.int64)  # every item hangs off the root
        num_parents = 1
        for level, size in enumerate(self.level_sizes):
            key = parent * size + real[:, level]
            keys, node, counts = np.unique(key, return_inverse=True, return_counts=True)
            node = node.reshape(-1).astype(np.int64)
            children = np.full((num_parents, size), -1, dtype=np.int64)
            children[keys // size, keys % size] = np.arange(keys.size)
            self.children.append(torch.from_numpy(children))
            self.node_of_item.append(torch.from_numpy(np.concatenate([[-1], node])))
            self.node_code.append(torch.from_numpy(keys % size))
            self.node_parent.append(torch.from_numpy(keys // size))
            self.items_under.append(torch.from_numpy(counts.astype(np.int64)))
            packed = np.argsort(children < 0, axis=1, kind="stable")[:, :max(int((children >= 0).sum(1).max()), 1)]
            nodes = np.take_along_axis(children, packed, axis=1)
            self.child_nodes.append(torch.from_numpy(nodes))
            self.child_codes.append(torch.from_numpy(np.where(nodes >= 0, packed, -1)))
            parent, num_parents = node, keys.size
        if num_parents != self.num_items:  # fewer full SIDs than items (vectorised: no row-wise unique)
            raise DataError("two items share a SID: SID generation needs the disambiguation level (sids dedup)")
        leaf = np.empty(num_parents, dtype=np.int64)
        leaf[parent] = np.arange(1, self.num_items + 1)
        self.item_of_leaf = torch.from_numpy(leaf)

    @classmethod
    def from_codes(cls, codes: np.ndarray) -> "SidTrie":
        return cls(codes)

    def child_items(self, nodes: Tensor) -> Tensor:
        """``[..., K_{L-1}]`` the item each last-level code completes under the level-``L-2``
        prefix ``nodes [...]`` (-1 where no item has that SID)."""
        leaves = self.children[self.num_levels - 1][nodes]
        return torch.where(leaves >= 0, self.item_of_leaf[leaves.clamp(min=0)], -1)

    def num_nodes(self, level: int) -> int:
        return int(self.node_code[level].numel())

    def available(self, level: int, history: Tensor, history_offsets: Tensor) -> Tensor:
        """``[B, M_l]`` bool: level-``l`` nodes with at least one item outside the example's
        history (jagged ``history`` item ids, ``history_offsets [B+1]``); repeated history
        items count once."""
        batch = history_offsets.numel() - 1
        lengths = history_offsets[1:] - history_offsets[:-1]
        user = torch.repeat_interleave(torch.arange(batch, device=history.device), lengths)
        pairs = torch.unique(user * (self.num_items + 1) + history.long())  # distinct (user, item)
        user, item = pairs // (self.num_items + 1), pairs % (self.num_items + 1)
        node = self.node_of_item[level].to(history.device)[item]
        real = node >= 0
        seen = torch.zeros(batch, self.num_nodes(level), dtype=torch.int64, device=history.device)
        seen.index_put_((user[real], node[real]), torch.ones_like(node[real]), accumulate=True)
        return seen < self.items_under[level].to(history.device).unsqueeze(0)

    def available_children(self, level: int, parents: Tensor, history: Tensor, history_offsets: Tensor) -> Tensor:
        """``parents [B, w]`` level-``l-1`` nodes (the beams; the root 0 at level 0) -> ``[B, w, K_l]``
        bool: False where child ``c`` exists and every item under it is in the example's history,
        True elsewhere (children that do not exist are the caller's to mask: ``children < 0``).

        :meth:`available` at the children, without a ``[B, M_l]`` table or a look-up per child:
        only the nodes a history exhausts are found (at most one per distinct history item), then
        matched against the beams, so the cost follows the history, not ``B x w x K``."""
        batch, width = parents.shape
        device = parents.device
        nodes = self.num_nodes(level)
        lengths = (history_offsets[1:] - history_offsets[:-1]).to(device)
        user = torch.repeat_interleave(torch.arange(batch, device=device), lengths)
        pairs = torch.unique(user * (self.num_items + 1) + history.to(device).long())  # distinct (user, item)
        user, item = pairs // (self.num_items + 1), pairs % (self.num_items + 1)
        node = self.node_of_item[level][item]
        real = node >= 0
        keys, seen = torch.unique(user[real] * nodes + node[real], return_counts=True)  # (user, node) -> items seen
        user, node = keys // nodes, keys % nodes
        exhausted = seen >= self.items_under[level][node]
        user, node = user[exhausted], node[exhausted]
        hit = parents[user] == self.node_parent[level][node].unsqueeze(1)  # [E, w]: the beams holding its parent
        pair, beam = hit.nonzero(as_tuple=True)
        allowed = torch.ones(batch, width, self.level_sizes[level], dtype=torch.bool, device=device)
        allowed[user[pair], beam, self.node_code[level][node[pair]]] = False
        return allowed

    def to(self, device: torch.device) -> "SidTrie":
        """Moves every tensor to ``device`` (in place); returns self."""
        for name in ("node_of_item", "children", "node_code", "node_parent", "items_under", "child_nodes",
                     "child_codes"):
            setattr(self, name, [t.to(device) for t in getattr(self, name)])
        self.item_of_leaf = self.item_of_leaf.to(device)
        return self
