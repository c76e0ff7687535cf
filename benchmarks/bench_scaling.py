"""Section 3 of the suite: HSTU training-step cost vs batch size and vs sequence length.

One step is the one of ``benchmarks/jagged_vs_padded.py`` (its ``sampled_softmax`` and
``next_items`` are reused): item-table lookup, the jagged :class:`HSTUEncoder` (d=50, 2 blocks,
1 head, dqk=dv=50, dropout 0.2), sampled softmax with 128 shared negatives, backward, AdamW.
Sequences are synthetic: ``batch_size`` sequences of exactly ``length`` items (random ids out
of 10,000, increasing timestamps), so ``length`` is both the longest and every sequence's
length and the attention area grows as ``batch_size * length^2``.
"""

import statistics
import time
from typing import Any, Dict

NUM_ITEMS = 10_000


def scaling_step(batch_size: int, length: int, steps: int, warmup: int, seed: int = 0) -> Dict[str, Any]:
    """Median tokens/s and the peak RSS increase of training steps on ``batch_size x length`` batches."""
    import numpy as np
    import torch

    from benchmarks.common import current_rss_mb, peak_rss_mb, reset_peak_rss
    from benchmarks.jagged_vs_padded import DIM, next_items, sampled_softmax
    from sidvid_rec.modules.hstu import HSTUEncoder
    from sidvid_rec.ops import jagged

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokens = batch_size * length
    offsets = jagged.lengths_to_offsets(torch.full((batch_size,), length, dtype=torch.int64))
    batches = []
    for _ in range(warmup + steps):
        ids = torch.from_numpy(rng.integers(1, NUM_ITEMS + 1, size=tokens))
        gaps = rng.integers(1, 86_400, size=(batch_size, length))
        ts = torch.from_numpy((1_400_000_000 + np.cumsum(gaps, axis=1)).reshape(-1))
        batches.append((ids, ts))
    encoder = HSTUEncoder(max_len=length, dim=DIM, num_blocks=2, num_heads=1, dqk=DIM, dv=DIM, dropout=0.2,
                          attn_dropout=0.0)
    table = torch.nn.Embedding(NUM_ITEMS + 1, DIM)
    opt = torch.optim.AdamW(list(encoder.parameters()) + list(table.parameters()), lr=1e-3, betas=(0.9, 0.98))
    rss_before = current_rss_mb()
    reset_peak_rss()
    times = []
    for i, (ids, ts) in enumerate(batches):
        start = time.perf_counter()
        out = encoder(table(ids), offsets, ts)
        loss = sampled_softmax(out, next_items(ids, offsets), table, NUM_ITEMS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = peak_rss_mb()
    seconds = statistics.median(times)
    return {"batch_size": batch_size, "length": length, "tokens": tokens, "ms_per_step": 1e3 * seconds,
            "tokens_per_s": tokens / seconds, "peak_delta_mb": peak - rss_before, "peak_rss_mb": peak}
