"""Evaluation of a trained model on a split: the one place that turns a model into metrics.

* Models that score items by inner product (modes ``id``, ``sid``, ``sid_id``): full ranking
  over every item (:func:`~sidvid_rec.eval.ranking.evaluate_ranking`).
* COBRA: the configured decoder's top-K list (:func:`evaluate_decoder`). With a list of
  ``K = max(ks)`` items the rank of the target is its 1-based position in the list, or
  infinity when it is absent (a miss counts 0 in HR@k, NDCG@k and MRR), so HR@k and NDCG@k
  match full ranking for every k <= K and MRR is truncated at K.

:func:`evaluate_model` runs either on this process's share of the split and sums the
metric states over ranks, so the result is identical for any number of ranks.

Example::

    metrics = evaluate_model(model, make_split(data, "valid", "loo", 200), cfg, ctx)
    metrics["ndcg@10"]
"""

from typing import TYPE_CHECKING, Dict, Iterable, Sequence

import torch
from torch import Tensor, nn

from sidvid_rec.config import Config, DecoderSettings, narrow
from sidvid_rec.data import Split
from sidvid_rec.data.batches import BatchIterator, prefetch_to_device
from sidvid_rec.decode import DecodeContext, DecoderKind, decode
from sidvid_rec.eval.metrics import RankMetrics
from sidvid_rec.eval.ranking import evaluate_ranking, summarize
from sidvid_rec.models.build import unwrap
from sidvid_rec.models.cobra import CobraRecommender
from sidvid_rec.process_group import DistContext, all_reduce_sum
from sidvid_rec.retrieval import VidIndex

if TYPE_CHECKING:  # torchrec-free at run time: an export decodes without the training stack
    from sidvid_rec.data.batches import SequenceBatch


def list_ranks(items: Tensor, targets: Tensor) -> Tensor:
    """``items [B, K]``, ``targets [B]`` -> float ``[B]`` 1-based position, ``inf`` if absent."""
    hit = items == targets.unsqueeze(1)  # [B, K]
    position = hit.to(torch.int8).argmax(dim=1).to(torch.float64) + 1.0
    return torch.where(hit.any(dim=1), position, torch.full_like(position, float("inf")))


@torch.no_grad()
def evaluate_decoder(kind: DecoderKind, ctx: DecodeContext, batches: Iterable["SequenceBatch"], ks: Sequence[int],
                     device: torch.device) -> RankMetrics:
    """Accumulates rank metrics of decoder ``kind`` over ``batches`` (this process's share)."""
    metrics = RankMetrics(ks)
    k = max(ks)
    for batch in prefetch_to_device(batches, device):  # pinned, non-blocking copies on CUDA
        top = decode(kind, ctx, batch, k)
        metrics.update(list_ranks(top.items, batch.jagged("target_id").values()), batch.weights)
    return metrics


@torch.no_grad()
def cobra_decode_context(model: CobraRecommender, cfg: Config) -> DecodeContext:
    """The decoders' context of a trained COBRA model: its SID table, a FAISS index over its
    VID vectors (``retrieval`` settings) and the ``eval`` decoder settings."""
    sid_table, vid_table = model.decoding_tables()
    ids = torch.arange(1, vid_table.shape[0], dtype=torch.int64)
    index = VidIndex.from_config(vid_table[1:], ids, cfg.retrieval)
    return DecodeContext(model, sid_table, index, narrow(cfg.eval, DecoderSettings), cfg.eval.filter_history)


def evaluate_cobra(model: CobraRecommender, batches: Iterable["SequenceBatch"], cfg: Config,
                   ctx: DistContext) -> RankMetrics:
    """Rank metrics of the configured decoder over ``batches`` (this process's share)."""
    return evaluate_decoder(cfg.eval.decoder, cobra_decode_context(model, cfg), batches, cfg.eval.ks, ctx.device)


def evaluate_model(model: nn.Module, split: Split, cfg: Config, ctx: DistContext) -> Dict[str, float]:
    """Full-ranking metrics of ``model`` (plain or DMP-wrapped) on ``split``, identical for any
    number of ranks."""
    was_training = model.training
    model.eval()
    batches = BatchIterator(split, cfg.eval.batch_size, shuffle=False, rank=ctx.rank, world_size=ctx.world_size)
    module = unwrap(model)
    if isinstance(module, CobraRecommender):
        metrics = evaluate_cobra(module, batches, cfg, ctx)
    else:
        metrics = evaluate_ranking(module, batches, cfg.eval.ks, cfg.eval.filter_history, ctx.device)
    reduced = RankMetrics(cfg.eval.ks)
    reduced.load_state(all_reduce_sum(metrics.state(), ctx))
    model.train(was_training)
    return summarize(reduced)
