"""``sid_gen`` retrieval from an export: the trie-constrained beam search over exported tensors only.

A ``sid_gen`` export holds, besides the HSTU encoder's weights (``dense.safetensors``):

* ``sid_code_table [sum K, D]``: the code-token embedding (one block of rows per SID level);
* ``sid_heads [sum K, D]``: the per-level output vectors of the code logits;
* ``sid_codes [N + 1, L]``: every item's SID, disambiguation level included (the trie);
* ``sid_item_table [N + 1, D]`` (``model.sid_gen_item_ids`` only): item-ID rows added to each
  history item's last code token;

and the manifest's ``sid_gen`` section (history length, logit temperature, beam width, whether
to decode from the KV cache). Retrieval runs :func:`~sidvid_rec.decode.sid_beam.sid_beam_search`
exactly as evaluation does, from the encoder's KV cache by default.

Example::

    gen = load_sid_gen(manifest, encoder, vectors, filter_history=True)
    top = gen.top_k(HistoryBatch.single([12, 7, 301]), k=10)   # top.items [1, 10]
"""

from typing import Any, Dict

import torch
from torch import Tensor

from sidvid_rec.decode.base import TopK
from sidvid_rec.decode.sid_beam import sid_beam_search
from sidvid_rec.errors import ArtifactError
from sidvid_rec.export.cobra import HistoryBatch, keep_recent
from sidvid_rec.modules.hstu import HSTUEncoder
from sidvid_rec.modules.sid_tokens import GenerationTables, level_offsets, prepare_histories, token_table
from sidvid_rec.ops import jagged
from sidvid_rec.semantic_ids.trie import SidTrie

VECTOR_KEYS = ("sid_code_table", "sid_heads", "sid_codes")
"""Tensors of ``item_vectors.safetensors`` that a ``sid_gen`` export adds."""


def sid_gen_manifest_section(max_len: int, levels: int, temperature: float, beam: int, kv_cache: bool,
                             prefix_inputs: bool = False, item_output: bool = False,
                             node_output: bool = False) -> Dict[str, Any]:
    """The manifest's ``sid_gen`` section (written by the export, read by :func:`load_sid_gen`);
    ``prefix_inputs``, ``item_output`` and ``node_output`` are written only when true, so older
    exports read as they were."""
    section = {"max_len": max_len, "levels": levels, "temperature": temperature, "beam": beam, "kv_cache": kv_cache}
    flags = {name: True for name, on in (("prefix_inputs", prefix_inputs), ("item_output", item_output),
                                         ("node_output", node_output)) if on}
    return {**section, **flags}


class SidGenRetriever:
    """Beam-search retrieval of a ``sid_gen`` export."""

    def __init__(self, encoder: HSTUEncoder, tables: GenerationTables, codes: Tensor, max_len: int, beam: int,
                 kv_cache: bool, filter_history: bool) -> None:
        self.encoder = encoder.eval()
        self.tables, self.trie = tables, SidTrie.from_codes(codes.numpy())
        self.token_of_item = token_table(codes, tables.level_offsets)
        self.max_len, self.beam, self.kv_cache, self.filter_history = max_len, beam, kv_cache, filter_history

    @torch.no_grad()
    def top_k(self, batch: HistoryBatch, k: int) -> TopK:
        """``TopK [B, k]``: the most recent ``max_len`` history items are encoded, all are filtered."""
        keep = keep_recent(batch.offsets, self.max_len)
        offsets = jagged.lengths_to_offsets(jagged.offsets_to_lengths(batch.offsets).clamp(max=self.max_len))
        inputs = prepare_histories(self.tables, self.token_of_item, batch.item_ids[keep], batch.timestamps[keep],
                                   offsets, batch.query_times, history=batch.item_ids, history_offsets=batch.offsets)
        return sid_beam_search(self.encoder, self.tables, self.trie, inputs, k, beam=self.beam,
                               kv_cache=self.kv_cache, filter_history=self.filter_history)


def load_sid_gen(manifest: Dict[str, Any], encoder: HSTUEncoder, vectors: Dict[str, Tensor],
                 filter_history: bool) -> SidGenRetriever:
    """The ``sid_gen`` retriever of an export from its verified files (``vectors``: safetensors contents)."""
    section = manifest.get("sid_gen")
    missing = [k for k in VECTOR_KEYS if k not in vectors] + ([] if isinstance(section, dict) else ["section sid_gen"])
    if missing:
        raise ArtifactError(f"this sid_gen export lacks {missing[0]}; run `sidvid-rec export` again")
    codes = vectors["sid_codes"].long()
    trie = SidTrie.from_codes(codes.numpy())
    offsets = level_offsets(trie.level_sizes)
    table, heads = vectors["sid_code_table"], vectors["sid_heads"]
    if table.shape != heads.shape or table.shape[0] != int(offsets[-1]) or table.shape[1] != encoder.dim:
        raise ArtifactError(f"export: sid_code_table {tuple(table.shape)} / sid_heads {tuple(heads.shape)} do not "
                            f"fit {int(offsets[-1])} codes of width {encoder.dim}")
    max_len, levels = int(section.get("max_len", 0)), int(section.get("levels", 0))
    if levels != trie.num_levels or not 1 <= max_len or (max_len + 1) * levels - 1 > encoder.max_len:
        raise ArtifactError(f"export manifest: sid_gen max_len {max_len} x {levels} levels does not fit the "
                            f"encoder's {encoder.max_len} tokens or the {trie.num_levels}-level SIDs")
    item_table = vectors.get("sid_item_table")
    if item_table is not None and tuple(item_table.shape) != (codes.shape[0], encoder.dim):
        raise ArtifactError(f"export: sid_item_table {tuple(item_table.shape)} does not fit {codes.shape[0]} items "
                            f"of width {encoder.dim}")
    item_output, node_output = bool(section.get("item_output", False)), bool(section.get("node_output", False))
    if (item_output or node_output) and item_table is None:
        raise ArtifactError("this sid_gen export scores items at the last level but lacks sid_item_table; "
                            "run `sidvid-rec export` again")
    if node_output and not item_output:
        raise ArtifactError("export manifest: sid_gen node_output without item_output; run `sidvid-rec export` again")
    tables = GenerationTables(table, heads, offsets, float(section["temperature"]), item_table,
                              bool(section.get("prefix_inputs", False)), item_output, node_output)
    return SidGenRetriever(encoder, tables, codes, max_len, int(section.get("beam", 0)),
                           bool(section.get("kv_cache", True)), filter_history)
