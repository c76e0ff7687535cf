"""KV-cached incremental HSTU: appended tokens score exactly as re-encoding the whole sequence."""

import pytest
import torch

from sidvid_rec.errors import DataError
from sidvid_rec.modules.hstu import HSTUEncoder
from sidvid_rec.ops import jagged

DIM = 8


def _encoder(scale: str, heads: int, seed: int = 0) -> HSTUEncoder:
    torch.manual_seed(seed)
    enc = HSTUEncoder(max_len=16, dim=DIM, num_blocks=2, num_heads=heads, dqk=4, dv=6, dropout=0.0,
                      attn_dropout=0.0, num_time_buckets=16, attention_scale=scale).eval()
    for layer in enc.layers:  # visible biases: the test must see a wrong distance or time bucket
        layer.rel_bias.ts_w.data.normal_(std=0.5)
        layer.rel_bias.pos_w.data.normal_(std=0.5)
    return enc


def _reference(enc, hist_x, hist_ts, new_x, new_ts, new_q, pad: int = 0):
    """Re-encodes one history plus its appended tokens (and ``pad`` later tokens, causally
    invisible, that set the "length" divisor); returns the outputs of the real rows."""
    new_x = torch.cat([new_x, torch.randn(pad, DIM)])
    new_ts, new_q = torch.cat([new_ts, new_ts[-1:].repeat(pad)]), torch.cat([new_q, new_q[-1:].repeat(pad)])
    x = torch.cat([hist_x, new_x])
    ts = torch.cat([hist_ts, new_ts])
    offsets = torch.tensor([0, x.shape[0]])
    query = jagged.next_timestamps(ts, offsets)
    query[hist_x.shape[0]:] = new_q
    return enc(x, offsets, ts, query_timestamps=query)[:x.shape[0] - pad]


@pytest.mark.parametrize("scale", ["length", "max_len"])
@pytest.mark.parametrize("heads", [1, 2])
def test_cached_steps_match_re_encoding(scale, heads):
    enc = _encoder(scale, heads)
    gen = torch.Generator().manual_seed(1)
    lengths, beams, steps = [5, 3, 9], 3, 3
    batch = len(lengths)
    offsets = jagged.lengths_to_offsets(torch.tensor(lengths))
    hist_x = torch.randn(sum(lengths), DIM, generator=gen)
    hist_ts = torch.cat([torch.cumsum(torch.randint(1, 5000, (n,), generator=gen), 0) for n in lengths])
    ends = offsets[1:] - 1
    new_ts = hist_ts[ends].unsqueeze(1) + torch.randint(0, 90000, (batch, steps), generator=gen).cumsum(1)
    new_q = new_ts + torch.randint(0, 50, (batch, steps), generator=gen)  # own query times, like COBRA's
    hist_q = jagged.next_timestamps(hist_ts, offsets, last=new_ts[:, 0])
    hist_out, cache = enc.encode_cached(hist_x, offsets, hist_ts, query_timestamps=hist_q, appended=steps)
    # every beam's tokens so far, to re-encode; beams are reordered between steps
    tokens = [[[] for _ in range(beams)] for _ in range(batch)]
    step = None
    for s in range(steps):
        if step is not None:  # prune: beam w continues beam parent[w] of the same history
            parent = torch.stack([torch.randint(0, beams, (beams,), generator=gen) for _ in range(batch)])
            tokens = [[list(tokens[b][int(p)]) for p in parent[b]] for b in range(batch)]
            step = step.select((parent + torch.arange(batch).unsqueeze(1) * beams).reshape(-1))
        x = torch.randn(batch * beams, DIM, generator=gen)
        out, step = enc.extend(cache, step, x, new_ts[:, s], torch.tensor(lengths) + s, new_q[:, s])
        for b in range(batch):
            for w in range(beams):
                tokens[b][w].append(x[b * beams + w])
                hx = hist_x[offsets[b]:offsets[b + 1]]
                ref = _reference(enc, hx, hist_ts[offsets[b]:offsets[b + 1]], torch.stack(tokens[b][w]),
                                 new_ts[b, :s + 1], new_q[b, :s + 1], pad=steps - s - 1)
                torch.testing.assert_close(out[b * beams + w], ref[-1], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(hist_out[offsets[b]:offsets[b + 1]], ref[:lengths[b]], rtol=1e-5, atol=1e-6)


def test_length_scale_divides_by_the_final_length():
    """Under "length" scaling the history is encoded for its final length: its outputs equal
    re-encoding with the appended tokens, not the history alone."""
    enc = _encoder("length", 1)
    x, ts = torch.randn(6, DIM), torch.arange(6) * 100
    offsets = torch.tensor([0, 6])
    alone = enc(x, offsets, ts)
    cached, _ = enc.encode_cached(x, offsets, ts, query_timestamps=jagged.next_timestamps(ts, offsets), appended=2)
    padded = enc(torch.cat([x, torch.randn(2, DIM)]), torch.tensor([0, 8]), torch.cat([ts, ts[-1:], ts[-1:]]))
    torch.testing.assert_close(cached, padded[:6], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cached, alone)


def test_extend_refuses_more_tokens_than_encoded_for():
    enc = _encoder("length", 1)
    x, ts, offsets = torch.randn(4, DIM), torch.arange(4), torch.tensor([0, 4])
    _, cache = enc.encode_cached(x, offsets, ts, appended=1)
    one = torch.tensor([4])
    _, step = enc.extend(cache, None, torch.randn(2, DIM), one, one, one)
    with pytest.raises(DataError, match="appended"):
        enc.extend(cache, step, torch.randn(2, DIM), one, one + 1, one)
