"""Jagged HSTU encoder vs the padded reference: outputs, gradients, masking, dropout, errors."""

import pytest
import torch

from sidvid_rec.config import DataConfig
from sidvid_rec.data import load_sequences
from sidvid_rec.errors import DataError
from sidvid_rec.modules.hstu import HSTUEncoder
from sidvid_rec.modules.hstu_reference import PaddedHSTUEncoder
from sidvid_rec.ops import jagged

SMALL = dict(max_len=24, dim=16, num_blocks=2, num_heads=1, dqk=8, dv=12, dropout=0.0, attn_dropout=0.0)


def _pair(**overrides):
    """A jagged encoder and a padded reference holding the same weights."""
    torch.manual_seed(0)
    kwargs = {**SMALL, **overrides}
    enc, ref = HSTUEncoder(**kwargs), PaddedHSTUEncoder(**kwargs)
    ref.load_state_dict(enc.state_dict())
    return enc.eval(), ref.eval()


def _batch(lengths, seed=0, dim=16):
    g = torch.Generator().manual_seed(seed)
    offsets = jagged.lengths_to_offsets(torch.tensor(lengths))
    total = int(offsets[-1])
    x = torch.randn(total, dim, generator=g)
    # gaps from seconds to years so that many time buckets occur
    gaps = torch.randint(0, 10**7, (total,), generator=g) // torch.randint(1, 10**4, (total,), generator=g)
    ts = torch.cumsum(gaps, 0)
    return x, offsets, ts


def _padded_outputs(ref, x, offsets, ts, positions=None, query_ts=None):
    lengths = jagged.offsets_to_lengths(offsets)
    n = int(lengths.max())
    pad = lambda t: None if t is None else jagged.jagged_to_padded_reference(t, offsets, n)  # noqa: E731
    out = ref(pad(x), lengths, pad(ts), pad(positions), pad(query_ts))
    return jagged.padded_to_jagged_reference(out, offsets)


def _assert_parity(enc, ref, x, offsets, ts, positions=None, query_ts=None):
    x_j, x_p = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_j = enc(x_j, offsets, ts, positions, query_ts)
    out_p = _padded_outputs(ref, x_p, offsets, ts, positions, query_ts)
    torch.testing.assert_close(out_j, out_p, rtol=1e-5, atol=1e-6)
    weights = torch.randn(out_j.shape, generator=torch.Generator().manual_seed(3))
    grads_j = torch.autograd.grad((out_j * weights).sum(), [x_j, *enc.parameters()])
    grads_p = torch.autograd.grad((out_p * weights).sum(), [x_p, *ref.parameters()])
    names = ["x"] + [name for name, _ in enc.named_parameters()]
    for name, g_j, g_p in zip(names, grads_j, grads_p):
        torch.testing.assert_close(g_j, g_p, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_same_state_dict_keys():
    enc, ref = _pair(num_heads=2)
    assert list(enc.state_dict()) == list(ref.state_dict())
    assert {k: v.shape for k, v in enc.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_heads": 2, "attention_scale": "max_len"},
        {"num_heads": 3, "dqk": 4, "dv": 5, "num_blocks": 3},
    ],
)
@pytest.mark.parametrize("causal_block", [0, 5, 64])  # whole chunks; 5-row blocks (a ragged last); one block
def test_parity_outputs_and_gradients_mixed_lengths(overrides, causal_block):
    enc, ref = _pair(**overrides)
    enc.causal_block = causal_block
    x, offsets, ts = _batch([1, 24, 5, 1, 17, 17, 3, 9, 2, 23])
    _assert_parity(enc, ref, x, offsets, ts)


def test_parity_with_positions_and_query_timestamps():
    """COBRA-style input: two tokens per item share a position and a timestamp."""
    enc, ref = _pair()
    enc.causal_block = 7
    x, offsets, ts = _batch([2, 12, 6, 20])
    item_ts = ts[::2].repeat_interleave(2)  # a SID/VID pair shares one time
    positions = jagged.index_within_sequence(offsets) // 2
    query_ts = jagged.next_timestamps(item_ts, offsets, last=torch.tensor([5, 6, 7, 8]) * 10**9)
    _assert_parity(enc, ref, x, offsets, item_ts, positions, query_ts)


def test_parity_on_real_sequences(cache_dir):
    """Real ml-latest-small histories (embedded data), capped to the most recent 24 items."""
    data = load_sequences(DataConfig(cache_dir=cache_dir))
    users = range(0, 600, 50)
    ends = [int(data.offsets[u + 1]) for u in users]
    spans = [(max(int(data.offsets[u]), end - 24), end) for u, end in zip(users, ends)]
    ts = torch.cat([torch.from_numpy(data.timestamps[a:b]) for a, b in spans])
    offsets = jagged.lengths_to_offsets(torch.tensor([b - a for a, b in spans]))
    x = torch.randn(int(offsets[-1]), 16, generator=torch.Generator().manual_seed(0))
    enc, ref = _pair(num_heads=2)
    enc.causal_block = 8
    _assert_parity(enc, ref, x, offsets, ts)


def test_fused_and_plain_attention_agree_and_chunking_does_not_matter():
    enc, _ = _pair(num_heads=2)
    x, offsets, ts = _batch([1, 24, 5, 1, 17, 17, 3, 9, 2, 23])
    baseline = enc(x, offsets, ts)
    enc.fused = False
    torch.testing.assert_close(enc(x, offsets, ts), baseline, rtol=1e-5, atol=1e-6)
    enc.fused = True
    for overhead in (0.0, 1e12):  # one chunk per distinct length; one chunk padded to the max
        enc.chunk_overhead = overhead
        torch.testing.assert_close(enc(x, offsets, ts), baseline, rtol=1e-5, atol=1e-6)
    enc.chunk_overhead = 0.0
    for block in (1, 3, 0):  # block-causal rows: one query per block .. the whole square
        enc.causal_block = block
        torch.testing.assert_close(enc(x, offsets, ts), baseline, rtol=1e-5, atol=1e-6)


def test_causal_later_items_do_not_change_earlier_outputs():
    enc, _ = _pair()
    x, offsets, ts = _batch([10, 7])
    before = enc(x, offsets, ts)
    changed = x.clone()
    changed[6] += 5.0  # sequence 0, position 6
    after = enc(changed, offsets, ts)
    torch.testing.assert_close(after[:6], before[:6], rtol=0, atol=1e-6)
    assert (after[6:10] - before[6:10]).abs().max() > 1e-3
    torch.testing.assert_close(after[10:], before[10:], rtol=0, atol=0)


def test_sequences_do_not_influence_each_other():
    enc, _ = _pair()
    x, offsets, ts = _batch([4, 24, 1, 9, 13])
    together = enc(x, offsets, ts)
    for b in range(5):
        a, e = int(offsets[b]), int(offsets[b + 1])
        alone = enc(x[a:e], torch.tensor([0, e - a]), ts[a:e])
        torch.testing.assert_close(together[a:e], alone, rtol=1e-5, atol=1e-6)


def test_outputs_are_unit_norm_and_empty_sequences_allowed():
    enc, _ = _pair()
    x, offsets, ts = _batch([3, 0, 5])
    out = enc(x, offsets, ts)
    assert out.shape == (8, 16)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(8))


def test_dropout_only_in_training():
    enc, _ = _pair(dropout=0.5, attn_dropout=0.3)
    x, offsets, ts = _batch([5, 11, 2])
    enc.eval()
    first, second = enc(x, offsets, ts), enc(x, offsets, ts)
    assert torch.equal(first, second)
    no_dropout, _ = _pair()  # same seed -> same weights
    torch.testing.assert_close(first, no_dropout(x, offsets, ts), rtol=0, atol=0)
    enc.train()
    train_out = enc(x.requires_grad_(), offsets, ts)
    assert (train_out - first).abs().max() > 1e-3
    train_out.sum().backward()  # the attention-dropout (unfused) path has a backward
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda x, o, t: (x, torch.tensor([0]), t[:0]), "empty batch"),
        (lambda x, o, t: (torch.randn(30, 16), torch.tensor([0, 30]), torch.zeros(30).long()), "max_len=24"),
        (lambda x, o, t: (x[:, :8], o, t), r"\[T, 16\]"),
        (lambda x, o, t: (x, o, t[:-1]), "timestamps must be"),
    ],
)
def test_bad_input_raises_one_line_data_error(make, message):
    enc, _ = _pair()
    x, offsets, ts = _batch([3, 4])
    with pytest.raises(DataError, match=message) as err:
        enc(*make(x, offsets, ts))
    assert "\n" not in str(err.value)


def test_block_causal_plan_skips_the_masked_blocks_and_is_configurable():
    """``train.attention_block`` reaches the encoder; the plan computes only the query blocks'
    keys up to each block's end (at width 200 and blocks of 64: 65% of the square)."""
    from sidvid_rec.config import load_config
    from sidvid_rec.errors import ConfigError
    from sidvid_rec.models.build import build_encoder
    from sidvid_rec.ops import hstu_attention

    offsets = jagged.lengths_to_offsets(torch.tensor([200, 200, 130]))
    ts = torch.arange(int(offsets[-1]))
    whole = hstu_attention.build_attention_plan(offsets, ts, ts, None, 200, 8, True, causal_block=0)
    blocked = hstu_attention.build_attention_plan(offsets, ts, ts, None, 200, 8, True, causal_block=64)
    assert blocked.blocks[0] == [(0, 64), (64, 128), (128, 192), (192, 200)]
    assert whole.executed_area() == sum(c.num_seqs * c.width ** 2 for c in whole.layout.chunks)
    square = sum(c.num_seqs * c.width ** 2 for c in blocked.layout.chunks)
    assert blocked.executed_area() < 0.7 * square
    # every block's bias index is the whole square's, sliced: the same bucket, distance and mask
    for c, chunk in enumerate(blocked.layout.chunks):
        for (r0, r1), index in zip(blocked.blocks[c], blocked.bias_index[c]):
            torch.testing.assert_close(index, whole.bias_index[c][0][:, r0:r1, :r1])
    cfg = load_config(None, ["train.attention_block=0", "model.mode=id"])
    assert build_encoder(cfg).causal_block == 0
    assert build_encoder(load_config(None, [])).causal_block == hstu_attention.CAUSAL_BLOCK
    with pytest.raises(ConfigError, match="train.attention_block"):
        load_config(None, ["train.attention_block=-1"])
