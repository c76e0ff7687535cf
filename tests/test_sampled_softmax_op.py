"""The fused sampled-softmax kernel against its plain reference (values and gradients), the
losses routed through it against their unfused paths, and blocked negatives."""

import pytest
import torch
import torch.nn.functional as F

from sidvid_rec.losses import CandidatePool, InfoNCELoss, SampledSoftmaxLoss
from sidvid_rec.ops import sampled_softmax as op
from sidvid_rec.ops.sampled_softmax import reference_sampled_softmax_nll, sampled_softmax_nll

TEMP = 0.05


def _inputs(T, U, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    leaf = lambda n: F.normalize(torch.randn(n, D, generator=g), dim=-1).requires_grad_()  # noqa: E731
    return leaf(T), leaf(T), leaf(U), g


def _both(q, p, v, *args, **kwargs):
    out = []
    for fused in (False, True):
        loss = sampled_softmax_nll(q, p, v, *args, fused=fused, **kwargs)
        out.append((loss.detach(), torch.autograd.grad(loss, (q, p, v))))
    return out


# (T, U, R, rows, block): per position dense (U <= 8 R) and gathered, blocked with a partial last
# block, blocked exactly, several chunks, a single shared row
CASES = [(700, 40, 16, 700, 1), (700, 900, 16, 700, 1), (700, 900, 16, 11, 64), (1024, 900, 32, 4, 256),
         (1500, 900, 8, 3, 512), (700, 900, 16, 1, 1)]


@pytest.mark.parametrize("T,U,R,rows,block", CASES)
def test_fused_matches_reference_values_and_gradients(T, U, R, rows, block):
    q, p, v, g = _inputs(T, U, 24)
    index = torch.randint(0, U, (rows, R), generator=g)
    pos_keys = torch.randint(0, U, (T,), generator=g)
    pos_keys[: T // 3] = index[torch.arange(T // 3) // block % rows, 0]  # plenty of collisions
    bias = torch.rand(rows, R, generator=g)
    (ref, ref_grads), (fused, fused_grads) = _both(q, p, v, index, TEMP, block, pos_keys, index, bias)
    assert fused.item() == pytest.approx(ref.item(), abs=1e-5)
    for a, b in zip(ref_grads, fused_grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_fused_pool_without_index_matches_reference():
    q, p, v, g = _inputs(600, 300, 16)
    keys = torch.randint(0, 50, (1, 300), generator=g)
    pos_keys = torch.randint(0, 50, (600,), generator=g)
    bias = torch.randn(1, 300, generator=g)
    (ref, ref_grads), (fused, fused_grads) = _both(q, p, v, None, TEMP, 1, pos_keys, keys, bias)
    assert fused.item() == pytest.approx(ref.item(), abs=1e-5)
    for a, b in zip(ref_grads, fused_grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_fused_all_collisions_row_and_empty_pool_stay_finite():
    q, p, v, _ = _inputs(5, 3, 8)
    index = torch.zeros(5, 4, dtype=torch.long)
    keys = torch.zeros(5, dtype=torch.long)  # every negative is the positive
    (ref, _), (fused, grads) = _both(q, p, v, index, TEMP, 1, keys, index)
    assert fused.item() == pytest.approx(ref.item(), abs=1e-6) and fused.item() == pytest.approx(0.0, abs=1e-6)
    assert all(torch.isfinite(x).all() for x in grads)
    empty = sampled_softmax_nll(q, p, v[:0], None, TEMP)
    assert empty.item() == pytest.approx(0.0, abs=1e-6)


def test_fused_saves_only_gradients_and_skips_them_without_grad():
    T, U, R = 300, 500, 64
    q, p, v, g = _inputs(T, U, 16)
    index = torch.randint(0, U, (T, R), generator=g)
    loss = sampled_softmax_nll(q, p, v, index, TEMP)
    shapes = sorted(tuple(t.shape) for t in loss.grad_fn.saved_tensors)
    assert shapes == sorted([(T, 16), (T, 16), (U, 16)])  # never [T, R, D] nor [T, R]
    with torch.no_grad():
        assert sampled_softmax_nll(q, p, v, index, TEMP).item() == pytest.approx(loss.item(), abs=1e-6)


def test_fused_rejects_rows_that_do_not_fit_the_blocks():
    q, p, v, _ = _inputs(10, 5, 4)
    with pytest.raises(ValueError, match="blocks"):
        sampled_softmax_nll(q, p, v, torch.zeros(3, 2, dtype=torch.long), TEMP, block=2)


# ----------------------------------------------------------------------------- through the losses


NUM_ITEMS = 400


def _table(D=16, seed=1):
    return torch.randn(NUM_ITEMS + 1, D, generator=torch.Generator().manual_seed(seed)).requires_grad_()


@pytest.mark.parametrize("R,shared,log_counts", [(4, False, False), (128, False, True), (32, True, False)])
def test_sampled_softmax_loss_fused_equals_unfused(R, shared, log_counts):
    """Covers the unfused dense ([T, U] scores) and gathered paths, shared, and logQ."""
    table = _table()
    query = torch.randn(257, 16, generator=torch.Generator().manual_seed(2)).requires_grad_()
    pos = torch.randint(1, NUM_ITEMS + 1, (257,), generator=torch.Generator().manual_seed(3))
    results = []
    for fused in (False, True):
        loss_fn = SampledSoftmaxLoss(NUM_ITEMS, num_negatives=R, temperature=TEMP, shared=shared, fused=fused)
        negs = loss_fn.sample_negatives(257, torch.Generator().manual_seed(4), torch.device("cpu"))
        negs[:50, 0] = pos[:50] if not shared else negs[:50, 0]  # collisions
        counts = torch.rand(negs.shape, generator=torch.Generator().manual_seed(5)) if log_counts else None
        out = loss_fn(query, pos, lambda ids: table[ids], negative_ids=negs, negative_log_counts=counts)
        results.append((out.loss.detach(), torch.autograd.grad(out.loss, (query, table))))
    (a, ga), (b, gb) = results
    assert b.item() == pytest.approx(a.item(), abs=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)


def test_infonce_fused_equals_unfused():
    table = _table()
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(1, 40, (90,), generator=g)
    is_sid = torch.rand(90, generator=g) < 0.3
    query = torch.randn(60, 16, generator=g).requires_grad_()
    pos_ids = ids[:60]
    freq = torch.rand(NUM_ITEMS + 1, generator=g)
    results = []
    for fused in (False, True):
        loss_fn = InfoNCELoss(NUM_ITEMS, "in_batch_global", num_negatives=7, temperature=TEMP,
                              item_frequency=freq / freq.sum(), fused=fused)
        pool = CandidatePool(ids, table[ids] * 2.0, is_sid)
        out = loss_fn(query, pos_ids, table[pos_ids], pool, item_vectors_fn=lambda i: table[i],
                      generator=torch.Generator().manual_seed(7))
        results.append((out.loss.detach(), torch.autograd.grad(out.loss, (query, table))))
    (a, ga), (b, gb) = results
    assert b.item() == pytest.approx(a.item(), abs=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- blocked negatives


def test_block_of_one_is_per_position():
    table = _table()
    query = torch.randn(100, 16, generator=torch.Generator().manual_seed(8)).requires_grad_()
    pos = torch.randint(1, NUM_ITEMS + 1, (100,), generator=torch.Generator().manual_seed(9))
    outs = []
    for block in (0, 1):
        for fused in (False, True):
            loss_fn = SampledSoftmaxLoss(NUM_ITEMS, num_negatives=16, temperature=TEMP, negatives_block=block,
                                         fused=fused)
            out = loss_fn(query, pos, lambda ids: table[ids], generator=torch.Generator().manual_seed(10))
            outs.append((out.loss.detach(), torch.autograd.grad(out.loss, (query, table))))
    per_position = [o for i, o in enumerate(outs) if i in (0, 2)]  # unfused block 0 and block 1
    assert torch.equal(per_position[0][0], per_position[1][0])
    assert all(torch.equal(x, y) for x, y in zip(per_position[0][1], per_position[1][1]))
    for loss, grads in outs[1:]:
        assert loss.item() == pytest.approx(outs[0][0].item(), abs=1e-5)


def test_blocked_sampling_shape():
    loss_fn = SampledSoftmaxLoss(NUM_ITEMS, num_negatives=8, negatives_block=64)
    assert loss_fn.sample_negatives(130, torch.Generator().manual_seed(0), torch.device("cpu")).shape == (3, 8)
    assert loss_fn.sample_negatives(64, torch.Generator().manual_seed(0), torch.device("cpu")).shape == (1, 8)


def test_blocked_negatives_same_expected_loss_and_gradient():
    """Each position still sees R uniform negatives, so E[loss] and E[gradient] are those of
    per-position draws: means over many fixed seeds agree within a few standard errors."""
    table = _table(D=8)
    query = torch.randn(256, 8, generator=torch.Generator().manual_seed(11)).requires_grad_()
    pos = torch.randint(1, NUM_ITEMS + 1, (256,), generator=torch.Generator().manual_seed(12))
    stats = {}
    for block in (0, 64):
        loss_fn = SampledSoftmaxLoss(NUM_ITEMS, num_negatives=8, temperature=0.5, negatives_block=block)
        losses, grads = [], []
        for seed in range(200):
            out = loss_fn(query, pos, lambda ids: table[ids], generator=torch.Generator().manual_seed(1000 + seed))
            losses.append(out.loss.detach())
            grads.append(torch.autograd.grad(out.loss, query)[0])
        losses, grads = torch.stack(losses), torch.stack(grads)
        stats[block] = (losses.mean(), losses.std() / len(losses) ** 0.5, grads.mean(0), grads.std(0) / 200 ** 0.5)
    (m0, se0, g0, gse0), (m1, se1, g1, gse1) = stats[0], stats[64]
    assert abs(m0 - m1) < 4 * (se0 ** 2 + se1 ** 2) ** 0.5
    z = (g0 - g1) / (gse0 ** 2 + gse1 ** 2).sqrt().clamp(min=1e-12)
    assert z.abs().mean() < 1.0  # |z| of N(0, 1) averages 0.8
    assert F.cosine_similarity(g0.flatten(), g1.flatten(), dim=0) > 0.95
    # and the draws really are shared: a block's positions see the same negatives
    assert stats[64][1] > 0


def test_reference_is_exported_and_constants_sane():
    assert op.MASKED_LOGIT == -5e4 and op.CHUNK_POSITIONS > 0
    assert reference_sampled_softmax_nll is op.reference_sampled_softmax_nll


@pytest.mark.parametrize("bound", [50, 10_000])
def test_unique_ids_equals_torch_unique(bound):
    from sidvid_rec.ops.sampled_softmax import unique_ids

    ids = torch.randint(0, bound, (3000,), generator=torch.Generator().manual_seed(0))
    unique, inverse = unique_ids(ids, bound)
    expected_unique, expected_inverse = torch.unique(ids, return_inverse=True)
    assert torch.equal(unique, expected_unique) and torch.equal(inverse, expected_inverse)
