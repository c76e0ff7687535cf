"""Builders of the COBRA mode: config -> :class:`CobraRecommender`, and its decoder evaluation.

Like :mod:`sidvid_rec.models.builder` (which dispatches here for ``model.mode=cobra``), this
is one of the few places that read the whole config; the model, decoders and index take
flat arguments.
"""

from typing import Iterable, Optional

import numpy as np
import torch

from sidvid_rec.config import Config, EvalConfig
from sidvid_rec.data import SequenceData, make_split
from sidvid_rec.data.batches import SequenceBatch
from sidvid_rec.decode import DecodeContext, DecoderSettings
from sidvid_rec.decode.evaluate import evaluate_decoder
from sidvid_rec.errors import ConfigError
from sidvid_rec.eval.metrics import RankMetrics
from sidvid_rec.losses import InfoNCELoss, SampledSoftmaxLoss
from sidvid_rec.models.cobra import CobraRecommender
from sidvid_rec.modules.embeddings import ItemEmbeddings
from sidvid_rec.modules.hstu import HSTUEncoder
from sidvid_rec.retrieval import VidIndex
from sidvid_rec.train.distributed import DistContext


def cobra_max_tokens(max_len: int) -> int:
    """Tokens of the longest interleaved sequence: ``max_len`` steps (SID + VID) plus the
    SID token of the step being generated."""
    return 2 * max_len + 1


def item_text_embeddings(cfg: Config, data: SequenceData) -> torch.Tensor:
    """``[N + 1, E]`` text embeddings of the items with the ``sids`` encoder (cached on disk)."""
    from sidvid_rec.cli.embed_cmd import embed_dataset

    vectors, _ = embed_dataset(cfg, data, progress=False)
    return torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))


def training_item_frequency(cfg: Config, data: SequenceData) -> torch.Tensor:
    """``[N + 1]`` share of each item among the training split's events (held-out items excluded)."""
    values = make_split(data, "train", cfg.data.protocol, cfg.data.max_len).values
    counts = np.bincount(values, minlength=data.num_items + 1).astype(np.float64)
    return torch.from_numpy(counts / max(counts.sum(), 1.0)).float()


def build_cobra_module(cfg: Config, data: SequenceData, codes: np.ndarray,
                       table_device: str = "meta") -> CobraRecommender:
    """The unsharded COBRA model over SID ``codes [N + 1, L]``."""
    m, loss = cfg.model, cfg.loss
    if m.cobra_sid_layers < 0 or m.cobra_sid_layers > codes.shape[1]:
        raise ConfigError(f"model.cobra_sid_layers must lie in [0, {codes.shape[1]}], got {m.cobra_sid_layers}")
    codes = codes[:, : m.cobra_sid_layers] if m.cobra_sid_layers else codes
    embeddings = ItemEmbeddings.from_codes(num_items=data.num_items, dim=m.dim, mode="cobra", codes=codes,
                                           sid_table_size=m.sid_table_size, device=table_device)
    encoder = HSTUEncoder(
        max_len=cobra_max_tokens(cfg.data.max_len), dim=m.dim, num_blocks=m.num_blocks, num_heads=m.num_heads,
        dqk=m.dqk, dv=m.dv, dropout=m.dropout, attn_dropout=m.attn_dropout, num_time_buckets=m.num_time_buckets,
        attention_scale=m.attention_scale,
    )
    num_sids = int(np.unique(codes[1:], axis=0).shape[0])
    sid_full = loss.sid_softmax == "full" or (loss.sid_softmax == "auto" and num_sids <= loss.num_negatives)
    frequency = training_item_frequency(cfg, data) if loss.logq_correction else None
    sid_loss = SampledSoftmaxLoss(num_items=data.num_items, num_negatives=loss.num_negatives,
                                  temperature=loss.temperature, shared=loss.shared_negatives)
    vid_loss = InfoNCELoss(num_items=data.num_items, negatives=loss.vid_negatives,
                           num_negatives=loss.vid_num_negatives or loss.num_negatives, queue_size=loss.queue_size,
                           dim=m.dim, temperature=loss.temperature, max_in_batch=loss.vid_max_in_batch,
                           item_frequency=frequency)
    text: Optional[torch.Tensor] = item_text_embeddings(cfg, data) if m.text_projection else None
    return CobraRecommender(embeddings, encoder, sid_loss, vid_loss, codes, vid_weight=loss.vid_weight,
                            temperature=loss.temperature, query_time=m.cobra_query_time, text_embeddings=text,
                            sid_full_softmax=sid_full, sid_logq=loss.logq_correction,
                            sid_dropout=m.cobra_sid_dropout)


def decoder_settings(e: EvalConfig) -> DecoderSettings:
    return DecoderSettings(soft_k=e.soft_k, soft_tau=e.soft_tau, beam_size=e.beam_size, beam_ann=e.beam_ann,
                           beam_fuse=e.beam_fuse, alpha=e.alpha, beta=e.beta)


def build_vid_index(vid_table: torch.Tensor, cfg: Config) -> VidIndex:
    """FAISS index over the VID vectors of items ``1..N`` (``vid_table [N + 1, D]``, row 0 = padding)."""
    r = cfg.retrieval
    ids = torch.arange(1, vid_table.shape[0], dtype=torch.int64)
    return VidIndex.build(vid_table[1:], ids, kind=r.index, hnsw_m=r.hnsw_m, ef_search=r.ef_search,
                          ivf_nlist=r.ivf_nlist, nprobe=r.nprobe, use_gpu=r.use_gpu)


@torch.no_grad()
def evaluate_cobra(model: CobraRecommender, batches: Iterable[SequenceBatch], cfg: Config,
                   ctx: DistContext) -> RankMetrics:
    """Rank metrics of the configured decoder over ``batches`` (this process's share)."""
    sid_table, vid_table = model.decoding_tables()
    index = build_vid_index(vid_table, cfg)
    decode_ctx = DecodeContext(model, sid_table, index, decoder_settings(cfg.eval), cfg.eval.filter_history)
    return evaluate_decoder(cfg.eval.decoder, decode_ctx, batches, cfg.eval.ks, ctx.device)
