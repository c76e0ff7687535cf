"""Builders: a :class:`~sidvid_rec.config.Config` + data -> the unsharded model.

This is where config sections become the flat typed arguments of the modules below (the
modules never see a config). It builds only: sharding the tables
(:mod:`sidvid_rec.train.distributed`), evaluation (:mod:`sidvid_rec.eval.evaluate`) and export
(:mod:`sidvid_rec.export.writer`) take the model it returns.

Example::

    model = build_model(cfg, data, table_device="cpu")   # HSTURecommender or CobraRecommender
"""

from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from sidvid_rec.config import Config
from sidvid_rec.data import SequenceData, make_split
from sidvid_rec.errors import ArtifactError, ConfigError
from sidvid_rec.losses import InfoNCELoss, SampledSoftmaxLoss
from sidvid_rec.models.cobra import CobraRecommender
from sidvid_rec.models.hstu_rec import HSTURecommender
from sidvid_rec.models.sid_gen import SidGenRecommender, sid_gen_max_tokens
from sidvid_rec.modules.code_embeddings import CodeTokenEmbeddings
from sidvid_rec.modules.embeddings import ItemEmbeddings
from sidvid_rec.modules.hstu import HSTUEncoder, HSTUParams, set_matmul_precision
from sidvid_rec.semantic_ids.artifacts import load_sid_artifacts
from sidvid_rec.semantic_ids.codebook import SemanticIdCodebook
from sidvid_rec.text import embed_dataset
from sidvid_rec.semantic_ids.trie import SidTrie
from sidvid_rec.types import decodes, generates_sids, uses_sids

RecommenderModel = Union[HSTURecommender, CobraRecommender, SidGenRecommender]


def cobra_max_tokens(max_len: int) -> int:
    """Tokens of the longest interleaved sequence: ``max_len`` steps (SID + VID) plus the
    SID token of the step being generated."""
    return 2 * max_len + 1


def load_codebook(cfg: Config, data: SequenceData) -> Optional[SemanticIdCodebook]:
    """The SIDs of the configured artifacts, with the disambiguation code appended when
    ``model.sid_dedup`` or the mode generates SIDs (``None`` in ``id`` mode)."""
    if not uses_sids(cfg.model.mode):
        return None
    if not cfg.sids.dir:
        raise ConfigError(f"model.mode={cfg.model.mode} needs semantic IDs: set sids.dir "
                          "(build them with `sidvid-rec sids build`)")
    artifacts = load_sid_artifacts(cfg.sids.dir)
    if artifacts.codes.shape[0] != data.num_items + 1:
        raise ArtifactError(
            f"semantic IDs in {cfg.sids.dir} cover {artifacts.codes.shape[0] - 1} items, the data set has "
            f"{data.num_items}: they were built for another data set"
        )
    use_dedup = cfg.model.sid_dedup or generates_sids(cfg.model.mode)  # sid_gen: a SID names one item
    return SemanticIdCodebook.from_artifacts(artifacts, use_dedup=use_dedup)


def load_sid_codes(cfg: Config, data: SequenceData) -> Optional[np.ndarray]:
    """``[N + 1, L]`` SID tuples of :func:`load_codebook` (``None`` in ``id`` mode)."""
    codebook = load_codebook(cfg, data)
    return None if codebook is None else codebook.codes


def encoder_params(cfg: Config, sid_levels: int = 0) -> HSTUParams:
    """The HSTU hyperparameters of the ``model`` section; COBRA reads two tokens per item,
    ``sid_gen`` ``sid_levels`` (its SIDs' levels, disambiguation included)."""
    m = cfg.model
    max_len = cfg.data.max_len
    if decodes(m.mode):
        max_len = cobra_max_tokens(cfg.data.max_len)
    elif generates_sids(m.mode):
        max_len = sid_gen_max_tokens(cfg.data.max_len, sid_levels)
    return HSTUParams(max_len=max_len, dim=m.dim, num_blocks=m.num_blocks, num_heads=m.num_heads, dqk=m.dqk,
                      dv=m.dv, dropout=m.dropout, attn_dropout=m.attn_dropout,
                      num_time_buckets=m.num_time_buckets, attention_scale=m.attention_scale)


def build_encoder(cfg: Config, sid_levels: int = 0) -> HSTUEncoder:
    """The HSTU of ``cfg`` (``sid_levels``: as :func:`encoder_params`) with ``train.precision``
    (bf16 autocast on the encoder; the TF32 matmul switch is process-wide,
    :func:`~sidvid_rec.modules.hstu.set_matmul_precision`) and ``train.attention_block`` applied."""
    encoder = HSTUEncoder.from_params(encoder_params(cfg, sid_levels))
    encoder.precision = cfg.train.precision
    encoder.causal_block = cfg.train.attention_block
    set_matmul_precision(cfg.train.precision)
    return encoder


def build_embeddings(cfg: Config, data: SequenceData, codebook: Optional[SemanticIdCodebook],
                     table_device: str = "meta") -> ItemEmbeddings:
    """The TorchRec item tables of the configured mode over ``codebook``'s SIDs."""
    m = cfg.model
    return ItemEmbeddings.from_codes(num_items=data.num_items, dim=m.dim, mode=m.mode,
                                     codes=None if codebook is None else codebook.codes,
                                     sid_table_size=m.sid_table_size, fusion=m.fusion, device=table_device)


def training_item_frequency(cfg: Config, data: SequenceData) -> torch.Tensor:
    """``[N + 1]`` share of each item among the training split's events (held-out items excluded)."""
    values = make_split(data, "train", cfg.data.protocol, cfg.data.max_len).values
    counts = np.bincount(values, minlength=data.num_items + 1).astype(np.float64)
    return torch.from_numpy(counts / max(counts.sum(), 1.0)).float()


def item_text_embeddings(cfg: Config, data: SequenceData) -> torch.Tensor:
    """``[N + 1, E]`` text embeddings of the items with the ``sids`` encoder (cached on disk)."""
    vectors, _ = embed_dataset(cfg, data, progress=False)
    return torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))


def _build_cobra(cfg: Config, data: SequenceData, codebook: SemanticIdCodebook,
                 table_device: str) -> CobraRecommender:
    """The COBRA model over ``codebook``'s SIDs (cut to ``model.cobra_sid_layers``)."""
    m, loss = cfg.model, cfg.loss
    _require_uniform_item_loss(cfg)
    if m.cobra_sid_layers < 0 or m.cobra_sid_layers > codebook.num_layers:
        raise ConfigError(f"model.cobra_sid_layers must lie in [0, {codebook.num_layers}], got {m.cobra_sid_layers}")
    codebook = codebook.truncated(m.cobra_sid_layers)
    # Construction order = draw order of the global torch RNG (tables, encoder, then the losses'
    # queue and the model's own layers): keep it, or the same seed gives another model.
    embeddings, encoder = build_embeddings(cfg, data, codebook, table_device), build_encoder(cfg)
    sid_full = loss.sid_softmax == "full" or (loss.sid_softmax == "auto" and codebook.num_sids <= loss.num_negatives)
    frequency = training_item_frequency(cfg, data) if loss.logq_correction else None
    sid_loss = SampledSoftmaxLoss(num_items=data.num_items, num_negatives=loss.num_negatives,
                                  temperature=loss.temperature, shared=loss.shared_negatives,
                                  negatives_block=loss.negatives_block, fused=loss.fused)
    vid_loss = InfoNCELoss(num_items=data.num_items, negatives=loss.vid_negatives,
                           num_negatives=loss.vid_num_negatives or loss.num_negatives, queue_size=loss.queue_size,
                           dim=m.dim, temperature=loss.temperature, max_in_batch=loss.vid_max_in_batch,
                           item_frequency=frequency, fused=loss.fused)
    text = item_text_embeddings(cfg, data) if m.text_projection else None
    return CobraRecommender(embeddings, encoder, sid_loss, vid_loss, codebook.codes, vid_weight=loss.vid_weight, temperature=loss.temperature,
                            query_time=m.cobra_query_time, text_embeddings=text, sid_full_softmax=sid_full,
                            sid_logq=loss.logq_correction, sid_dropout=m.cobra_sid_dropout,
                            sid_head=m.cobra_sid_head)


def _require_uniform_item_loss(cfg: Config) -> None:
    """``loss.negatives`` and ``loss.label_smoothing`` shape the item softmax of the HSTU modes
    (:func:`hstu_loss`); COBRA and ``sid_gen`` have losses of their own and refuse them."""
    loss = cfg.loss
    if loss.negatives != "uniform" or loss.label_smoothing:
        raise ConfigError(f"loss.negatives={loss.negatives} / loss.label_smoothing={loss.label_smoothing}: "
                          f"model.mode={cfg.model.mode} takes loss.negatives=uniform and no label smoothing "
                          "(they apply to the id/sid/sid_id item softmax)")


def _build_sid_gen(cfg: Config, codebook: SemanticIdCodebook, table_device: str) -> SidGenRecommender:
    """The ``sid_gen`` model over ``codebook``'s SIDs (disambiguation level included)."""
    _require_uniform_item_loss(cfg)
    trie = SidTrie.from_codes(codebook.codes)  # refuses SIDs shared by two items
    item_rows = trie.num_items + 1 if cfg.model.sid_gen_item_ids else 0
    embeddings = CodeTokenEmbeddings(sum(trie.level_sizes) + item_rows, cfg.model.dim, device=table_device)
    encoder = build_encoder(cfg, trie.num_levels)
    return SidGenRecommender(embeddings, encoder, codebook.codes, temperature=cfg.loss.temperature,
                             item_ids=cfg.model.sid_gen_item_ids, prefix_inputs=cfg.model.sid_gen_prefix_inputs,
                             item_output=cfg.model.sid_gen_item_output, node_output=cfg.model.sid_gen_node_output)


def hstu_loss(cfg: Config, data: SequenceData) -> SampledSoftmaxLoss:
    """The item softmax of the HSTU modes: ``loss.negatives`` uniform / all / mixed (+ logQ)."""
    loss = cfg.loss
    mixed_logq = loss.negatives == "mixed" and loss.logq_correction
    return SampledSoftmaxLoss(num_items=data.num_items, num_negatives=loss.num_negatives,
                              temperature=loss.temperature, shared=loss.shared_negatives,
                              negatives=loss.negatives, label_smoothing=loss.label_smoothing,
                              item_frequency=training_item_frequency(cfg, data) if mixed_logq else None,
                              max_in_batch=loss.max_in_batch, negatives_block=loss.negatives_block,
                              fused=loss.fused)


def build_model(cfg: Config, data: SequenceData, table_device: str = "meta") -> RecommenderModel:
    """The unsharded model; tables on ``table_device`` (``meta``: DMP materialises the shards)."""
    codebook = load_codebook(cfg, data)
    if decodes(cfg.model.mode):
        assert codebook is not None  # uses_sids(cobra)
        return _build_cobra(cfg, data, codebook, table_device)
    if generates_sids(cfg.model.mode):
        assert codebook is not None  # uses_sids(sid_gen)
        return _build_sid_gen(cfg, codebook, table_device)
    loss = hstu_loss(cfg, data)
    return HSTURecommender(build_embeddings(cfg, data, codebook, table_device), build_encoder(cfg), loss)


def unwrap(model: nn.Module) -> nn.Module:
    """The user module inside DMP/DDP wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
