"""``sid_gen`` retrieval: beam search over SID codes, constrained to the trie of valid SIDs.

Level by level, each beam (a valid prefix) scores the ``K_l`` codes of the next level
(:meth:`~sidvid_rec.modules.sid_tokens.GenerationTables.level_logits`; with ``item_output`` the
last level scores the items the codes complete, with ``node_output`` every level scores the
children by their trie nodes: :class:`~sidvid_rec.modules.sid_tokens.NodeScorer`); children that no item
has (and, with history filtering, children whose every item is in the example's history) are
masked to ``-inf`` *before* the softmax, so ``log p`` is the model's distribution over the
valid continuations and a beam is never an invalid prefix. A beam's score is the sum of its
codes' ``log p``: the sequence log-probability of its SID, i.e. of its item (the
disambiguation level makes SID -> item unique). The best ``W`` of all ``beams x codes`` are
kept at each level (``W = max(beam, k)``).

Returned lists: ``k`` items, best first, their scores the sequence log-probabilities. When
fewer than ``k`` valid SIDs survive (a small catalogue once the history is removed), the
remaining slots are :data:`~sidvid_rec.types.MISSING_ID` with score ``-inf``; an item outside
the final beam is not ranked (evaluation counts it after every beam item: a miss).

Two ways to get each level's states, one signature (``kv_cache``):

* cached: the history's tokens are encoded once (:meth:`HSTUEncoder.encode_cached` for the
  ``L - 1`` tokens to come), and each level appends one code token per beam
  (:meth:`HSTUEncoder.extend`; the step cache follows the beams as they are pruned);
* re-encoding (the reference): every level re-encodes each beam's history plus its prefix
  tokens plus placeholders up to the final length (causally invisible; they fix the
  ``"length"`` divisor as in training), one encoder pass per beam column.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from sidvid_rec.decode.base import TopK
from sidvid_rec.modules.hstu import StepCache
from sidvid_rec.modules.sid_tokens import GenerationTables, GenInputs, NodeScorer, append_rows
from sidvid_rec.ops import jagged
from sidvid_rec.semantic_ids.trie import SidTrie
from sidvid_rec.types import MISSING_ID


class _CachedStates:
    """States of each level from the KV cache."""

    def __init__(self, encoder: nn.Module, tables: GenerationTables, inputs: GenInputs, levels: int) -> None:
        self.encoder, self.tables = encoder, tables
        out, self.cache = encoder.encode_cached(inputs.x, inputs.offsets, inputs.timestamps,
                                                query_timestamps=inputs.query_timestamps, appended=levels - 1)
        self.first = out[inputs.offsets[1:] - 1]  # [B, D]
        self.lengths = jagged.offsets_to_lengths(inputs.offsets)
        self.times = inputs.target_timestamps
        self.step: Optional[StepCache] = None
        self.prefix: Optional[Tensor] = None  # [B * W, D] each beam's summed code rows (prefix inputs)

    def next(self, level: int, tokens: Tensor, parents: Optional[Tensor]) -> Tensor:
        """``[B * W, D]`` states after appending ``tokens [B, W]`` (the code-table rows of level
        ``level - 1``); ``parents [B * W]``: the row of the previous beams each continues."""
        if self.step is not None and parents is not None:
            self.step = self.step.select(parents)
        x = self.tables.code_table[tokens.reshape(-1)]
        if self.tables.prefix_inputs:  # the token carries its beam's codes so far
            x = x if self.prefix is None else x + self.prefix[parents]
            self.prefix = x
        out, self.step = self.encoder.extend(self.cache, self.step, x, self.times, self.lengths + level - 1,
                                             self.times)
        return out


class _ReencodedStates:
    """States of each level by re-encoding history + prefix + placeholders (the reference)."""

    def __init__(self, encoder: nn.Module, tables: GenerationTables, inputs: GenInputs, levels: int) -> None:
        self.encoder, self.tables, self.inputs, self.levels = encoder, tables, inputs, levels
        self.prefix: Optional[Tensor] = None  # [B, W, l] code-table rows of each beam's tokens
        empty = torch.zeros(inputs.offsets.numel() - 1, 1, 0, dtype=torch.long, device=inputs.x.device)
        self.first = self._encode(empty)[:, 0]

    def _encode(self, prefix: Tensor) -> Tensor:
        """``prefix [B, W, l]`` -> ``[B, W, D]`` the state at each beam's last real token."""
        inputs, (batch, beams, done) = self.inputs, prefix.shape
        pad = self.levels - 1 - done
        lengths = jagged.offsets_to_lengths(inputs.offsets)
        offsets = inputs.offsets + (self.levels - 1) * torch.arange(batch + 1, device=lengths.device)
        times = append_rows(inputs.timestamps, inputs.offsets, inputs.target_timestamps.unsqueeze(1).repeat(1, done + pad))
        query = jagged.next_timestamps(times, offsets)
        read = offsets[:-1] + lengths + done - 1
        states = []
        for w in range(beams):  # one encoder pass per beam column keeps memory at one batch
            new = self.tables.code_table[prefix[:, w]]  # [B, l, D]
            new = new.cumsum(dim=1) if self.tables.prefix_inputs else new
            new = torch.cat([new, new.new_zeros(batch, pad, new.shape[-1])], dim=1)
            x = append_rows(inputs.x, inputs.offsets, new)
            states.append(self.encoder(x, offsets, times, query_timestamps=query)[read])
        return torch.stack(states, dim=1)

    def next(self, level: int, tokens: Tensor, parents: Optional[Tensor]) -> Tensor:
        if self.prefix is None:
            self.prefix = tokens.unsqueeze(2)
        else:
            flat = self.prefix.reshape(-1, self.prefix.shape[2])[parents].view(*tokens.shape, -1)
            self.prefix = torch.cat([flat, tokens.unsqueeze(2)], dim=2)
        return self._encode(self.prefix).reshape(-1, self.first.shape[-1])


def _expand(scores: Tensor, logits: Tensor, children: Tensor, allowed: Optional[Tensor], width: int):
    """One level: ``scores [B, w]`` of the beams, ``logits [B, w, K]``, ``children [B, w, K]``
    nodes (-1 = no such prefix), ``allowed [B, w, K]`` (history filtering) or ``None``
    -> ``(scores [B, w'], parent [B, w'], node [B, w'])``."""
    valid = children >= 0
    if allowed is not None:
        valid &= allowed
    masked = logits.masked_fill(~valid, float("-inf"))
    log_p = torch.log_softmax(masked, dim=2)
    log_p = torch.where(valid.any(dim=2, keepdim=True), log_p, torch.full_like(log_p, float("-inf")))
    total = (scores.unsqueeze(2) + log_p).flatten(1)  # [B, w * K]
    top = total.topk(min(width, total.shape[1]), dim=1)
    parent = torch.div(top.indices, logits.shape[2], rounding_mode="floor")
    node = children.flatten(1).gather(1, top.indices)
    return top.values, parent, node


def beam_over_codes(states_of, tables: GenerationTables, trie: SidTrie, batch: int, width: int,
                    available=None) -> Tuple[Tensor, Tensor]:
    """The trie-constrained beam over the ``L`` levels: ``(scores [B, w], leaf node [B, w])``,
    best first (``w <= width``; dead beams score ``-inf``). ``states_of`` gives each level's
    states (``.first [B, D]``, ``.next(level, tokens, parent_rows)``); ``available(level, beams)``:
    ``[B, w, K]``, which children of the beams' nodes ``beams [B, w]`` have items left after
    history filtering, or ``None``."""
    device = states_of.first.device
    scores = torch.zeros(batch, 1, device=device)
    node = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the root
    states, parent_rows = states_of.first, None
    scorer = NodeScorer.of(tables, trie) if tables.node_output else None
    for level in range(trie.num_levels):
        if level > 0:
            tokens = trie.node_code[level - 1][node] + tables.level_offsets[level - 1]
            states = states_of.next(level, tokens, parent_rows)
        children = trie.children[level][node]
        if scorer is not None:
            logits = scorer.logits(states, level, node.reshape(-1)).view(batch, node.shape[1], -1)
        else:
            completes = None  # item_output: the item each last-level code completes under its beam's prefix
            if tables.item_output and level == trie.num_levels - 1:
                completes = trie.child_items(node).flatten(0, 1)
            logits = tables.level_logits(states, level, completes).view(batch, node.shape[1], -1)
        allowed = None if available is None else available(level, node)
        scores, parent, node = _expand(scores, logits, children, allowed, width)
        node = node.clamp(min=0)  # dead beams (score -inf, fewer valid prefixes than W) point anywhere
        parent_rows = (parent + torch.arange(batch, device=device).unsqueeze(1) * logits.shape[1]).reshape(-1)
    return scores, node


@torch.no_grad()
def sid_beam_search(encoder: nn.Module, tables: GenerationTables, trie: SidTrie, inputs: GenInputs, k: int,
                    beam: int = 0, kv_cache: bool = True, filter_history: bool = True) -> TopK:
    """Top-``k`` items of each history by trie-constrained beam search (width ``max(beam, k)``).

    Returns :class:`TopK` ``[B, k]``: items best first, scores their SID log-probabilities.
    """
    device = inputs.x.device
    if trie.item_of_leaf.device != device:
        trie = trie_on(trie, device)
    levels, width = trie.num_levels, max(beam, k)
    states_of = (_CachedStates if kv_cache else _ReencodedStates)(encoder, tables, inputs, levels)
    batch = inputs.offsets.numel() - 1
    def available(level: int, beams: Tensor) -> Tensor:
        return trie.available_children(level, beams, inputs.history, inputs.history_offsets)

    scores, node = beam_over_codes(states_of, tables, trie, batch, width, available if filter_history else None)
    items = torch.where(torch.isfinite(scores), trie.item_of_leaf[node.clamp(min=0)], MISSING_ID)
    items, scores = items[:, :k], scores[:, :k]
    if items.shape[1] < k:  # fewer SIDs than k in the whole trie
        fill = k - items.shape[1]
        items = torch.cat([items, items.new_full((batch, fill), MISSING_ID)], dim=1)
        scores = torch.cat([scores, scores.new_full((batch, fill), float("-inf"))], dim=1)
    return TopK(items, scores)


def trie_on(trie: SidTrie, device: torch.device) -> SidTrie:
    """A copy of ``trie`` with its tensors on ``device`` (the caller's trie is left where it is)."""
    copy = SidTrie.__new__(SidTrie)
    copy.__dict__.update(trie.__dict__)
    return copy.to(device)
