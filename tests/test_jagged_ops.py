"""Jagged helpers (ops/jagged.py) and the jagged HSTU attention (ops/hstu_attention.py) vs plain references."""

import itertools

import numpy as np
import pytest
import torch

from sidvid_rec.errors import DataError
from sidvid_rec.ops import hstu_attention, jagged


def _offsets(lengths):
    return jagged.lengths_to_offsets(torch.tensor(lengths, dtype=torch.int64))


def test_offsets_lengths_roundtrip_with_empty_sequences():
    lengths = torch.tensor([3, 0, 1, 5, 0])
    offsets = jagged.lengths_to_offsets(lengths)
    assert offsets.tolist() == [0, 3, 3, 4, 9, 9]
    assert offsets.dtype == torch.int64
    assert torch.equal(jagged.offsets_to_lengths(offsets), lengths)


def test_sequence_ids_and_index_within_sequence():
    offsets = _offsets([3, 0, 1, 2])
    assert jagged.sequence_ids(offsets).tolist() == [0, 0, 0, 2, 3, 3]
    assert jagged.index_within_sequence(offsets).tolist() == [0, 1, 2, 0, 0, 1]


@pytest.mark.parametrize("with_last", [False, True])
def test_next_timestamps_matches_loop(with_last):
    g = torch.Generator().manual_seed(0)
    offsets = _offsets([4, 1, 0, 3, 2])
    ts = torch.randint(0, 10**9, (10,), generator=g)
    last = torch.randint(0, 10**9, (5,), generator=g) if with_last else None
    got = jagged.next_timestamps(ts, offsets, last)
    assert torch.equal(got, jagged.next_timestamps_reference(ts, offsets, last))
    assert got[0] == ts[1] and got[5] == ts[6]
    assert got[3] == (last[0] if with_last else ts[3])  # last row: the target's time, or its own
    assert got[4] == (last[1] if with_last else ts[4])


def test_time_bucket_hand_computed():
    dt = torch.tensor([0, 1, -1, 2, -2, 3, 10, 86_400, 10**9, -(10**9), 2**62])
    # floor(ln(max(|dt|,1)) / 0.301): ln 2 = 0.693 -> 2; ln 3 = 1.099 -> 3; ln 10 = 2.303 -> 7;
    # ln 86400 = 11.367 -> 37; ln 1e9 = 20.723 -> 68; ln 2^62 = 42.98 -> 142 -> clamped to 128
    assert jagged.time_bucket(dt, 128).tolist() == [0, 0, 0, 2, 2, 3, 7, 37, 68, 68, 128]
    assert jagged.time_bucket(dt, 5).tolist() == [0, 0, 0, 2, 2, 3, 5, 5, 5, 5, 5]


def test_time_bucket_matches_reference_formula():
    dt = torch.randint(-(10**9), 10**9, (20_000,), generator=torch.Generator().manual_seed(1))
    reference = (torch.log(torch.abs(dt).clamp(min=1)) / 0.301).long().clamp(0, 128)
    assert torch.equal(jagged.time_bucket(dt, 128), reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
@pytest.mark.parametrize("max_len", [6, 3])
def test_jagged_padded_conversions_match_loops(dtype, max_len):
    offsets = _offsets([2, 0, 6, 1])
    values = (torch.arange(9 * 4).view(9, 4) * 3).to(dtype)
    values = values if dtype == torch.float32 else values[:, 0]  # int path: 1-D timestamps
    padded = jagged.jagged_to_padded(values, offsets, max_len, padding_value=-1)
    assert torch.equal(padded, jagged.jagged_to_padded_reference(values, offsets, max_len, padding_value=-1))
    if max_len == 6:
        back = jagged.padded_to_jagged(padded, offsets)
        assert torch.equal(back, jagged.padded_to_jagged_reference(padded, offsets))
        assert torch.equal(back, values)


@pytest.mark.parametrize(
    "offsets, message",
    [
        (torch.tensor([0]), "empty batch"),
        (torch.tensor([0, 2, 1, 3]), "non-decreasing"),
        (torch.tensor([0, 2, 4]), "from 0 to T=3"),
        (torch.tensor([[0, 3]]), "1-D"),
    ],
)
def test_validate_offsets_errors(offsets, message):
    with pytest.raises(DataError, match=message):
        jagged.validate_offsets(offsets, 3)


def _check_plan(plan, lengths):
    offsets = jagged.lengths_to_offsets(lengths)
    total = int(offsets[-1])
    # every jagged row sits in exactly one padded row that holds that row
    assert torch.equal(plan.gather_rows[plan.scatter_rows], torch.arange(total))
    assert plan.num_rows == sum(c.num_seqs * c.width for c in plan.chunks)
    members = torch.cat([c.seq_ids for c in plan.chunks])
    assert sorted(members.tolist()) == [b for b in range(len(lengths)) if lengths[b] > 0]
    for c in plan.chunks:
        assert int(c.lengths.max()) == c.width and torch.equal(c.lengths, lengths[c.seq_ids])
        rows = plan.gather_rows[c.row_begin : c.row_begin + c.num_seqs * c.width].view(c.num_seqs, c.width)
        seq_of_row = jagged.sequence_ids(offsets)[rows]  # padded rows stay inside their sequence
        assert torch.equal(seq_of_row, c.seq_ids.unsqueeze(1).expand_as(seq_of_row))


def test_plan_length_chunks_layout_and_extremes():
    lengths = torch.tensor([5, 1, 0, 7, 7, 2, 5, 3])
    offsets = jagged.lengths_to_offsets(lengths)
    for overhead in (0, 20, 1e12):
        _check_plan(jagged.plan_length_chunks(offsets, overhead), lengths)
    exact = jagged.plan_length_chunks(offsets, 0)
    assert exact.num_rows == int(lengths.sum())  # one chunk per distinct length: no padding
    single = jagged.plan_length_chunks(offsets, 1e12)
    assert len(single.chunks) == 1 and single.chunks[0].width == 7 and single.num_rows == 7 * 7


def test_partition_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        lengths = np.sort(rng.integers(1, 30, size=int(rng.integers(1, 8))))[::-1]
        overhead = float(rng.choice([0, 50, 300, 2000]))

        def cost(starts):
            bounds = list(starts) + [len(lengths)]
            return sum((e - s) * lengths[s] ** 2 + overhead for s, e in zip(bounds[:-1], bounds[1:]))

        best = min(
            cost((0,) + cut)
            for r in range(len(lengths))
            for cut in itertools.combinations(range(1, len(lengths)), r)
        )
        assert cost(jagged._partition_sorted(lengths, overhead)) == pytest.approx(best)


def test_relative_bias_table_layout():
    time_w, pos_w = torch.tensor([10.0, 20.0, 30.0]), torch.tensor([1.0, 2.0])
    table = hstu_attention.relative_bias_table(time_w, pos_w).view(3, 4)
    assert table[:, :2].tolist() == [[11.0, 12.0], [21.0, 22.0], [31.0, 32.0]]
    assert (table[:, 2:] == hstu_attention.MASKED_BIAS).all()


def test_bias_index_hand_computed():
    """Two keys/queries, max_len 3: columns i - j below the diagonal, masked (>= 3) above."""
    key_ts = torch.tensor([[100, 110]])
    query_ts = torch.tensor([[110, 120]])  # next item's time
    index = hstu_attention._chunk_bias_index(key_ts, query_ts, None, max_len=3, num_time_buckets=8)
    # dt: [[10, 0], [20, 10]] -> buckets [[7, 0], [8 (ln 20 / 0.301 = 9.95, clamped to 8), 7]]
    assert index[0].tolist() == [[7 * 6 + 0, 0 * 6 + 3], [8 * 6 + 1, 7 * 6 + 0]]
    pos = torch.tensor([[0, 0]])  # a SID/VID pair sharing a position: distance 0 for both
    index = hstu_attention._chunk_bias_index(key_ts, query_ts, pos, max_len=3, num_time_buckets=8)
    assert index[0].tolist() == [[7 * 6 + 0, 0 * 6 + 3], [8 * 6 + 0, 7 * 6 + 0]]


def test_bias_index_clamps_distances_beyond_max_len():
    """More tokens than max_len (explicit positions): far pairs share the last distance, stay causal."""
    n, max_len = 7, 3
    ts = torch.zeros(1, n, dtype=torch.int64)
    for pos in (None, torch.arange(n).unsqueeze(0)):
        bucket, column = hstu_attention.split_bias_index(
            hstu_attention._chunk_bias_index(ts, ts, pos, max_len, num_time_buckets=4), max_len
        )
        steps = torch.arange(n)
        diff = steps.unsqueeze(1) - steps.unsqueeze(0)
        expected = torch.where(diff >= 0, diff.clamp(max=max_len - 1), max_len)
        assert torch.equal(column[0].long(), expected) and bool((bucket == 0).all())


@pytest.mark.parametrize("scale", [1, 1000])  # seconds and milliseconds
def test_bias_index_time_buckets_match_time_bucket(scale):
    g = torch.Generator().manual_seed(0)
    key_ts = (torch.randint(0, 10**9, (6, 30), generator=g) * scale).sort(dim=1).values + 10**9 * scale
    query_ts = key_ts + torch.randint(-(10**6), 10**6, (6, 30), generator=g) * scale
    index = hstu_attention._chunk_bias_index(key_ts, query_ts, None, max_len=30, num_time_buckets=128)
    expected = jagged.time_bucket(query_ts.unsqueeze(2) - key_ts.unsqueeze(1), 128)
    bucket, column = hstu_attention.split_bias_index(index, 30)
    assert torch.equal(bucket.long(), expected)
    steps = torch.arange(30)
    causal = steps.unsqueeze(1) >= steps.unsqueeze(0)
    assert torch.equal(column[:, causal], (steps.unsqueeze(1) - steps.unsqueeze(0))[causal].int().expand(6, -1))
    assert bool((column[:, ~causal] >= 30).all())


def test_masked_scores_are_exactly_zero_with_zero_gradient():
    s = (torch.randn(100_000) * 30 + hstu_attention.MASKED_BIAS).requires_grad_()
    out = torch.nn.functional.silu(s)
    out.sum().backward()
    assert out.abs().max() == 0 and s.grad.abs().max() == 0
    assert torch.ops.aten.silu_backward(torch.randn(100_000), s.detach()).abs().max() == 0


def _dense_attention_reference(q, k, v, offsets, timestamps, query_ts, positions, time_w, pos_w, heads, max_len,
                               by_len):
    """One sequence at a time, the obvious way."""
    outs = []
    for b in range(offsets.numel() - 1):
        s0, s1 = int(offsets[b]), int(offsets[b + 1])
        n = s1 - s0
        if n == 0:
            continue
        pos = positions[s0:s1] if positions is not None else torch.arange(n)
        dist = (pos[:, None] - pos[None, :]).clamp(0, max_len - 1)
        bucket = jagged.time_bucket(query_ts[s0:s1, None] - timestamps[None, s0:s1], time_w.numel() - 1)
        bias = time_w[bucket] + pos_w[dist]
        mask = torch.tril(torch.ones(n, n))
        qh, kh, vh = (t[s0:s1].view(n, heads, -1).transpose(0, 1) for t in (q, k, v))
        a = torch.nn.functional.silu(qh @ kh.transpose(1, 2) + bias) * mask / (n if by_len else max_len)
        outs.append((a @ vh).transpose(0, 1).reshape(n, -1))
    return torch.cat(outs)


@pytest.mark.parametrize("heads, with_positions, by_len", [(1, False, True), (2, True, False), (3, False, True)])
def test_pointwise_attention_fused_unfused_and_loop_agree(heads, with_positions, by_len):
    torch.manual_seed(0)
    max_len, buckets, dqk, dv = 12, 16, 4, 3
    lengths = torch.tensor([1, 12, 5, 0, 7, 7, 2, 11])
    offsets = jagged.lengths_to_offsets(lengths)
    total = int(offsets[-1])
    ts = torch.cumsum(torch.randint(0, 5000, (total,)), 0)
    query_ts = jagged.next_timestamps(ts, offsets)
    positions = jagged.index_within_sequence(offsets) // 2 if with_positions else None
    q, k = (torch.randn(total, heads * dqk, requires_grad=True) for _ in range(2))
    v = torch.randn(total, heads * dv, requires_grad=True)
    time_w = torch.randn(buckets + 1, requires_grad=True)
    pos_w = torch.randn(max_len, requires_grad=True)
    weights = torch.randn(total, heads * dv)
    params = [q, k, v, time_w, pos_w]
    results = []
    for fused in (True, False):
        plan = hstu_attention.build_attention_plan(
            offsets, ts, query_ts, positions, max_len, buckets, by_len, overhead=40
        )
        table = hstu_attention.relative_bias_table(time_w, pos_w)
        out = hstu_attention.jagged_pointwise_attention(q, k, v, table, plan, heads, fused=fused)
        results.append((out, torch.autograd.grad((out * weights).sum(), params)))
    ref = _dense_attention_reference(q, k, v, offsets, ts, query_ts, positions, time_w, pos_w, heads, max_len, by_len)
    results.append((ref, torch.autograd.grad((ref * weights).sum(), params)))
    for out, grads in results[1:]:
        torch.testing.assert_close(results[0][0], out, rtol=1e-5, atol=1e-6)
        for g0, g1 in zip(results[0][1], grads):
            torch.testing.assert_close(g0, g1, rtol=1e-4, atol=1e-5)


def test_pointwise_attention_gradcheck_float64():
    torch.manual_seed(0)
    offsets = _offsets([3, 1, 4])
    ts = torch.tensor([0, 5, 100, 7, 1, 2, 3000, 10**6])
    plan = hstu_attention.build_attention_plan(offsets, ts, jagged.next_timestamps(ts, offsets), None, 4, 8, True, 10)
    q, k, v = (torch.randn(8, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    time_w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    pos_w = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, time_w, pos_w):
        table = hstu_attention.relative_bias_table(time_w, pos_w)
        return hstu_attention.jagged_pointwise_attention(q, k, v, table, plan, 2)

    assert torch.autograd.gradcheck(f, (q, k, v, time_w, pos_w))
