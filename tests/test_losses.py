"""Sampled softmax (reference HSTU) and COBRA's InfoNCE with its negative pools and queue."""

import math

import pytest
import torch

from sidvid_rec import losses
from sidvid_rec.losses import (
    MASKED_LOGIT,
    CandidatePool,
    InfoNCELoss,
    SampledSoftmaxLoss,
    VectorQueue,
    l2_normalize,
)

NUM_ITEMS, DIM, TEMP = 6, 4, 0.5


@pytest.fixture
def table() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(NUM_ITEMS + 1, DIM, requires_grad=True)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a @ b) / (a.norm() * b.norm()))


def _nll(logits) -> float:
    return -logits[0] + math.log(sum(math.exp(x) for x in logits))


def _sampled_softmax_by_hand(query, pos, negs, table) -> float:
    """Loops over positions and negatives; a negative equal to the positive is dropped."""
    total = 0.0
    for t in range(len(pos)):
        logits = [_cos(query[t], table[pos[t]]) / TEMP]
        logits += [_cos(query[t], table[n]) / TEMP for n in negs[t] if n != pos[t]]
        total += _nll(logits)
    return total / len(pos)


def test_sampled_softmax_matches_hand_computation(table):
    query = torch.randn(3, DIM, requires_grad=True)
    pos = torch.tensor([1, 4, 6])
    negs = torch.tensor([[2, 3, 5], [4, 4, 1], [6, 2, 2]])  # row 1: two collisions; row 2: one
    calls = []

    def lookup(ids):
        calls.append(ids.clone())
        return table[ids]

    out = SampledSoftmaxLoss(NUM_ITEMS, num_negatives=3, temperature=TEMP)(query, pos, lookup, negative_ids=negs)
    assert out.num_positions == 3
    by_hand = _sampled_softmax_by_hand(query, pos.tolist(), negs.tolist(), table)
    assert out.loss.item() == pytest.approx(by_hand, rel=1e-5)
    # one lookup, of each needed id exactly once (positives and negatives), not the whole table
    assert len(calls) == 1 and sorted(calls[0].tolist()) == [1, 2, 3, 4, 5, 6]
    out.loss.backward()
    assert table.grad[0].abs().sum() == 0 and query.grad.abs().sum() > 0


def test_collision_masked_to_constant_not_minus_inf(table):
    query = torch.randn(1, DIM)
    pos = torch.tensor([2])
    loss_fn = SampledSoftmaxLoss(NUM_ITEMS, num_negatives=2, temperature=TEMP)
    all_collide = loss_fn(query, pos, lambda ids: table[ids], negative_ids=torch.tensor([[2, 2]])).loss
    # [pos, -5e4, -5e4]: softmax of the positive is 1, the loss exactly 0, and finite
    assert torch.isfinite(all_collide) and all_collide.item() == pytest.approx(0.0, abs=1e-6)
    one = loss_fn(query, pos, lambda ids: table[ids], negative_ids=torch.tensor([[2, 5]])).loss
    expected = _nll([_cos(query[0], table[2]) / TEMP, _cos(query[0], table[5]) / TEMP])
    assert one.item() == pytest.approx(expected, rel=1e-5)


def test_full_and_gathered_scoring_agree(table, monkeypatch):
    torch.manual_seed(1)
    query = torch.randn(5, DIM, requires_grad=True)
    pos = torch.randint(1, NUM_ITEMS + 1, (5,))
    negs = torch.randint(1, NUM_ITEMS + 1, (5, 4))
    loss_fn = SampledSoftmaxLoss(NUM_ITEMS, num_negatives=4, temperature=TEMP)
    results = []
    for per_negative in (1000, 0):  # matmul + gather, then per-position gather
        monkeypatch.setattr(losses, "FULL_SCORES_PER_NEGATIVE", per_negative)
        query.grad = None
        loss = loss_fn(query, pos, lambda ids: table[ids], negative_ids=negs).loss
        loss.backward()
        results.append((loss.item(), query.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_shared_negatives_equal_repeated_rows(table):
    query = torch.randn(4, DIM)
    pos = torch.tensor([1, 2, 3, 3])
    shared = SampledSoftmaxLoss(NUM_ITEMS, 3, TEMP, shared=True)
    per_position = SampledSoftmaxLoss(NUM_ITEMS, 3, TEMP)
    negs = torch.tensor([[3, 5, 6]])
    a = shared(query, pos, lambda ids: table[ids], negative_ids=negs).loss
    b = per_position(query, pos, lambda ids: table[ids], negative_ids=negs.expand(4, 3)).loss
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert shared.sample_negatives(4, torch.Generator().manual_seed(0), torch.device("cpu")).shape == (1, 3)


def test_sampling_uniform_over_real_items_and_seeded():
    loss_fn = SampledSoftmaxLoss(NUM_ITEMS, num_negatives=128)
    a = loss_fn.sample_negatives(50, torch.Generator().manual_seed(3), torch.device("cpu"))
    b = loss_fn.sample_negatives(50, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert a.shape == (50, 128) and torch.equal(a, b)
    assert a.min() == 1 and a.max() == NUM_ITEMS  # never the padding id 0
    counts = torch.bincount(a.flatten(), minlength=NUM_ITEMS + 1)[1:].float()
    assert (counts / counts.mean() - 1).abs().max() < 0.1


def test_empty_positions_give_zero_loss_with_graph(table):
    query = torch.zeros(0, DIM, requires_grad=True)
    out = SampledSoftmaxLoss(NUM_ITEMS)(query, torch.zeros(0, dtype=torch.long), lambda ids: table[ids])
    assert out.num_positions == 0 and out.loss.item() == 0.0
    out.loss.backward()


# ----------------------------------------------------------------------------- InfoNCE


def _batch(table) -> CandidatePool:
    """Interleaved tokens of a hand-built batch: (SID 1, VID 1, SID 2, VID 2, SID 1, VID 1, VID 3)."""
    ids = torch.tensor([1, 1, 2, 2, 1, 1, 3])
    is_sid = torch.tensor([True, False, True, False, True, False, False])
    vectors = table[ids] + is_sid.unsqueeze(1) * 10.0  # SID-space vectors live elsewhere
    return CandidatePool(ids, vectors, is_sid)


def test_infonce_masks_sid_entries_and_same_id_collisions(table):
    batch = _batch(table)
    query = torch.randn(2, DIM)
    pos_ids = torch.tensor([2, 1])
    pos_vectors = table[pos_ids]
    loss_fn = InfoNCELoss(NUM_ITEMS, "in_batch", temperature=TEMP)
    logits = loss_fn.logits(query, pos_ids, pos_vectors, batch)  # [2, 1 + 7]
    sid_cols = 1 + torch.nonzero(batch.is_sid).flatten()
    assert (logits[:, sid_cols] == MASKED_LOGIT).all()
    assert (logits[0, [3, 4]] == MASKED_LOGIT).all() and (logits[1, [1, 2, 5, 6]] == MASKED_LOGIT).all()
    # query 0 (target 2) contrasts with the two VID entries of item 1 and the one of item 3
    expected0 = _nll([_cos(query[0], table[2]) / TEMP] + [_cos(query[0], table[i]) / TEMP for i in (1, 1, 3)])
    expected1 = _nll([_cos(query[1], table[1]) / TEMP] + [_cos(query[1], table[i]) / TEMP for i in (2, 3)])
    out = loss_fn(query, pos_ids, pos_vectors, batch)
    assert out.num_positions == 2
    assert out.loss.item() == pytest.approx((expected0 + expected1) / 2, rel=1e-5)
    # SID-space vectors cannot move the VID loss
    moved = CandidatePool(batch.ids, batch.vectors + batch.is_sid.unsqueeze(1) * 7.0, batch.is_sid)
    assert loss_fn(query, pos_ids, pos_vectors, moved).loss.item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_infonce_in_batch_global_adds_uniform_negatives(table):
    batch = _batch(table)
    calls = []

    def lookup(ids):
        calls.append(ids)
        return table[ids]

    loss_fn = InfoNCELoss(NUM_ITEMS, "in_batch_global", num_negatives=5, temperature=TEMP)
    pool, _ = loss_fn.build_pool(batch, lookup, torch.Generator().manual_seed(0))
    assert pool.ids.numel() == 4 + 5 and not pool.is_sid.any()
    assert torch.equal(pool.ids[:4], torch.tensor([1, 2, 1, 3]))  # no dedup: both VID 1 entries stay
    assert len(calls) == 1 and calls[0].min() >= 1 and calls[0].max() <= NUM_ITEMS
    query = torch.randn(2, DIM, requires_grad=True)
    loss_fn(query, torch.tensor([2, 1]), table[[2, 1]], batch, lookup, torch.Generator().manual_seed(0)).loss.backward()
    assert query.grad.abs().sum() > 0 and table.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="item_vectors_fn"):
        loss_fn.build_pool(batch)


@pytest.mark.parametrize("fused", [True, False])
def test_infonce_all_is_the_exact_softmax_over_the_catalogue(table, fused):
    """``all``: every item 1..N once, no in-batch entries and no correction, the exact softmax
    (the padding row never a class); both kernels, and a gradient to every item row."""
    batch = _batch(table)
    query = torch.randn(3, DIM, requires_grad=True)
    pos_ids = torch.tensor([2, 1, 5])
    freq = torch.rand(NUM_ITEMS + 1)
    loss_fn = InfoNCELoss(NUM_ITEMS, "all", temperature=TEMP, item_frequency=freq, fused=fused)
    pool, log_counts = loss_fn.build_pool(batch, lambda ids: table[ids])
    assert torch.equal(pool.ids, torch.arange(1, NUM_ITEMS + 1)) and log_counts is None
    out = loss_fn(query, pos_ids, table[pos_ids], batch, lambda ids: table[ids])
    logits = torch.tensor([[_cos(q, table[i]) / TEMP for i in range(1, NUM_ITEMS + 1)] for q in query])
    expected = torch.nn.functional.cross_entropy(logits, pos_ids - 1)
    assert out.num_positions == 3 and out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    out.loss.backward()
    assert (table.grad[1:].abs().sum(dim=1) > 0).all() and float(table.grad[0].abs().sum()) == 0.0


def test_infonce_max_in_batch_subsamples(table):
    loss_fn = InfoNCELoss(NUM_ITEMS, "in_batch", max_in_batch=2)
    pool, _ = loss_fn.build_pool(_batch(table), generator=torch.Generator().manual_seed(0))
    assert pool.ids.numel() == 2 and not pool.is_sid.any()


def test_queue_fifo():
    queue = VectorQueue(size=4, dim=2)
    assert len(queue) == 0 and queue.contents()[0].numel() == 0
    queue.push(torch.tensor([1, 2, 3]), torch.tensor([[1.0, 0], [2, 0], [3, 0]]))
    assert queue.contents()[0].tolist() == [1, 2, 3]
    queue.push(torch.tensor([4, 5, 6]), torch.tensor([[4.0, 0], [5, 0], [6, 0]]))
    ids, vectors = queue.contents()
    assert ids.tolist() == [3, 4, 5, 6] and vectors[:, 0].tolist() == [3, 4, 5, 6] and len(queue) == 4
    queue.push(torch.arange(10, 16), torch.ones(6, 2))  # more than fits: only the newest 4 stay
    assert queue.contents()[0].tolist() == [12, 13, 14, 15]
    restored = VectorQueue(4, 2)
    restored.load_state_dict(queue.state_dict())
    assert restored.contents()[0].tolist() == [12, 13, 14, 15]


def test_infonce_queue_pool_grows_with_past_batches(table):
    loss_fn = InfoNCELoss(NUM_ITEMS, "queue", queue_size=6, dim=DIM, temperature=TEMP)
    batch = _batch(table)
    query, pos_ids = torch.randn(2, DIM), torch.tensor([2, 1])
    first = loss_fn(query, pos_ids, table[pos_ids], batch)
    assert len(loss_fn.queue) == 4 and not loss_fn.queue.vectors.requires_grad
    pool, _ = loss_fn.build_pool(batch)
    assert pool.ids.tolist() == [1, 2, 1, 3, 1, 2, 1, 3]  # in-batch, then the queued batch
    second = loss_fn(query, pos_ids, table[pos_ids], batch)
    assert second.loss.item() > first.loss.item()  # same batch, more (masked-or-not) negatives
    loss_fn.eval()
    loss_fn(query, pos_ids, table[pos_ids], batch)
    assert len(loss_fn.queue) == 6 and loss_fn.queue.contents()[0].tolist() == [1, 3, 1, 2, 1, 3]
    # a queued entry with the target's id is masked like an in-batch one
    logits = loss_fn.logits(query, pos_ids, table[pos_ids], pool)
    assert (logits[0, 1:][pool.ids == 2] == MASKED_LOGIT).all()


def test_l2_normalize_clamps_zero_vectors():
    out = l2_normalize(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


def test_infonce_logq_correction_uses_expected_pool_counts(table):
    """Each pool logit loses log(E[copies of its id] / (M / N)), E = M_pop * freq(id) + R / N
    (popularity-drawn in-batch entries, uniformly drawn global ones): the pool then weighs what a
    uniform pool of M negatives weighs."""
    freq = torch.tensor([0.0, 0.5, 0.3, 0.1, 0.1, 0.0, 0.0])  # items 1..6
    batch = _batch(table)
    plain = InfoNCELoss(NUM_ITEMS, "in_batch_global", num_negatives=3, temperature=TEMP)
    corrected = InfoNCELoss(NUM_ITEMS, "in_batch_global", num_negatives=3, temperature=TEMP, item_frequency=freq)
    pool, none = plain.build_pool(batch, lambda ids: table[ids], torch.Generator().manual_seed(1))
    pool_c, log_counts = corrected.build_pool(batch, lambda ids: table[ids], torch.Generator().manual_seed(1))
    assert none is None and torch.equal(pool.ids, pool_c.ids)
    uniform = pool.ids.numel() / NUM_ITEMS  # copies of each item in a uniform pool of this size
    expected = [math.log((4 * float(freq[i]) + 3 / NUM_ITEMS) / uniform) for i in pool.ids.tolist()]  # 4 VID entries
    assert log_counts.tolist() == pytest.approx(expected, rel=1e-5)
    query, pos_ids = torch.randn(2, DIM), torch.tensor([2, 1])
    raw = plain.logits(query, pos_ids, table[pos_ids], pool)
    adjusted = corrected.logits(query, pos_ids, table[pos_ids], pool, log_counts)
    assert torch.allclose(adjusted[:, 0], raw[:, 0])  # the positive is not corrected
    unmasked = raw[:, 1:] != MASKED_LOGIT
    assert torch.allclose(adjusted[:, 1:][unmasked], (raw[:, 1:] - log_counts)[unmasked])
    assert (adjusted[:, 1:][~unmasked] == MASKED_LOGIT).all()


def test_sampled_softmax_negative_log_counts(table):
    query = torch.randn(2, DIM)
    pos = torch.tensor([1, 2])
    negs = torch.tensor([[3, 4, 1], [5, 5, 6]])
    log_counts = torch.tensor([[0.5, -0.2, 0.0], [1.0, 1.0, 0.3]])
    loss_fn = SampledSoftmaxLoss(NUM_ITEMS, num_negatives=3, temperature=TEMP)
    out = loss_fn(query, pos, lambda ids: table[ids], negative_ids=negs, negative_log_counts=log_counts)
    expected = 0.0
    for t in range(2):
        logits = [_cos(query[t], table[pos[t]]) / TEMP]
        logits += [_cos(query[t], table[n]) / TEMP - float(c) for n, c in zip(negs[t], log_counts[t]) if n != pos[t]]
        expected += _nll(logits)
    assert out.loss.item() == pytest.approx(expected / 2, rel=1e-5)


# ----------------------------------------------------------------------------- exact, mixed, smoothed


def _full_softmax_by_hand(query, pos, table, smoothing=0.0) -> float:
    """Cross-entropy over items 1..N (never the padding row 0), label-smoothed like torch's:
    (1 - eps) * nll + eps * mean over the N items of -log p."""
    total = 0.0
    for t in range(len(pos)):
        logits = [_cos(query[t], table[i]) / TEMP for i in range(1, NUM_ITEMS + 1)]
        log_z = math.log(sum(math.exp(x) for x in logits))
        nll = log_z - logits[pos[t] - 1]
        uniform = sum(log_z - x for x in logits) / NUM_ITEMS
        total += (1 - smoothing) * nll + smoothing * uniform
    return total / len(pos)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_full_softmax_matches_hand_computation_and_trains_the_table(table, smoothing):
    query = torch.randn(3, DIM, requires_grad=True)
    pos = torch.tensor([1, 4, 6])
    calls = []

    def lookup(ids):
        calls.append(ids.clone())
        return table[ids]

    loss_fn = SampledSoftmaxLoss(NUM_ITEMS, num_negatives=2, temperature=TEMP, negatives="all",
                                 label_smoothing=smoothing)
    out = loss_fn(query, pos, lookup, generator=torch.Generator().manual_seed(0))
    assert out.num_positions == 3 and loss_fn.negatives == "all"
    assert out.loss.item() == pytest.approx(_full_softmax_by_hand(query, pos.tolist(), table, smoothing), rel=1e-5)
    assert len(calls) == 1 and calls[0].tolist() == list(range(1, NUM_ITEMS + 1))  # every item, never row 0
    out.loss.backward()
    assert table.grad[0].abs().sum() == 0  # the padding row takes no part
    assert (table.grad[1:].abs().sum(1) > 0).all() and query.grad.abs().sum() > 0  # every item row learns


def test_sampled_label_smoothing_spreads_over_unmasked_candidates(table):
    query = torch.randn(2, DIM)
    pos = torch.tensor([1, 4])
    negs = torch.tensor([[2, 3, 5], [4, 1, 1]])  # row 1: one collision (masked, gets no smoothing mass)
    eps = 0.3
    out = SampledSoftmaxLoss(NUM_ITEMS, 3, TEMP, label_smoothing=eps)(query, pos, lambda ids: table[ids],
                                                                      negative_ids=negs)
    expected = 0.0
    for t in range(2):
        logits = [_cos(query[t], table[pos[t]]) / TEMP]
        logits += [_cos(query[t], table[n]) / TEMP for n in negs[t].tolist() if n != pos[t]]
        log_z = math.log(sum(math.exp(x) for x in logits))
        expected += (1 - eps) * (log_z - logits[0]) + eps * sum(log_z - x for x in logits) / len(logits)
    assert out.loss.item() == pytest.approx(expected / 2, rel=1e-5)
    plain = SampledSoftmaxLoss(NUM_ITEMS, 3, TEMP)(query, pos, lambda ids: table[ids], negative_ids=negs)
    assert plain.loss.item() == pytest.approx(_sampled_softmax_by_hand(query, pos.tolist(), negs.tolist(), table),
                                              rel=1e-5)


def test_mixed_pool_and_its_log_counts(table):
    freq = torch.tensor([0.0, 0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    loss_fn = SampledSoftmaxLoss(NUM_ITEMS, num_negatives=3, temperature=TEMP, negatives="mixed", item_frequency=freq)
    in_batch = torch.tensor([1, 1, 2, 4])
    ids, log_counts = loss_fn.mixed_pool(in_batch, uniform_ids=torch.tensor([6, 3, 1]))
    assert ids.tolist() == [[1, 1, 2, 4, 6, 3, 1]]  # in-batch (no dedup), then the uniform ones, one shared row
    expected = [math.log(4 * float(freq[i]) + 3 / NUM_ITEMS) for i in ids[0].tolist()]
    assert log_counts[0].tolist() == pytest.approx(expected, rel=1e-5)
    # the loss: each query against the shared pool, its own id masked, each logit corrected
    query, pos = torch.randn(2, DIM), torch.tensor([1, 4])
    out = loss_fn(query, pos, lambda ids: table[ids], negative_ids=torch.tensor([6, 3, 1]), in_batch_ids=in_batch)
    by_hand = 0.0
    for t in range(2):
        logits = [_cos(query[t], table[pos[t]]) / TEMP]
        logits += [_cos(query[t], table[i]) / TEMP - c for i, c in zip(ids[0].tolist(), expected) if i != pos[t]]
        by_hand += _nll(logits)
    assert out.loss.item() == pytest.approx(by_hand / 2, rel=1e-5)
    capped = SampledSoftmaxLoss(NUM_ITEMS, 3, TEMP, negatives="mixed", max_in_batch=2)
    ids, none = capped.mixed_pool(in_batch, torch.Generator().manual_seed(0))
    assert none is None and ids.shape == (1, 2 + 3)
    with pytest.raises(ValueError, match="mixed"):
        SampledSoftmaxLoss(NUM_ITEMS, 3, TEMP, item_frequency=freq)  # logQ belongs to the mixed pool


def test_mixed_logq_corrected_loss_estimates_the_full_softmax():
    """Monte Carlo: in-batch ids drawn by popularity plus uniform ids, corrected by
    log(M * freq + R / N): the sampled loss averages to the exact softmax loss (fixed seeds);
    without the correction it is far off."""
    n, dim, temp, m, r = 30, 8, 0.5, 60, 60
    torch.manual_seed(0)
    table = torch.randn(n + 1, dim)
    query = torch.randn(4, dim)
    pos = torch.tensor([1, 7, 15, 30])
    freq = torch.cat([torch.zeros(1), torch.softmax(torch.randn(n) * 1.5, 0)])  # skewed popularity
    lookup = lambda ids: table[ids]  # noqa: E731
    full = SampledSoftmaxLoss(n, r, temp, negatives="all")(query, pos, lookup).loss.item()
    corrected = SampledSoftmaxLoss(n, r, temp, negatives="mixed", item_frequency=freq)
    plain = SampledSoftmaxLoss(n, r, temp, negatives="mixed")
    gen = torch.Generator().manual_seed(1)
    trials = 400
    sums = {"corrected": 0.0, "plain": 0.0}
    for _ in range(trials):
        in_batch = torch.multinomial(freq, m, replacement=True, generator=gen)
        uniform = torch.randint(1, n + 1, (r,), generator=gen)
        for name, fn in (("corrected", corrected), ("plain", plain)):
            sums[name] += fn(query, pos, lookup, negative_ids=uniform, in_batch_ids=in_batch).loss.item()
    mean_corrected, mean_plain = sums["corrected"] / trials, sums["plain"] / trials
    assert mean_corrected == pytest.approx(full, rel=0.01)
    assert abs(mean_plain - full) > 10 * abs(mean_corrected - full)
