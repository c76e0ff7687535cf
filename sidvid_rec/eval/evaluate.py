"""Evaluation of a trained model on a split: the one place that turns a model into metrics.

* Models that score items by inner product (modes ``id``, ``sid``, ``sid_id``): full ranking
  over every item (:func:`~sidvid_rec.eval.ranking.evaluate_ranking`).
* COBRA: the configured decoder's top-K list (:func:`evaluate_decoder`). With a list of
  ``K = max(ks)`` items the rank of the target is its 1-based position in the list, or
  infinity when it is absent (a miss counts 0 in HR@k, NDCG@k and MRR), so HR@k and NDCG@k
  match full ranking for every k <= K and MRR is truncated at K.
* ``sid_gen``: the trie-constrained beam search's top-K list (:func:`evaluate_sid_gen`), beam
  width ``max(eval.sid_gen_beam, K)``, counted like a decoder's list: items outside the beam
  rank after every beam item (infinity: a miss, MRR truncated at K); empty slots
  (:data:`~sidvid_rec.types.MISSING_ID`, when fewer than K valid SIDs survive the history
  filter) never match a target. Ties in the list's scores (sequence log-probabilities) count
  against the target as in full ranking: its rank is the number of listed items scoring at
  least as high.

:func:`evaluate_model` runs either on this process's share of the split and sums the
metric states over ranks, so the result is identical for any number of ranks.

Example::

    metrics = evaluate_model(model, make_split(data, "valid", "loo", 200), cfg, ctx)
    metrics["ndcg@10"]
"""

from typing import TYPE_CHECKING, Dict, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from sidvid_rec.config import Config, DecoderSettings, narrow
from sidvid_rec.data import Split
from sidvid_rec.data.batches import BatchIterator, prefetch_to_device
from sidvid_rec.decode import DecodeContext, DecoderKind, decode
from sidvid_rec.decode.code_sids import CodeSidBeam
from sidvid_rec.decode.sid_beam import sid_beam_search
from sidvid_rec.eval.metrics import RankMetrics
from sidvid_rec.eval.ranking import evaluate_ranking, summarize
from sidvid_rec.models.build import unwrap
from sidvid_rec.models.cobra import CobraRecommender
from sidvid_rec.models.sid_gen import SidGenRecommender
from sidvid_rec.process_group import DistContext, all_reduce_sum
from sidvid_rec.retrieval import VidIndex
from sidvid_rec.types import MISSING_ID

if TYPE_CHECKING:  # torchrec-free at run time: an export decodes without the training stack
    from sidvid_rec.data.batches import SequenceBatch


def list_ranks(items: Tensor, targets: Tensor, scores: Optional[Tensor] = None) -> Tensor:
    """``items [B, K]``, ``targets [B]`` -> float ``[B]`` 1-based position, ``inf`` if absent.

    With ``scores [B, K]`` a tie counts against the target (the pessimistic convention of full
    ranking): its rank is the number of listed items (not ``MISSING_ID``) scoring at least its score.
    """
    hit = items == targets.unsqueeze(1)  # [B, K]
    position = hit.to(torch.int8).argmax(dim=1).to(torch.float64) + 1.0
    if scores is not None:
        target_score = scores.gather(1, hit.to(torch.int8).argmax(dim=1, keepdim=True))  # [B, 1]
        position = ((scores >= target_score) & (items != MISSING_ID)).sum(dim=1).to(torch.float64)
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
    VID vectors (``retrieval`` settings) and the ``eval`` decoder settings; with the codes head
    its code beam over the valid SIDs' trie."""
    sid_table, vid_table = model.decoding_tables()
    ids = torch.arange(1, vid_table.shape[0], dtype=torch.int64)
    index = VidIndex.from_config(vid_table[1:], ids, cfg.retrieval)
    sid_beam = None if model.sid_head is None else CodeSidBeam(model.sid_head, model.sid_tuples)
    return DecodeContext(model, sid_table, index, narrow(cfg.eval, DecoderSettings), cfg.eval.filter_history,
                         sid_beam)


def evaluate_cobra(model: CobraRecommender, batches: Iterable["SequenceBatch"], cfg: Config,
                   ctx: DistContext) -> RankMetrics:
    """Rank metrics of the configured decoder over ``batches`` (this process's share)."""
    return evaluate_decoder(cfg.eval.decoder, cobra_decode_context(model, cfg), batches, cfg.eval.ks, ctx.device)


@torch.no_grad()
def evaluate_sid_gen(model: SidGenRecommender, batches: Iterable["SequenceBatch"], cfg: Config,
                     ctx: DistContext) -> RankMetrics:
    """Rank metrics of the trie-constrained beam search over ``batches`` (this process's share)."""
    metrics = RankMetrics(cfg.eval.ks)
    k = max(cfg.eval.ks)
    tables = model.generation_tables()
    for batch in batches:
        batch = batch.to(ctx.device)
        top = sid_beam_search(model.encoder, tables, model.trie, model.prepare(batch, tables), k,
                              beam=cfg.eval.sid_gen_beam, kv_cache=cfg.eval.kv_cache,
                              filter_history=cfg.eval.filter_history)
        metrics.update(list_ranks(top.items, batch.jagged("target_id").values(), top.scores), batch.weights)
    return metrics


def evaluate_model(model: nn.Module, split: Split, cfg: Config, ctx: DistContext) -> Dict[str, float]:
    """Full-ranking metrics of ``model`` (plain or DMP-wrapped) on ``split``, identical for any
    number of ranks."""
    was_training = model.training
    model.eval()
    batches = BatchIterator(split, cfg.eval.batch_size, shuffle=False, rank=ctx.rank, world_size=ctx.world_size)
    module = unwrap(model)
    if isinstance(module, CobraRecommender):
        metrics = evaluate_cobra(module, batches, cfg, ctx)
    elif isinstance(module, SidGenRecommender):
        metrics = evaluate_sid_gen(module, batches, cfg, ctx)
    else:
        metrics = evaluate_ranking(module, batches, cfg.eval.ks, cfg.eval.filter_history, ctx.device)
    reduced = RankMetrics(cfg.eval.ks)
    reduced.load_state(all_reduce_sum(metrics.state(), ctx))
    model.train(was_training)
    return summarize(reduced)
