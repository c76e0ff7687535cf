"""COBRA's code-by-code SID head (``model.cobra_sid_head=codes``): ``L`` next-code softmaxes.

Instead of one softmax over the ``S`` valid SIDs, the state ``h [D]`` that predicts the next
SID (the output at a VID token) is turned into one query per level, level ``l`` conditioned
on the codes of the levels before it (teacher-forced in training, the beam's prefix when
decoding)::

    p_l = level_emb[l] + sum_{m < l} code_in[off_m + c_m]        (the prefix so far)
    q_l = h + mlp(h + p_l)                                       [D]
    logits_l = cos(q_l, heads[off_l : off_{l+1}]) / temperature  [K_l]

The output vectors ``heads``, the level blocks ``off_l`` and the logits are ``sid_gen``'s
(:class:`~sidvid_rec.modules.sid_tokens.GenerationTables`, :func:`~sidvid_rec.losses.code_softmax_loss`),
so training is the same per-level cross-entropy (summed over the levels: the SID's NLL;
:func:`~sidvid_rec.losses.code_head_loss`) and decoding the same trie-constrained beam
over codes (:mod:`sidvid_rec.decode.sid_beam`). The head costs ``L x K`` per position, not
``S``: it does not grow with the catalogue. It is plain torch (no TorchRec table), so an
export rebuilds it from its dense weights.
"""

from typing import Sequence

import torch
from torch import Tensor, nn

from sidvid_rec.modules.sid_tokens import GenerationTables, level_offsets

INIT_STD = 0.02
"""Initial std of the head's rows (the tables' ``INIT_STD``; not imported: an export loads this
module without TorchRec)."""
SID_HEAD_PREFIX = "sid_head."
"""State-dict prefix of the head inside :class:`~sidvid_rec.models.cobra.CobraRecommender` (and an export's dense weights)."""


class SidCodeHead(nn.Module):
    """Per-level code logits of the next SID given a state and the codes before (module docstring).

    Args:
        level_sizes: ``K_l`` of each level (the valid SIDs' ``max code + 1``).
        dim: state width ``D``.
        temperature: of the code logits (cosine / temperature).
    """

    def __init__(self, level_sizes: Sequence[int], dim: int, temperature: float = 0.05) -> None:
        super().__init__()
        offsets = level_offsets(level_sizes)
        rows = int(offsets[-1])
        self.register_buffer("level_offsets", offsets, persistent=False)
        self.temperature = temperature
        self.num_levels = len(level_sizes)
        self.code_in = nn.Parameter(torch.empty(rows, dim).normal_(std=INIT_STD))
        self.heads = nn.Parameter(torch.empty(rows, dim).normal_(std=INIT_STD))
        self.level_emb = nn.Parameter(torch.empty(self.num_levels, dim).normal_(std=INIT_STD))
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def tables(self) -> GenerationTables:
        """``code_in`` as the code table (what a beam appends), ``heads`` as the output vectors."""
        return GenerationTables(self.code_in, self.heads, self.level_offsets, self.temperature)

    def level_queries(self, states: Tensor, prefix: Tensor, level: int) -> Tensor:
        """``states [R, D]``, ``prefix [R, D]`` (summed ``code_in`` rows of the codes so far) -> ``[R, D]``."""
        return states + self.mlp(states + prefix + self.level_emb[level])

    def teacher_forced(self, states: Tensor, codes: Tensor) -> Tensor:
        """``states [P, D]``, target SIDs ``codes [P, L]`` -> ``[P, L, D]`` queries of every level."""
        rows = self.code_in[codes + self.level_offsets[:-1].unsqueeze(0)]  # [P, L, D]
        before = torch.cumsum(rows, dim=1) - rows  # exclusive prefix sums: the codes of levels < l
        queries = states.unsqueeze(1) + before + self.level_emb.unsqueeze(0)
        return states.unsqueeze(1) + self.mlp(queries)
