"""COBRA decoders: K distinct items, none from the history; beam fusion; rank metrics from a list."""

import math

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from sidvid_rec.data.batches import FEATURE_KEYS, SequenceBatch
from sidvid_rec.decode import DECODERS, DecodeContext, DecoderSettings, decode
from sidvid_rec.decode.base import first_occurrence
from sidvid_rec.decode.beam import fuse_scores, rank_candidates
from sidvid_rec.eval.evaluate import list_ranks
from sidvid_rec.decode.neighbor import nearest_other_sid
from sidvid_rec.losses import InfoNCELoss, SampledSoftmaxLoss
from sidvid_rec.models.cobra import CobraRecommender
from sidvid_rec.modules.embeddings import ItemEmbeddings
from sidvid_rec.modules.hstu import HSTUEncoder
from sidvid_rec.retrieval import MISSING_ID, VidIndex

NUM_ITEMS, DIM, K = 60, 8, 10


@pytest.fixture(scope="module")
def model() -> CobraRecommender:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, size=(NUM_ITEMS + 1, 2))
    codes[0] = -1
    emb = ItemEmbeddings.from_codes(NUM_ITEMS, DIM, "cobra", codes)
    enc = HSTUEncoder(max_len=2 * 12 + 1, dim=DIM, num_blocks=1, num_heads=1, dqk=DIM, dv=DIM, dropout=0.0,
                      attn_dropout=0.0)
    return CobraRecommender(emb, enc, SampledSoftmaxLoss(NUM_ITEMS, 8), InfoNCELoss(NUM_ITEMS), codes).eval()


@pytest.fixture(scope="module")
def batch() -> SequenceBatch:
    """Three evaluation examples with histories of 12, 3 and 7 items (one target each)."""
    rng = np.random.default_rng(1)
    histories = [rng.choice(np.arange(1, NUM_ITEMS + 1), size=n, replace=False).tolist() for n in (12, 3, 7)]
    targets = [int(rng.integers(1, NUM_ITEMS + 1)) for _ in histories]
    lengths = [len(h) for h in histories]
    items = sum(histories, [])
    times = sum([[10 * (i + 1) for i in range(n)] for n in lengths], [])
    values = torch.tensor(items + times + targets + [10 * (n + 1) for n in lengths])
    all_lengths = torch.tensor(lengths + lengths + [1] * 3 + [1] * 3, dtype=torch.int32)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=FEATURE_KEYS, values=values, lengths=all_lengths)
    return SequenceBatch(kjt, torch.arange(3), torch.ones(3), False)


def _context(model, settings=DecoderSettings(), filter_history=True) -> DecodeContext:
    sid_table, vid_table = model.decoding_tables()
    index = VidIndex.build(vid_table[1:], torch.arange(1, NUM_ITEMS + 1))
    return DecodeContext(model, sid_table, index, settings, filter_history)


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_each_decoder_returns_k_distinct_items_outside_the_history(model, batch, kind):
    settings = DecoderSettings(soft_k=3, beam_size=3, beam_ann=4)  # beam_ann < K: still K items
    top = decode(kind, _context(model, settings), batch, K)
    history = batch.jagged("item_id")
    assert top.items.shape == (3, K)
    for b in range(3):
        row = top.items[b].tolist()
        seen = set(history.values()[history.offsets()[b]:history.offsets()[b + 1]].tolist())
        assert len(set(row)) == K and MISSING_ID not in row
        assert not seen & set(row) and all(1 <= i <= NUM_ITEMS for i in row)
        assert all(a >= c for a, c in zip(top.scores[b].tolist(), top.scores[b, 1:].tolist()))


def test_without_filtering_history_items_may_appear(model, batch):
    top = decode("direct", _context(model, filter_history=False), batch, NUM_ITEMS)
    assert sorted(top.items[0].tolist()) == list(range(1, NUM_ITEMS + 1))


def test_direct_matches_manual_pipeline(model, batch):
    ctx = _context(model)
    inputs = model.prepare(batch)
    best = model.sid_logits(model.next_sid_states(inputs), ctx.sid_table).argmax(1)
    q = model.vid_queries(inputs, ctx.sid_table[best])
    _, vid_table = model.decoding_tables()
    scores = q @ vid_table.T
    scores[:, 0] = -math.inf
    h = batch.jagged("item_id")
    for b in range(3):
        scores[b, h.values()[h.offsets()[b]:h.offsets()[b + 1]]] = -math.inf
    expected = scores.topk(K, dim=1).indices
    assert torch.equal(decode("direct", ctx, batch, K).items, expected)


def test_beam_alpha_one_ranks_by_sid_score_alone(model, batch):
    settings = DecoderSettings(beam_size=4, beam_ann=6, beam_fuse="prod", alpha=1.0)
    ctx = _context(model, settings)
    top = decode("beam", ctx, batch, K)
    logits = model.sid_logits(model.next_sid_states(model.prepare(batch)), ctx.sid_table)
    log_p = torch.log_softmax(logits, dim=1)
    beam_values = log_p.topk(4, dim=1).values  # [B, 4]
    for b in range(3):
        scores = top.scores[b]
        # every fused score is one of the beams' log p_sid, in non-increasing order
        assert all(bool(torch.isclose(beam_values[b], s, atol=1e-5).any()) for s in scores)
        assert bool((scores[:-1] >= scores[1:]).all())
    # with alpha = 1 the best beam's items fill the top of the list (it retrieves >= K items)
    assert torch.allclose(top.scores[:, 0], beam_values[:, 0]) and torch.allclose(top.scores[:, -1], beam_values[:, 0])


def test_fusion_rules():
    sid_all = torch.tensor([[2.0, 1.0, 0.0]])
    beams = torch.tensor([[0, 1]])
    vid = torch.tensor([[[3.0, 1.0], [2.0, 0.0]]])
    p_sid = torch.softmax(sid_all, 1)[0, :2]
    p_vid = torch.softmax(vid, 2)[0]  # per SID
    prod = fuse_scores("prod", sid_all, beams, vid, alpha=0.3, beta=1.0)[0]
    assert torch.allclose(prod.exp(), p_sid[:, None] ** 0.3 * p_vid ** 0.7)
    summed = fuse_scores("sum", sid_all, beams, vid, alpha=0.3, beta=1.0)[0]
    assert torch.allclose(summed, 0.3 * p_sid[:, None] + 0.7 * p_vid)
    soft = fuse_scores("softmax", sid_all, beams, vid, alpha=2.0, beta=0.5)[0]
    expected = torch.softmax(2.0 * sid_all[0, :2], 0)[:, None] * torch.softmax(0.5 * vid[0], 1)
    assert torch.allclose(soft.exp(), expected)


def test_rank_candidates_dedups_keeping_best_copy():
    items = torch.tensor([[5, 6, 5, 7, MISSING_ID]])
    fused = torch.tensor([[0.1, 0.5, 0.9, 0.5, 9.0]])
    tie = torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0]])
    top = rank_candidates(items, fused, tie, 4)
    assert top.items.tolist() == [[5, 7, 6, MISSING_ID]]  # 7 beats 6 on the tie-break
    assert top.scores[0, :3].tolist() == pytest.approx([0.9, 0.5, 0.5])
    assert first_occurrence(torch.tensor([[3, 1, 3, 1, 2]])).tolist() == [[True, True, False, False, True]]


def test_nearest_other_sid_is_never_itself():
    table = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    assert nearest_other_sid(table, torch.tensor([0, 1, 2])).tolist() == [1, 0, 1]


def test_list_ranks():
    items = torch.tensor([[4, 2, 9], [1, 2, 3]])
    ranks = list_ranks(items, torch.tensor([9, 7]))
    assert ranks[0] == 3.0 and math.isinf(ranks[1])


def _faiss_top_k(queries: torch.Tensor, vid_table: torch.Tensor, batch, k: int):
    """Exact inner-product search with plain FAISS over items 1..N, history removed by hand."""
    import faiss

    index = faiss.IndexFlatIP(vid_table.shape[1])
    index.add(np.ascontiguousarray(vid_table[1:].numpy(), dtype=np.float32))
    scores, rows = index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), NUM_ITEMS)
    h = batch.jagged("item_id")
    ids, kept = [], []
    for b in range(queries.shape[0]):
        seen = set(h.values()[h.offsets()[b]:h.offsets()[b + 1]].tolist())
        row = [(int(r) + 1, float(s)) for r, s in zip(rows[b], scores[b]) if int(r) + 1 not in seen][:k]
        ids.append([i for i, _ in row])
        kept.append([s for _, s in row])
    return torch.tensor(ids), torch.tensor(kept)


@pytest.mark.parametrize("soft_k, soft_tau", [(3, 0.2), (5, 0.5)])
def test_soft_matches_manual_pipeline(model, batch, soft_k, soft_tau):
    """soft: w = softmax(cosine_j / tau) over the top-k valid SIDs by cosine, the appended SID
    embedding is sum_j w_j sid_vec_j, then exact MIPS over the normalised VID vectors."""
    settings = DecoderSettings(soft_k=soft_k, soft_tau=soft_tau)
    ctx = _context(model, settings)
    with torch.no_grad():
        top = decode("soft", ctx, batch, K)
        sid_table, vid_table = model.decoding_tables()
        inputs = model.prepare(batch)
        states = model.next_sid_states(inputs)
        cosine = torch.nn.functional.normalize(states, dim=1) @ torch.nn.functional.normalize(sid_table, dim=1).T
        best = cosine.topk(soft_k, dim=1)
        weights = torch.softmax(best.values / soft_tau, dim=1)  # [B, k]
        assert not torch.allclose(weights[:, 0], torch.ones(3))  # really a mixture, not the top-1 SID
        mixed = torch.einsum("bk,bkd->bd", weights, sid_table[best.indices])
        queries = model.vid_queries(inputs, mixed)
    ids, scores = _faiss_top_k(queries, vid_table, batch, K)
    assert torch.equal(top.items, ids)
    assert torch.allclose(top.scores, scores, atol=1e-5)
    # the mixture changes the query: it is not the direct decoder's (a failing mix would be)
    assert not torch.allclose(top.scores, decode("direct", ctx, batch, K).scores, atol=1e-6)


def test_neighbor_matches_manual_pipeline(model, batch):
    """neighbor: the top-1 SID by cosine is replaced by the valid SID whose vector is most
    cosine-similar to it (itself excluded), appended, then exact MIPS."""
    ctx = _context(model)
    with torch.no_grad():
        top = decode("neighbor", ctx, batch, K)
        sid_table, vid_table = model.decoding_tables()
        inputs = model.prepare(batch)
        states = model.next_sid_states(inputs)
        unit = sid_table / sid_table.norm(dim=1, keepdim=True)
        predicted = (states / states.norm(dim=1, keepdim=True) @ unit.T).argmax(dim=1)
        neighbours = []
        for b in range(3):  # nearest other SID, one example at a time with numpy
            sims = unit.numpy() @ unit[predicted[b]].numpy()
            sims[int(predicted[b])] = -np.inf
            neighbours.append(int(np.argmax(sims)))
        assert all(n != int(p) for n, p in zip(neighbours, predicted))
        queries = model.vid_queries(inputs, sid_table[torch.tensor(neighbours)])
    ids, scores = _faiss_top_k(queries, vid_table, batch, K)
    assert torch.equal(top.items, ids)
    assert torch.allclose(top.scores, scores, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_kv_cached_decoding_matches_re_encoding(model, batch, kind):
    """Each decoder (beam and soft append several / a mixed SID token) gives the same top-K and
    scores from the encoder's KV cache as from re-encoding the history per query."""
    settings = dict(soft_k=3, beam_size=4, beam_ann=6)
    cached = decode(kind, _context(model, DecoderSettings(**settings, kv_cache=True)), batch, K)
    again = decode(kind, _context(model, DecoderSettings(**settings, kv_cache=False)), batch, K)
    assert torch.equal(cached.items, again.items)
    torch.testing.assert_close(cached.scores, again.scores, rtol=1e-5, atol=1e-5)


def test_cached_vid_queries_match_re_encoding(model, batch):
    ctx = _context(model)
    inputs = model.prepare(batch)
    encoded = model.encode_history(inputs)
    torch.testing.assert_close(encoded.states, model.next_sid_states(inputs), rtol=1e-5, atol=1e-6)
    sids = ctx.sid_table[torch.tensor([[0, 3, 5], [1, 1, 2], [4, 0, 6]])]  # [B, 3, D]
    cached = model.vid_queries_cached(encoded, sids)
    for j in range(3):
        torch.testing.assert_close(cached[:, j], model.vid_queries(inputs, sids[:, j]), rtol=1e-5, atol=1e-6)


def test_repeat_jagged_repeats_each_row_in_place():
    from sidvid_rec.decode.base import repeat_jagged

    values, offsets = torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([0, 2, 2, 6])
    rep_values, rep_offsets = repeat_jagged(values, offsets, 2)
    assert rep_offsets.tolist() == [0, 2, 4, 4, 4, 8, 12]
    assert rep_values.tolist() == [1, 2, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6]


@pytest.mark.parametrize("filter_history", [True, False])
def test_beams_searched_at_once_equal_one_search_per_beam(model, batch, filter_history):
    """``retrieve_beams`` (one FAISS search of B * W queries) = W calls of ``retrieve``."""
    from sidvid_rec.decode.base import DecodeState, retrieve, retrieve_beams, top_sids

    ctx = _context(model, DecoderSettings(beam_size=4), filter_history=filter_history)
    with torch.no_grad():
        state = DecodeState(ctx, batch)
        _, sids = top_sids(state.sid_logits(), 4)
        queries = state.vid_queries(ctx.sid_table[sids])
        ids, scores = retrieve_beams(ctx, batch, queries, 20)
        for j in range(queries.shape[1]):
            hits = retrieve(ctx, batch, queries[:, j], 20)
            assert torch.equal(ids[:, j], hits.ids)
            torch.testing.assert_close(scores[:, j], hits.scores, atol=1e-6, rtol=0)
