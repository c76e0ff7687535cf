"""The benchmark suite: its helpers, and ``python -m benchmarks.run --quick`` end to end so that
the suite never rots (about 3 minutes on the shared 2-core machine)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `benchmarks` is a top-level package of the repository, not installed
    sys.path.insert(0, REPO)

from benchmarks.bench_retrieval import exact_topk, recall_at_k  # noqa: E402
from benchmarks.bench_train import hstu_train_flops  # noqa: E402
from benchmarks.common import PhaseClock, replace_section  # noqa: E402
from sidvid_rec.retrieval import VidIndex  # noqa: E402
GENERATED = ("summary", "throughput", "limit", "scaling", "sids", "retrieval")


def test_replace_section_replaces_only_its_block():
    text = "# Results\n\n## By hand\n\nkeep me\n"
    once = replace_section(text, "limit", "first")
    assert once.startswith(text.rstrip("\n")) and "<!-- bench:limit -->\nfirst\n<!-- /bench:limit -->" in once
    twice = replace_section(replace_section(once, "sids", "s1"), "limit", "second")
    assert "first" not in twice and twice.count("<!-- bench:limit -->") == 1
    assert twice.index("second") < twice.index("s1")  # replaced in place, not appended
    assert "keep me" in twice


def test_hstu_flops_formula():
    # one layer, d=2, H=1, dqk=dv=1, sequences of 1 and 2 items: T=3, S=1+4=5
    f = hstu_train_flops([1, 2], dim=2, num_blocks=1, num_heads=1, dqk=1, dv=1)
    linear_fwd = 2 * 3 * 2 * (2 + 2) + 2 * 3 * 1 * 2  # uvqk + output projection
    attention_fwd = 2 * 5 * 1 + 2 * 5 * 1  # q k^T + A v
    assert f["linear"] == 3 * linear_fwd and f["attention"] == 3 * attention_fwd
    assert f["total"] == 3 * (linear_fwd + attention_fwd)
    assert hstu_train_flops([1, 2], 2, 4, 1, 1, 1)["total"] == 4 * f["total"]


def test_reference_step_flops_formula():
    from benchmarks.bench_perf import reference_step_flops

    # the encoder part is hstu_train_flops's; the loss scores 1 + R candidates per position, x3 for backward
    f = reference_step_flops(tokens=3, square=5, positions=3, dim=2, num_blocks=1, num_heads=1, dqk=1, dv=1,
                             negatives=4)
    assert f["encoder"] == hstu_train_flops([1, 2], dim=2, num_blocks=1, num_heads=1, dqk=1, dv=1)["total"]
    assert f["loss"] == 3 * 2 * 3 * (4 + 1) * 2 and f["total"] == f["encoder"] + f["loss"]


def test_phase_clock_books_nested_time_once():
    clock = PhaseClock()
    with clock.phase("outer"):
        with clock.phase("inner"):
            sum(range(20000))
    totals = clock.take()
    assert set(totals) == {"outer", "inner"} and all(v > 0 for v in totals.values())
    assert clock.take() == {}


def test_exact_topk_and_recall():
    vectors, queries = torch.randn(300, 8), torch.randn(5, 8)
    _, ids = exact_topk(vectors, queries, 10)
    assert torch.equal(ids, torch.topk(queries @ vectors.T, 10).indices)
    truth = ids.numpy()
    assert recall_at_k(truth, truth) == 1.0
    half = np.concatenate([truth[:, :5], np.full((5, 5), -1)], axis=1)
    assert recall_at_k(half, truth) == 0.5


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_set_search_params_changes_the_knob(kind):
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(2000, 16), dim=1)
    index = VidIndex.build(x, torch.arange(1, 2001), kind=kind, hnsw_m=8, ef_search=8, ivf_nlist=64, nprobe=1)
    truth = torch.topk(x[:50] @ x.T, 20).indices.numpy() + 1
    low = recall_at_k(index.search(x[:50], 20).ids.numpy(), truth)
    index.set_search_params(ef_search=256, nprobe=64)  # the other kind's knob is ignored
    high = recall_at_k(index.search(x[:50], 20).ids.numpy(), truth)
    assert high > low and high > 0.99


def _numbers(cell: str):
    return [float(m.replace(",", "")) for m in re.findall(r"\d[\d,]*\.?\d*", cell)]


@pytest.mark.slow
def test_quick_suite_writes_every_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Written by hand\n\nkeep me\n")
    plots = tmp_path / "plots"
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--results", str(results),
                           "--plots", str(plots)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    text = results.read_text()
    assert "keep me" in text
    for name in GENERATED:
        assert text.count(f"<!-- bench:{name} -->") == 1 and text.count(f"<!-- /bench:{name} -->") == 1, name
    for name in GENERATED[1:]:  # every section states its machine, versions and command
        block = text.split(f"<!-- bench:{name} -->")[1].split(f"<!-- /bench:{name} -->")[0]
        assert "Machine:" in block and "torch " in block and "python -m benchmarks.run --quick" in block, name
    # the summary table comes last in the output, one row per headline figure, positive values
    out = done.stdout.strip().splitlines()
    header = max(i for i, line in enumerate(out) if line.startswith("| section | figure | value"))
    rows = [line.split("|")[1:-1] for line in out[header + 2:]]
    assert rows and all(len(r) == 7 for r in rows)
    sections = {r[0].strip() for r in rows}
    assert {"limit", "scaling", "sids", "retrieval", "suite"} <= sections
    for r in rows:
        values = _numbers(r[2])
        assert values and values[0] > 0, r
    pngs = sorted(p.name for p in plots.iterdir())
    assert {"scaling.png", "sids_scale.png", "retrieval.png"} <= set(pngs)
    assert all((plots / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_bench_decode_tiny_run_agrees():
    """benchmarks/bench_decode.py on a tiny setting: cached and re-encoding give the same lists."""
    from benchmarks.bench_decode import main as bench_decode

    out = bench_decode(["--users", "4", "--history", "6", "--batch", "2", "--items", "60", "--layers", "2",
                        "--codebook-size", "4", "--dim", "8", "--blocks", "1", "--beam", "5", "--k", "5"])
    for name in ("cobra", "sid_gen"):
        assert out[name]["identical_lists"] == 1.0 and out[name]["max_score_diff"] < 1e-4
    assert len(out["invalid_prefix_share"]) == 3 and all(0.0 <= s <= 1.0 for s in out["invalid_prefix_share"])


def test_bench_serve_requests_mix_malformed_kinds():
    from benchmarks.bench_serve import MALFORMED, make_requests, percentile

    reqs = make_requests(list(range(1, 200)), 400, 0.1, body_limit=4096)
    kinds = [k for k, _, _ in reqs]
    assert len(reqs) == 400 and kinds.count("ok") == 360
    assert set(kinds) - {"ok"} == set(MALFORMED)
    assert all(status == (200 if k == "ok" else 413 if k == "too_large" else 422) for k, _, status in reqs)
    assert all(len(body) > 4096 for k, body, _ in reqs if k == "too_large")
    assert percentile([float(i) for i in range(1, 101)], 50) == 50.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0


def test_bench_sid_scale_tiny_run():
    """benchmarks/bench_sid_scale.py on two tiny catalogues: every figure is there and positive,
    the synthetic SIDs are distinct tuples."""
    from benchmarks.bench_sid_scale import main as bench_sid_scale, unique_codes

    codes = unique_codes(500, 3, 8, seed=1)
    assert codes.shape == (501, 3) and np.unique(codes[1:], axis=0).shape[0] == 500 and codes.max() < 8
    rows = bench_sid_scale(["--sizes", "200", "400", "--levels", "3", "--codebook-size", "8", "--dim", "8",
                            "--history", "5", "--train-users", "3", "--warmup", "1", "--steps", "1", "--users", "4",
                            "--batch", "2", "--beam", "3", "--k", "3", "--in-process"])
    assert [r["items"] for r in rows] == [200, 400]
    keys = ("trie_build_s", "sid_gen_train_tokens_per_s", "sid_gen_beam_ms_per_user", "cobra_train_tokens_per_s",
            "cobra_code_beam_ms_per_user", "cobra_beam_decoder_ms_per_user", "cobra_code_head_us_per_position",
            "peak_rss_mb")
    assert all(r[key] > 0 for r in rows for key in keys)


def test_bench_perf_pieces_run_and_measure():
    """The issue-17 benchmark's training step (blocked and per-position negatives), its
    interleaved timer and its memory probe on a tiny problem."""
    import math

    from benchmarks.bench_perf import _Trainer, _measure, interleaved

    trainer = _Trainer(num_items=200, max_len=40, num_negatives=8)
    batch = trainer.batch(sequences=4, length=30)
    assert batch[0].numel() == 120 and batch[2].tolist() == [0, 30, 60, 90, 120]
    before = trainer.table.weight.detach().clone()
    r = _measure(lambda: trainer.step(batch), steps=1)
    assert math.isfinite(r["wall"]) and r["cpu"] > 0 and r["peak_mb"] >= 0
    assert not torch.equal(before, trainer.table.weight.detach())  # the touched rows were updated
    trainer.set_loss(8, 16)
    res = interleaved({"a": lambda: trainer.step(batch), "b": lambda: None}, repeats=2, warmup=0)
    assert set(res) == {"a", "b"} and res["a"]["wall"] > res["b"]["wall"]
