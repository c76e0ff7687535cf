"""Builders: a :class:`~sidvid_rec.config.Config` + data -> a (sharded) model, and its evaluation.

This and ``train/`` are the only places that read the whole config; the modules below take
plain typed arguments.
"""

from typing import Dict, Optional

import numpy as np
from torch import nn

from sidvid_rec.config import Config
from sidvid_rec.data import SequenceData, Split
from sidvid_rec.data.batches import BatchIterator
from sidvid_rec.errors import ArtifactError, ConfigError
from sidvid_rec.eval.metrics import RankMetrics
from sidvid_rec.eval.ranking import evaluate_ranking, summarize
from sidvid_rec.losses import SampledSoftmaxLoss
from sidvid_rec.models.cobra_builder import build_cobra_module, evaluate_cobra
from sidvid_rec.models.hstu_rec import HSTURecommender
from sidvid_rec.modules.embeddings import ItemEmbeddings
from sidvid_rec.modules.hstu import HSTUEncoder
from sidvid_rec.train.distributed import DistContext, all_reduce_sum


def load_sid_codes(cfg: Config, data: SequenceData) -> Optional[np.ndarray]:
    """``[N + 1, L]`` semantic-ID codes of the configured artifacts (``None`` in ``id`` mode)."""
    if cfg.model.mode == "id":
        return None
    if not cfg.sids.dir:
        raise ConfigError(f"model.mode={cfg.model.mode} needs semantic IDs: set sids.dir (build them with `sidvid-rec sids build`)")
    from sidvid_rec.semantic_ids.artifacts import load_sid_artifacts

    artifacts = load_sid_artifacts(cfg.sids.dir)
    if artifacts.codes.shape[0] != data.num_items + 1:
        raise ArtifactError(
            f"semantic IDs in {cfg.sids.dir} cover {artifacts.codes.shape[0] - 1} items, the data set has "
            f"{data.num_items}: they were built for another data set"
        )
    if cfg.model.sid_dedup:
        return np.concatenate([artifacts.codes, artifacts.dedup[:, None]], axis=1)
    return artifacts.codes


def build_module(cfg: Config, data: SequenceData, table_device: str = "meta") -> nn.Module:
    """The unsharded model; tables on ``table_device`` (``meta``: DMP materialises the shards)."""
    m = cfg.model
    if m.mode == "cobra":
        return build_cobra_module(cfg, data, load_sid_codes(cfg, data), table_device)
    embeddings = ItemEmbeddings.from_codes(
        num_items=data.num_items, dim=m.dim, mode=m.mode, codes=load_sid_codes(cfg, data),
        sid_table_size=m.sid_table_size, fusion=m.fusion, device=table_device,
    )
    encoder = HSTUEncoder(
        max_len=cfg.data.max_len, dim=m.dim, num_blocks=m.num_blocks, num_heads=m.num_heads, dqk=m.dqk, dv=m.dv,
        dropout=m.dropout, attn_dropout=m.attn_dropout, num_time_buckets=m.num_time_buckets,
        attention_scale=m.attention_scale,
    )
    loss = SampledSoftmaxLoss(num_items=data.num_items, num_negatives=cfg.loss.num_negatives, temperature=cfg.loss.temperature,
                              shared=cfg.loss.shared_negatives)
    return HSTURecommender(embeddings, encoder, loss)


def build_model(cfg: Config, data: SequenceData, ctx: DistContext) -> nn.Module:
    """The model wrapped in DistributedModelParallel (sharded tables, fused table optimizer)."""
    from sidvid_rec.train.sharding import distribute

    module = build_module(cfg, data, table_device="meta")
    return distribute(module, cfg.train, ctx).to(ctx.device)


def unwrap(model: nn.Module) -> nn.Module:
    """The user module inside DMP/DDP wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def evaluate_model(model: nn.Module, split: Split, cfg: Config, ctx: DistContext) -> Dict[str, float]:
    """Full-ranking metrics of ``model`` on ``split``, identical for any number of ranks."""
    was_training = model.training
    model.eval()
    batches = BatchIterator(split, cfg.eval.batch_size, shuffle=False, rank=ctx.rank, world_size=ctx.world_size)
    if cfg.model.mode == "cobra":
        metrics = evaluate_cobra(unwrap(model), batches, cfg, ctx)
    else:
        metrics = evaluate_ranking(unwrap(model), batches, cfg.eval.ks, cfg.eval.filter_history, ctx.device)
    reduced = RankMetrics(cfg.eval.ks)
    reduced.load_state(all_reduce_sum(metrics.state(), ctx))
    model.train(was_training)
    return summarize(reduced)
