"""Jagged vs padded HSTU: one training step on real length mixes, tokens/s and peak memory.

Usage::

    python -m benchmarks.jagged_vs_padded [--steps 10] [--repeats 3] [--datasets ml-100k beauty]

One step = item-embedding lookup, the HSTU encoder (d=50, 2 blocks, 1 head, dqk=dv=50,
dropout 0.2: the reference's ML-1M configuration), a sampled-softmax loss (128 uniform
negatives shared by the batch, temperature 0.05, next-item targets), backward and an AdamW
step, on batches of 128 random users. Histories: ML-100k (u.data, time-ordered, the 200 most
recent items) and Amazon Beauty (sequential.txt, the 20 most recent; it has no timestamps, so
items get one synthetic day each). The padded path converts the jagged batch to
``[B, max length in batch, D]`` and runs :class:`PaddedHSTUEncoder`; the jagged path runs
:class:`HSTUEncoder` on ``[T, D]``.

Each (dataset, path, repeat) runs in a fresh subprocess, alternating the two paths, so that
``ru_maxrss`` is that path's own peak; memory is reported as the peak RSS increase over the
process's RSS just before the first step (model and data already built). The machine is
shared and noisy: compare the ratios measured in one run, and read the medians.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from sidvid_rec.modules.hstu import HSTUEncoder
from sidvid_rec.modules.hstu_reference import PaddedHSTUEncoder
from sidvid_rec.ops import jagged

DATA = {
    "ml-100k": ("/work/shared/data/movielens/ml-100k/u.data", 200),
    "beauty": ("/work/shared/data/amazon/beauty/sequential.txt", 20),
}
BATCH, DIM, NEGATIVES, TEMPERATURE = 128, 50, 128, 0.05


def load_histories(dataset: str) -> Tuple[List[np.ndarray], List[np.ndarray], int]:
    """Per-user (item ids, timestamps), capped to the most recent ``max_len``; plus item count."""
    path, cap = DATA[dataset]
    items, stamps = [], []
    if dataset == "ml-100k":
        rows = np.loadtxt(path, dtype=np.int64)  # user item rating ts
        rows = rows[np.lexsort((rows[:, 3], rows[:, 0]))]
        _, starts, counts = np.unique(rows[:, 0], return_index=True, return_counts=True)
        for s, c in zip(starts, counts):
            items.append(rows[s : s + c, 1][-cap:])
            stamps.append(rows[s : s + c, 3][-cap:])
    else:
        with open(path) as f:  # benchmark input, read-only local file
            for line in f:
                seq = np.array(line.split()[1:], dtype=np.int64)[-cap:]
                items.append(seq)
                stamps.append(np.arange(len(seq), dtype=np.int64) * 86400 + 1_400_000_000)
    return items, stamps, int(max(s.max() for s in items))


def make_batches(dataset: str, steps: int, seed: int) -> Tuple[List[Tuple[torch.Tensor, ...]], int]:
    """``steps`` jagged batches of 128 random users: (item ids [T], timestamps [T], offsets [B+1])."""
    items, stamps, num_items = load_histories(dataset)
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(steps):
        users = rng.choice(len(items), BATCH, replace=False)
        lengths = torch.tensor([len(items[u]) for u in users])
        batches.append(
            (
                torch.from_numpy(np.concatenate([items[u] for u in users])),
                torch.from_numpy(np.concatenate([stamps[u] for u in users])),
                jagged.lengths_to_offsets(lengths),
            )
        )
    return batches, num_items


def sampled_softmax(
    out: torch.Tensor, targets: torch.Tensor, table: torch.nn.Embedding, num_items: int
) -> torch.Tensor:
    """Next-item sampled softmax: ``out [T, D]`` vs ``targets [T]`` (0 = no target) and shared negatives."""
    keep = targets > 0
    query = out[keep]
    pos = F.normalize(table(targets[keep]), dim=-1)
    neg_ids = torch.randint(1, num_items + 1, (NEGATIVES,))
    neg = F.normalize(table(neg_ids), dim=-1)
    pos_logit = (query * pos).sum(-1, keepdim=True)
    neg_logits = (query @ neg.T).masked_fill(targets[keep].unsqueeze(1) == neg_ids.unsqueeze(0), -5e4)
    logits = torch.cat([pos_logit, neg_logits], dim=1) / TEMPERATURE
    return -F.log_softmax(logits, dim=1)[:, 0].mean()


def next_items(item_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[T]`` next item within the sequence, 0 at each sequence's end."""
    nxt = torch.zeros_like(item_ids)
    nxt[:-1] = item_ids[1:]
    nxt[offsets[1:] - 1] = 0
    return nxt


def worker(dataset: str, path: str, steps: int, seed: int, threads: int) -> Dict[str, float]:
    """Runs ``steps`` training steps of one path and returns its speed and memory."""
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    batches, num_items = make_batches(dataset, steps + 2, seed)
    max_len = DATA[dataset][1]
    kwargs = dict(max_len=max_len, dim=DIM, num_blocks=2, num_heads=1, dqk=50, dv=50, dropout=0.2, attn_dropout=0.0)
    encoder = HSTUEncoder(**kwargs) if path == "jagged" else PaddedHSTUEncoder(**kwargs)
    table = torch.nn.Embedding(num_items + 1, DIM)
    opt = torch.optim.AdamW(list(encoder.parameters()) + list(table.parameters()), lr=1e-3, betas=(0.9, 0.98))

    def step(item_ids: torch.Tensor, ts: torch.Tensor, offsets: torch.Tensor) -> None:
        x = table(item_ids)  # [T, D]
        if path == "jagged":
            out = encoder(x, offsets, ts)
        else:
            lengths = jagged.offsets_to_lengths(offsets)
            n = int(lengths.max())
            padded = encoder(jagged.jagged_to_padded(x, offsets, n), lengths, jagged.jagged_to_padded(ts, offsets, n))
            out = jagged.padded_to_jagged(padded, offsets)
        loss = sampled_softmax(out, next_items(item_ids, offsets), table, num_items)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for b in batches[:2]:  # warm-up (allocator, first-call costs)
        step(*b)
    step_rates, step_ms = [], []
    for b in batches[2:]:
        start = time.perf_counter()
        step(*b)
        elapsed = time.perf_counter() - start
        step_rates.append(b[0].numel() / elapsed)
        step_ms.append(1e3 * elapsed)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # per-step medians: this shared VM sometimes stalls for a second, which would swamp a mean
    return {
        "tokens_per_s": statistics.median(step_rates),
        "ms_per_step": statistics.median(step_ms),
        "mean_tokens_per_s": sum(b[0].numel() for b in batches[2:]) / (sum(step_ms) / 1e3),
        "peak_delta_mb": (peak_rss - base_rss) / 1024,
        "peak_rss_mb": peak_rss / 1024,
        "tokens_per_batch": sum(b[0].numel() for b in batches[2:]) / steps,
    }


def run_worker(dataset: str, path: str, steps: int, seed: int, threads: int) -> Dict[str, float]:
    cmd = [sys.executable, "-m", "benchmarks.jagged_vs_padded", "--worker", path, "--datasets", dataset,
           "--steps", str(steps), "--seed", str(seed), "--threads", str(threads)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(dataset: str, results: Dict[str, List[Dict[str, float]]]) -> str:
    med = {p: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for p, rs in results.items()}
    j, p = med["jagged"], med["padded"]
    def row(path: str, m: Dict[str, float], speed: float, memory: float) -> str:
        return (f"| {dataset} | {path} | {m['tokens_per_s']:,.0f} | {m['ms_per_step']:.0f} | {m['peak_delta_mb']:.0f} "
                f"| {m['peak_rss_mb']:.0f} | {speed:.2f} | {memory:.2f} |")

    lines = [
        row("padded", p, 1.0, 1.0),
        row("jagged", j, j["tokens_per_s"] / p["tokens_per_s"], j["peak_delta_mb"] / max(p["peak_delta_mb"], 1e-9)),
    ]
    speedups = [rj["tokens_per_s"] / rp["tokens_per_s"] for rj, rp in zip(results["jagged"], results["padded"])]
    lines.append(f"<!-- {dataset}: per-repeat speedups (medians) {', '.join(f'{s:.2f}' for s in speedups)}; "
                 f"mean tokens/s jagged {j['mean_tokens_per_s']:,.0f} padded {p['mean_tokens_per_s']:,.0f}; "
                 f"{j['tokens_per_batch']:.0f} tokens/batch -->")
    return "\n".join(lines)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATA), choices=list(DATA))
    parser.add_argument("--steps", type=int, default=15, help="measured steps per run (after 2 warm-up steps)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs per path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = torch's default)")
    parser.add_argument("--worker", choices=["jagged", "padded"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.datasets[0], args.worker, args.steps, args.seed, args.threads)))
        return 0
    threads = args.threads or torch.get_num_threads()
    print(f"# {datetime.date.today()} {platform.node()} {platform.machine()} cpus={os.cpu_count()} "
          f"torch={torch.__version__} threads={threads} load={os.getloadavg()[0]:.1f}")
    print("| data | path | tokens/s | ms/step | peak RSS increase (MB) | peak RSS (MB) | speed vs padded "
          "| memory vs padded |")
    print("|---|---|---|---|---|---|---|---|")
    for dataset in args.datasets:
        results: Dict[str, List[Dict[str, float]]] = {"jagged": [], "padded": []}
        for rep in range(args.repeats):
            order = ("padded", "jagged") if rep % 2 == 0 else ("jagged", "padded")
            for path in order:
                results[path].append(run_worker(dataset, path, args.steps, args.seed + rep, args.threads))
        print(summarize(dataset, results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
