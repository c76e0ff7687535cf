"""``sid_gen``: generative retrieval over semantic IDs with the jagged HSTU (TIGER-style, decoder-only).

Each item is its ``L`` SID code tokens (the disambiguation level included, so a SID names one
item); the encoder reads the history's tokens (:mod:`sidvid_rec.modules.sid_tokens` for the
layout, timestamps and query times) and predicts every code of every item after the first.

Training step (S = steps, B = sequences, T = (S + B) L - B tokens)::

    steps = inputs + each sequence's last target                items [S + B], times, offsets [B+1]
    tokens [T] (each item's L codes, the last token dropped) --code table--> x [T, D]
    x --HSTUEncoder--> h [T, D]
    token j >= L - 1 of a sequence predicts token j + 1's code: full softmax over the K_l codes
    of its level (cosine with the level's output vectors / temperature), teacher-forced, jagged

Retrieval (:mod:`sidvid_rec.decode.sid_beam`): the history's tokens are encoded once (KV
cache); a beam search over the ``L`` levels, constrained to the trie of valid SIDs
(:class:`~sidvid_rec.semantic_ids.trie.SidTrie`), appends one code token per beam per level
and returns the top-K items with their sequence log-probabilities.
"""

from typing import Dict, Optional

import numpy as np
import torch
from torch import Tensor, nn

from sidvid_rec.data.batches import SequenceBatch
from sidvid_rec.losses import code_softmax_loss
from sidvid_rec.models.hstu_rec import StepOutput
from sidvid_rec.modules.code_embeddings import CodeTokenEmbeddings
from sidvid_rec.modules.embeddings import INIT_STD
from sidvid_rec.modules.hstu import HSTUEncoder
from sidvid_rec.modules.interleave import append_step
from sidvid_rec.modules.sid_tokens import (GenerationTables, GenInputs, NodeScorer, code_tokens, item_level_logits,
                                           item_token_inputs, level_offsets, prepare_histories, token_table)
from sidvid_rec.ops import jagged
from sidvid_rec.semantic_ids.trie import SidTrie


def sid_gen_max_tokens(max_len: int, levels: int) -> int:
    """Tokens of the longest sequence: ``max_len`` history items plus the ``L - 1`` code tokens
    a decoder appends (= a training sequence of ``max_len + 1`` items, its last token dropped)."""
    return (max_len + 1) * levels - 1


class SidGenRecommender(nn.Module):
    """HSTU over SID code tokens with the next-code loss and what the beam search reads.

    Args:
        embeddings: the code-token table (``sum_l K_l`` rows).
        encoder: jagged HSTU whose ``max_len`` covers :func:`sid_gen_max_tokens`.
        codes: ``[N + 1, L]`` SIDs with the disambiguation level (unique over items 1..N).
        temperature: of the code logits (cosine / temperature).
        item_ids: the table also holds ``N + 1`` item-ID rows (after the code rows), added to
            each complete history item's last code token (``model.sid_gen_item_ids``).
        prefix_inputs: a token's input sums its item's code rows up to its level
            (``model.sid_gen_prefix_inputs``).
        item_output: the last level's logits add each child's item-ID row to its code's output
            vector (``model.sid_gen_item_output``; needs ``item_ids``):
            :func:`~sidvid_rec.modules.sid_tokens.item_level_logits`.
        node_output: every level scores the prefix's children by their trie nodes' items
            (``model.sid_gen_node_output``; needs ``item_output``, whose last level it extends to
            every level): :class:`~sidvid_rec.modules.sid_tokens.NodeScorer`.
    """

    def __init__(self, embeddings: CodeTokenEmbeddings, encoder: HSTUEncoder, codes: np.ndarray,
                 temperature: float = 0.05, item_ids: bool = False, prefix_inputs: bool = False,
                 item_output: bool = False, node_output: bool = False) -> None:
        super().__init__()
        if item_output and not item_ids:
            raise ValueError("item_output scores the last level with the item-ID rows: it needs item_ids")
        if node_output and not item_output:
            raise ValueError("node_output extends item_output's item-scored last level to every level: it needs item_output")
        self.trie = SidTrie.from_codes(codes)
        offsets = level_offsets(self.trie.level_sizes)
        rows = int(offsets[-1]) + (self.trie.num_items + 1 if item_ids else 0)
        if embeddings.num_rows != rows:
            raise ValueError(f"the code table has {embeddings.num_rows} rows, the SIDs need {rows}")
        self.item_ids, self.prefix_inputs, self.item_output = item_ids, prefix_inputs, item_output
        self.node_output = node_output
        self.embeddings = embeddings
        self.encoder = encoder
        self.temperature = temperature
        self.num_levels = self.trie.num_levels
        self.register_buffer("level_offsets", offsets, persistent=False)
        codes_t = torch.as_tensor(np.asarray(codes), dtype=torch.int64)
        self.register_buffer("codes", codes_t.clamp(min=0), persistent=False)
        self.register_buffer("token_of_item", token_table(codes_t, offsets), persistent=False)
        # the level-(L-2) prefix node of each item (the root for one-level SIDs), and the item
        # each last-level code completes under every such node: what item_output scores
        prefix = self.trie.node_of_item[self.num_levels - 2] if self.num_levels > 1 else torch.zeros_like(codes_t[:, 0])
        self.register_buffer("prefix_of_item", prefix.clamp(min=0), persistent=False)
        nodes = torch.arange(self.trie.num_nodes(self.num_levels - 2) if self.num_levels > 1 else 1)
        self.register_buffer("child_items", self.trie.child_items(nodes), persistent=False)
        self.heads = nn.Parameter(torch.empty(int(offsets[-1]), embeddings.dim).normal_(std=INIT_STD))

    @property
    def num_items(self) -> int:
        return self.trie.num_items

    def forward(self, batch: SequenceBatch, generator: Optional[torch.Generator] = None) -> StepOutput:
        """Teacher-forced next-code cross-entropy of a training batch (``generator`` unused: no sampling)."""
        if not batch.next_item_targets:
            raise ValueError("SidGenRecommender.forward needs a training batch (a target per position)")
        items, times = batch.jagged("item_id"), batch.jagged("timestamp")
        targets, target_times = batch.jagged("target_id"), batch.jagged("target_timestamp")
        last = targets.offsets()[1:] - 1  # each sequence's final target = the step after its inputs
        step_items, offsets = append_step(items.values(), items.offsets().long(), targets.values()[last])
        step_times, _ = append_step(times.values(), items.offsets().long(), target_times.values()[last])
        full = code_tokens(step_items, offsets, self.token_of_item, drop_last=False)  # [(S + B) L]
        total = full.ids.numel()
        seq = jagged.sequence_ids(full.offsets, total)
        within = jagged.index_within_sequence(full.offsets, total)
        keep = within < jagged.offsets_to_lengths(full.offsets)[seq] - 1  # the last token has no target
        fed = full.offsets - torch.arange(full.offsets.numel(), device=full.offsets.device)
        token_times = step_times[full.step[keep]]
        x = item_token_inputs(self.embeddings.vectors(full.ids), self.num_levels, self.prefix_inputs)[keep]
        if self.item_ids:  # an item's last code token: the item is complete, and it predicts the next item
            last = torch.nonzero(full.level[keep] == self.num_levels - 1).flatten()
            item_rows = int(self.level_offsets[-1]) + step_items[full.step[keep][last]]
            x = x.index_add(0, last, self.embeddings.vectors(item_rows))
        h = self.encoder(x, fed, token_times,
                         query_timestamps=jagged.next_timestamps(token_times, fed))
        # Supervised: every fed token from the first item's last code on predicts the next token.
        rows = torch.nonzero(keep & (within >= self.num_levels - 1)).flatten()  # in the full layout
        next_level = full.level[rows + 1]
        target_codes = full.ids[rows + 1] - self.level_offsets[next_level]
        states = h[rows - seq[rows]]
        if self.node_output:
            return self._node_loss(states, step_items[full.step[rows + 1]], next_level, target_codes)
        if not self.item_output:
            out = code_softmax_loss(states, target_codes, next_level, self.heads, self.level_offsets, self.temperature)
            return StepOutput(out.loss, out.num_positions)
        last = next_level == self.num_levels - 1
        codes = code_softmax_loss(states[~last], target_codes[~last], next_level[~last], self.heads,
                                  self.level_offsets, self.temperature)
        # the last code of each target: its prefix's children, scored with their items' ID rows
        children = self.child_items[self.prefix_of_item[step_items[full.step[rows[last] + 1]]]]  # [P_L, K_L]
        items, index = torch.unique(children.clamp(min=0), return_inverse=True)  # look each row up once
        logits = item_level_logits(states[last], self.heads[int(self.level_offsets[-2]):],
                                   self.embeddings.vectors(int(self.level_offsets[-1]) + items),
                                   torch.where(children >= 0, index, -1), self.temperature)
        completed = torch.nn.functional.cross_entropy(logits, target_codes[last], reduction="sum")
        return StepOutput((codes.loss * codes.num_positions + completed) / max(rows.numel(), 1), int(rows.numel()))

    def _node_loss(self, states: Tensor, target_items: Tensor, levels: Tensor, target_codes: Tensor) -> StepOutput:
        """Mean next-code cross-entropy with every level scored by trie node: ``states [P, D]``
        predict code ``target_codes [P]`` at ``levels [P]`` of ``target_items [P]``, each over the
        children of the target's prefix (:class:`NodeScorer`)."""
        if self.trie.item_of_leaf.device != states.device:
            self.trie.to(states.device)
        scorer = NodeScorer(self.trie, self.heads, self.level_offsets,
                            self.embeddings.vectors(int(self.level_offsets[-1]) + torch.arange(
                                self.num_items + 1, device=states.device)), self.temperature)
        total = states.new_zeros(())
        for level in range(self.num_levels):
            rows = torch.nonzero(levels == level).flatten()
            if rows.numel() == 0:
                continue
            parents = (self.trie.node_of_item[level - 1][target_items[rows]] if level > 0
                       else torch.zeros_like(rows))
            logits = scorer.logits(states[rows], level, parents)
            total = total + torch.nn.functional.cross_entropy(logits, target_codes[rows], reduction="sum")
        return StepOutput(total / max(states.shape[0], 1), int(states.shape[0]))

    # -- inference

    @torch.no_grad()
    def generation_tables(self) -> GenerationTables:
        """The code table, output vectors and level offsets, and the item rows when the model
        has them (collective under sharding)."""
        rows = self.embeddings.all_vectors(self.level_offsets.device)
        codes = int(self.level_offsets[-1])
        return GenerationTables(rows[:codes], self.heads.detach(), self.level_offsets, self.temperature,
                                rows[codes:] if self.item_ids else None, self.prefix_inputs, self.item_output,
                                self.node_output)

    def prepare(self, batch: SequenceBatch, tables: GenerationTables) -> GenInputs:
        """History tokens of an evaluation batch (one target time per sequence)."""
        items, times = batch.jagged("item_id"), batch.jagged("timestamp")
        return prepare_histories(tables, self.token_of_item, items.values(), times.values(), items.offsets().long(),
                                 batch.jagged("target_timestamp").values())

    @torch.no_grad()
    def export_vectors(self) -> Dict[str, Tensor]:
        """What an export holds: ``inputs``/``candidates [N+1, D]`` (each item's summed code rows,
        and L2-normalised: what the export's FAISS index holds, for similarity look-ups only),
        ``sid_code_table``, ``sid_heads [sum K, D]``, ``sid_codes [N+1, L]`` (what retrieval decodes with),
        and ``sid_item_table [N+1, D]`` with ``item_ids``."""
        tables = self.generation_tables()
        inputs = tables.code_table[self.token_of_item].sum(dim=1)
        inputs[0] = 0.0
        candidates = inputs / inputs.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        out = {"inputs": inputs.contiguous(), "candidates": candidates.contiguous(),
               "sid_code_table": tables.code_table.contiguous(), "sid_heads": tables.heads.contiguous(),
               "sid_codes": self.codes.contiguous()}
        if tables.item_table is not None:
            out["sid_item_table"] = tables.item_table.contiguous()
        return out
