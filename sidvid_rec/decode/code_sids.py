"""COBRA's SID candidates from the codes head (``model.cobra_sid_head=codes``): a beam over codes.

The state that predicts the next SID goes through :class:`~sidvid_rec.modules.code_head.SidCodeHead`
level by level; the beam is :func:`~sidvid_rec.decode.sid_beam.beam_over_codes` (``sid_gen``'s),
constrained to the trie of the valid SIDs, so every candidate is a SID some item carries. No
encoder pass per level: the prefix enters through the head alone. The best ``k`` SIDs come
back with their sequence log-probabilities ``sum_l log p(c_l | h, c_<l)`` (the codes head's
``log p(SID | history)``), and the decoders append their SID vectors as with the whole head.

No history filtering here (as with the whole head): the decoders remove history items at
the VID retrieval.
"""

from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from sidvid_rec.decode.sid_beam import beam_over_codes, trie_on
from sidvid_rec.modules.code_head import SidCodeHead
from sidvid_rec.semantic_ids.trie import SidTrie


class _HeadStates:
    """Each level's queries of the code head for the beams (the ``states_of`` of :func:`beam_over_codes`)."""

    def __init__(self, head: SidCodeHead, states: Tensor) -> None:
        self.head, self.states = head, states
        self.prefix = torch.zeros_like(states)  # [R, D] summed code_in rows of each beam's codes
        self.rows = torch.arange(states.shape[0], device=states.device)  # each beam's example
        self.first = head.level_queries(states, self.prefix, 0)

    def next(self, level: int, tokens: Tensor, parents: Optional[Tensor]) -> Tensor:
        """``[B * W, D]`` queries of level ``level`` after appending ``tokens [B, W]`` (code_in rows)."""
        if parents is not None:
            self.prefix, self.rows = self.prefix[parents], self.rows[parents]
        self.prefix = self.prefix + self.head.code_in[tokens.reshape(-1)]
        return self.head.level_queries(self.states[self.rows], self.prefix, level)


def sid_trie(sid_tuples: Tensor) -> SidTrie:
    """Trie of the valid SIDs ``sid_tuples [S, L]``: leaf ``-> 1 + SID index`` (row 0 = padding)."""
    codes = np.asarray(sid_tuples.cpu(), dtype=np.int64)
    return SidTrie.from_codes(np.concatenate([np.zeros((1, codes.shape[1]), dtype=np.int64), codes]))


class CodeSidBeam:
    """Top SIDs of a state by the codes head's trie-constrained beam (a decoder's ``sid_beam``).

    Args:
        head: the trained head (the model's, or rebuilt from an export).
        sid_tuples: ``[S, L]`` codes of each valid SID, in SID-index order.
    """

    def __init__(self, head: SidCodeHead, sid_tuples: Tensor) -> None:
        self.head = head
        self.trie = sid_trie(sid_tuples)
        self.num_sids = int(sid_tuples.shape[0])

    @torch.no_grad()
    def top_sids(self, states: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        """``states [B, D]`` -> ``(log p [B, k'], SID index [B, k'])``, ``k' = min(k, S)``, best first."""
        if self.trie.item_of_leaf.device != states.device:
            self.trie = trie_on(self.trie, states.device)
        width = min(k, self.num_sids)
        scores, node = beam_over_codes(_HeadStates(self.head, states), self.head.tables(), self.trie,
                                       states.shape[0], width)
        return scores[:, :width], self.trie.item_of_leaf[node[:, :width]] - 1
