"""The most-popular baseline: training counts, full-ranking metrics by hand, the CLI and the pipeline line."""

import json
import math

import numpy as np
import pytest

from sidvid_rec.cli import main
from sidvid_rec.config import load_config
from sidvid_rec.data import load_sequences, make_split, training_item_counts
from sidvid_rec.eval.popularity import evaluate_most_popular


def _data(cache_dir, *overrides):
    cfg = load_config(None, [f"data.cache_dir={cache_dir}", *overrides])  # the embedded ml-latest-small
    return cfg, load_sequences(cfg.data)


@pytest.mark.parametrize("protocol,held", [("loo", 2), ("gr", 1)])
def test_training_counts_leave_out_every_held_out_item(cache_dir, protocol, held):
    _, data = _data(cache_dir)
    expected = np.zeros(data.num_items + 1, dtype=np.int64)
    for user in range(data.num_users):
        for item in data.item_values[data.offsets[user]:data.offsets[user + 1] - held]:
            expected[item] += 1
    counts = training_item_counts(data, protocol)
    assert np.array_equal(counts, expected) and counts[0] == 0
    assert counts.sum() == data.item_values.size - held * data.num_users


def _by_hand(data, split, protocol, max_len, filter_history):
    """Ranks from a plain loop: score = training count; ties and history as the evaluation counts them."""
    counts = training_item_counts(data, protocol).astype(np.float64)
    counts[0] = -np.inf
    examples = make_split(data, split, protocol, max_len)
    hr10 = ndcg10 = mrr = 0.0
    for e in range(examples.num_examples):
        scores = counts.copy()
        if filter_history:
            scores[examples.values[examples.offsets[e]:examples.offsets[e + 1]]] = -np.inf
        target = scores[examples.targets[e]]
        rank = int((scores >= target).sum()) if np.isfinite(target) else scores.size
        hr10 += rank <= 10
        ndcg10 += (rank <= 10) / math.log2(rank + 1)
        mrr += 1.0 / rank
    n = examples.num_examples
    return {"hr@10": hr10 / n, "ndcg@10": ndcg10 / n, "mrr": mrr / n, "count": n}


@pytest.mark.parametrize("split,filter_history", [("test", True), ("valid", True), ("test", False)])
def test_most_popular_metrics_equal_a_hand_computation(cache_dir, split, filter_history):
    cfg, data = _data(cache_dir)
    got = evaluate_most_popular(data, split, "loo", cfg.data.max_len, [10], filter_history, batch_size=97)
    want = _by_hand(data, split, "loo", cfg.data.max_len, filter_history)
    assert got["count"] == want["count"] == data.num_users
    for key in ("hr@10", "ndcg@10", "mrr"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert got["hr@10"] > 0.01  # popularity is a real signal on MovieLens, not a zero row


def test_data_baseline_cli(cache_dir, capsys):
    assert main(["data", "baseline", f"data.cache_dir={cache_dir}", "eval.ks=[10]"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["baseline"] == "most_popular" and out["split"] == "test"
    assert set(out["metrics"]) == {"hr@10", "ndcg@10", "mrr", "count"} and out["metrics"]["count"] == 610
    assert main(["data", "baseline", "--split", "valid", f"data.cache_dir={cache_dir}", "data.protocol=gr"]) == 2
    assert "no validation split" in capsys.readouterr().err
