"""``sid_gen`` token layout: every item step becomes its ``L`` SID code tokens, jagged, never padded.

A batch of ``B`` sequences of *steps* (items) ``[S]`` + ``offsets [B+1]`` becomes ``S * L``
*tokens* ``c_0(x_1) .. c_{L-1}(x_1), c_0(x_2), ...``. A token's id indexes the code table
``[sum_l K_l, D]``, one block of ``K_l`` rows per level (``level_offsets[l] + code``), so the
token embedding is the per-level code row; the encoder adds position (index within the token
sequence) and the relative time bias. Every token of an item carries the item's timestamp;
its query time is the next token's (so a token predicting a code of the same item queries
with that item's time, and an item's last code token with the next item's time: the HSTU
target-time rule).

Teacher forcing: token ``j`` predicts the code of token ``j + 1``; the first item's codes
are not predicted (the supervised rows are ``j >= L - 1``). The last item's last code token
has no target and is not fed, so a training sequence of ``n + 1`` items has ``(n + 1) L - 1``
tokens: exactly the length of a history of ``n`` items plus the ``L - 1`` code tokens a
decoder appends, so ``attention_scale="length"`` divides by the same length in training and
decoding.

Example::

    tokens = code_tokens(step_items, step_offsets, token_of_item)   # [S*L - B], offsets [B+1]
    x = tables.code_table[tokens.ids]                                # [T, D]
"""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sidvid_rec.ops import jagged
from sidvid_rec.semantic_ids.trie import SidTrie

NORM_EPS = 1e-6
"""L2-norm clamp of the logits' cosine (the losses' ``NORM_EPS``)."""


class CodeTokens(NamedTuple):
    ids: Tensor
    """``[T]`` row of each token in the code table."""
    level: Tensor
    """``[T]`` SID level of each token."""
    step: Tensor
    """``[T]`` the step (row of the step arrays) each token comes from."""
    offsets: Tensor
    """``[B+1]`` token offsets."""


def code_tokens(step_items: Tensor, step_offsets: Tensor, token_of_item: Tensor, drop_last: bool = True) -> CodeTokens:
    """Tokens of steps ``step_items [S]`` (``token_of_item [N + 1, L]``: code-table rows of each
    item's codes). ``drop_last``: leave out each sequence's final token (no target)."""
    num_steps, levels = step_items.numel(), token_of_item.shape[1]
    device = step_items.device
    ids = token_of_item[step_items].reshape(-1)  # [S * L]
    level = torch.arange(levels, device=device).repeat(num_steps)
    step = torch.arange(num_steps, device=device).repeat_interleave(levels)
    lengths = jagged.offsets_to_lengths(step_offsets) * levels
    if drop_last:
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[step_offsets[1:][step_offsets[1:] > step_offsets[:-1]] * levels - 1] = False
        ids, level, step = ids[keep], level[keep], step[keep]
        lengths = (lengths - 1).clamp(min=0)
    return CodeTokens(ids, level, step, jagged.lengths_to_offsets(lengths))


class GenerationTables(NamedTuple):
    """What SID generation reads besides the encoder: plain tensors (the model's, or an export's)."""

    code_table: Tensor
    """``[sum_l K_l, D]`` input embedding of every (level, code) token."""
    heads: Tensor
    """``[sum_l K_l, D]`` output vectors: level ``l``'s logits are ``cos(state, heads_l) / temperature``."""
    level_offsets: Tensor
    """``[L + 1]`` first row of each level's block (and the total)."""
    temperature: float
    item_table: Optional[Tensor] = None
    """``[N + 1, D]`` item-ID rows added to each history item's last code token
    (``model.sid_gen_item_ids``), or ``None``."""
    prefix_inputs: bool = False
    """A token's input is the sum of its item's code rows up to its level (``model.sid_gen_prefix_inputs``)."""
    item_output: bool = False
    """The last level scores each child of a prefix with its code's output vector plus its item's
    ID row (``model.sid_gen_item_output``; needs ``item_table``): :func:`item_level_logits`."""
    node_output: bool = False
    """Every level scores the children of a prefix by their trie nodes (``model.sid_gen_node_output``;
    needs ``item_table`` and ``item_output``): :class:`NodeScorer`."""

    def token_inputs(self, ids: Tensor, levels: int) -> Tensor:
        """``ids [S * L]`` (every step's ``L`` code tokens, in order) -> ``[S * L, D]`` inputs."""
        return item_token_inputs(self.code_table[ids], levels, self.prefix_inputs)

    def level_logits(self, states: Tensor, level: int, child_items: Optional[Tensor] = None) -> Tensor:
        """``states [R, D]`` -> ``[R, K_l]`` logits over level ``level``'s codes. With
        :attr:`item_output`, the last level needs ``child_items [R, K_l]`` (the item each code
        completes under the row's prefix, -1 = none) and scores by :func:`item_level_logits`."""
        start, end = int(self.level_offsets[level]), int(self.level_offsets[level + 1])
        if self.item_output and level == self.level_offsets.numel() - 2:
            if child_items is None or self.item_table is None:
                raise ValueError("item_output: the last level's logits need the item table and each row's child items")
            return item_level_logits(states, self.heads[start:end], self.item_table, child_items, self.temperature)
        keys = F.normalize(self.heads[start:end], dim=-1, eps=NORM_EPS)
        return F.normalize(states, dim=-1, eps=NORM_EPS) @ keys.T / self.temperature


def item_level_logits(states: Tensor, level_heads: Tensor, item_rows: Tensor, child_items: Tensor,
                      temperature: float) -> Tensor:
    """Last-level logits that know the item each code completes: ``cos(state, heads[c] +
    item_rows[item(prefix, c)]) / temperature`` for every code ``c`` of the row's prefix, ``-inf``
    where no item has ``prefix + c``. The per-level code rows are shared by every item that
    carries the code (the disambiguation code means nothing at all); the item's own row gives
    the last choice per-item capacity, as ``sid_id`` scores each item with its own vector.

    ``states [R, D]``, ``level_heads [K, D]``, ``item_rows [N + 1, D]``, ``child_items [R, K]`` -> ``[R, K]``.
    """
    keys = F.normalize(level_heads.unsqueeze(0) + item_rows[child_items.clamp(min=0)], dim=-1, eps=NORM_EPS)
    logits = torch.einsum("rd,rkd->rk", F.normalize(states, dim=-1, eps=NORM_EPS), keys) / temperature
    return logits.masked_fill(child_items < 0, float("-inf"))


def node_means(trie: SidTrie, item_rows: Tensor, level: int) -> Tensor:
    """``[M_l, D]`` the mean item-ID row of the items under each level-``l`` node
    (``item_rows [N + 1, D]``, row 0 padding; a last-level node holds one item: its row)."""
    nodes = trie.node_of_item[level][1:].to(item_rows.device)
    sums = item_rows.new_zeros(trie.num_nodes(level), item_rows.shape[1]).index_add(0, nodes, item_rows[1:])
    return sums / trie.items_under[level].to(item_rows.device, item_rows.dtype).unsqueeze(1)


class NodeScorer:
    """Logits of every level scored by trie node (``model.sid_gen_node_output``): child ``c`` of a
    prefix ``p`` scores ``cos(state, heads_l[c] + mean item-ID row under node (p, c)) / temperature``,
    and only the prefix's existing children score (``-inf`` elsewhere), in training as in decoding.

    Why: the plain level logits ``cos(state, heads_l[c])`` share one output row per code among
    every item carrying it, whatever its prefix; tying each node to its items' ID rows (no new
    parameters) gives every prefix its own output vector, so the factorised ``p(c_0) p(c_1 | c_0) ...``
    scores items with item capacity, as ``sid_id``'s softmax does. At the last level a node is one
    item, so this is :func:`item_level_logits` exactly. The node means cost ``O(N D)`` per
    forward: the option is for catalogues where the item table is at hand anyway.

    Args: ``trie``; ``heads [sum K_l, D]``; ``level_offsets [L + 1]``; ``item_rows [N + 1, D]``.
    """

    def __init__(self, trie: SidTrie, heads: Tensor, level_offsets: Tensor, item_rows: Tensor,
                 temperature: float) -> None:
        self.trie, self.temperature = trie, temperature
        self.level_sizes = [int(level_offsets[level + 1] - level_offsets[level]) for level in range(trie.num_levels)]
        # index_select, not indexing: its backward is an index_add, far cheaper on the CPU than
        # the accumulating index_put that indexing's backward runs
        self.keys = [F.normalize(heads.index_select(0, int(level_offsets[level]) + trie.node_code[level].to(heads.device))
                                 + node_means(trie, item_rows, level), dim=-1, eps=NORM_EPS)
                     for level in range(trie.num_levels)]  # [M_l, D] per level

    @classmethod
    def of(cls, tables: GenerationTables, trie: SidTrie) -> "NodeScorer":
        if tables.item_table is None:
            raise ValueError("node_output scores the trie nodes by their items' ID rows: it needs the item table")
        return cls(trie, tables.heads, tables.level_offsets, tables.item_table, tables.temperature)

    def logits(self, states: Tensor, level: int, parents: Tensor) -> Tensor:
        """``states [R, D]``, ``parents [R]`` level-``l-1`` nodes (the root 0 at level 0) -> ``[R, K_l]``."""
        child = self.trie.child_nodes[level].to(states.device)[parents]  # [R, C_l], packed, -1 pads
        code = self.trie.child_codes[level].to(states.device)[parents]
        queries = F.normalize(states, dim=-1, eps=NORM_EPS)
        keys = self.keys[level]
        if keys.shape[0] <= 2 * child.shape[1]:  # few nodes (the first level): one matmul beats a [R, C, D] gather
            packed = (queries @ keys.T).gather(1, child.clamp(min=0)) / self.temperature
        else:
            gathered = keys.index_select(0, child.clamp(min=0).reshape(-1)).view(*child.shape, -1)  # [R, C_l, D]
            packed = torch.einsum("rd,rcd->rc", queries, gathered) / self.temperature
        packed = packed.masked_fill(child < 0, float("-inf"))
        size = self.level_sizes[level]
        spread = packed.new_full((packed.shape[0], size + 1), float("-inf"))  # column K_l takes the pads
        return spread.scatter(1, torch.where(child >= 0, code, size), packed)[:, :size]


def item_token_inputs(rows: Tensor, levels: int, prefix_inputs: bool) -> Tensor:
    """``rows [S * L, D]`` code rows of whole steps -> the token inputs: the rows themselves, or
    with ``prefix_inputs`` each step's running sum over its levels (level l: rows 0..l)."""
    if not prefix_inputs:
        return rows
    return rows.view(-1, levels, rows.shape[-1]).cumsum(dim=1).view_as(rows)


def level_offsets(level_sizes) -> Tensor:
    """``[L + 1]`` exclusive cumulative sum of the per-level code counts."""
    return jagged.lengths_to_offsets(torch.as_tensor(list(level_sizes), dtype=torch.int64))


def token_table(codes: Tensor, offsets: Tensor) -> Tensor:
    """``[N + 1, L]`` code-table row of every item's codes (row 0, padding: row 0 of each level)."""
    return codes.clamp(min=0) + offsets[:-1].unsqueeze(0)


class GenInputs(NamedTuple):
    """Histories prepared for SID generation: their tokens and where decoding continues."""

    x: Tensor
    """``[T, D]`` token embeddings of the histories."""
    offsets: Tensor
    """``[B+1]`` token offsets."""
    timestamps: Tensor
    """``[T]`` token times (the item's)."""
    query_timestamps: Tensor
    """``[T]`` query times (the next token's; the last one: the recommendation's time)."""
    target_timestamps: Tensor
    """``[B]`` time of the item to generate."""
    history: Tensor
    """``[S]`` history item ids (to filter)."""
    history_offsets: Tensor
    """``[B+1]``."""


def prepare_histories(tables: GenerationTables, token_of_item: Tensor, items: Tensor, times: Tensor,
                      offsets: Tensor, target_times: Tensor, history: Optional[Tensor] = None,
                      history_offsets: Optional[Tensor] = None) -> GenInputs:
    """Token inputs of histories ``items [S]`` (times ``[S]``, offsets ``[B+1]``) whose next
    item comes at ``target_times [B]``; ``history`` (default: ``items``) is what filtering removes."""
    tokens = code_tokens(items, offsets, token_of_item, drop_last=False)
    token_times = times[tokens.step]
    query = jagged.next_timestamps(token_times, tokens.offsets, last=target_times)
    x = tables.token_inputs(tokens.ids, token_of_item.shape[1])
    if tables.item_table is not None:  # every history item is complete: its last code token carries its ID row
        last = tokens.level == token_of_item.shape[1] - 1
        x = x.index_add(0, torch.nonzero(last).flatten(), tables.item_table[items[tokens.step[last]]])
    return GenInputs(x, tokens.offsets, token_times, query, target_times,
                     items if history is None else history, offsets if history_offsets is None else history_offsets)


def append_rows(values: Tensor, offsets: Tensor, extra: Tensor) -> Tensor:
    """``values [T, ...]`` with ``extra [B, m, ...]`` appended to each sequence: ``[T + B m, ...]``
    (offsets of the result: ``offsets + m * arange(B + 1)``)."""
    batch, m = extra.shape[0], extra.shape[1]
    seq = jagged.sequence_ids(offsets, values.shape[0])
    out = values.new_empty((values.shape[0] + batch * m,) + tuple(values.shape[1:]))
    out[torch.arange(values.shape[0], device=values.device) + seq * m] = values
    ends = offsets[1:] + m * torch.arange(1, batch + 1, device=offsets.device)  # end of each new sequence
    rows = (ends.unsqueeze(1) - m + torch.arange(m, device=offsets.device)).reshape(-1)
    out[rows] = extra.reshape((batch * m,) + tuple(extra.shape[2:]))
    return out
