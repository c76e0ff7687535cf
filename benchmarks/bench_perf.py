"""Issue 17 (performance): loss kernels, training step, evaluation / decoding per 1,000 users,
cost curves, encoder threads. Every figure is a ratio against a baseline measured in the same
run, interleaved (baseline and candidates alternate, repeat after repeat), wall time with CPU
time (``time.process_time``) beside it, one intra-op thread per process unless stated.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_perf loss            # the loss variants, ML-100k shapes
    OMP_NUM_THREADS=1 python -m benchmarks.bench_perf step            # training steps, fused vs unfused
    OMP_NUM_THREADS=1 python -m benchmarks.bench_perf decode          # eval + decoders per 1,000 users
    OMP_NUM_THREADS=1 python -m benchmarks.bench_perf curves          # tokens/s vs length / catalogue / negatives
    OMP_NUM_THREADS=1 python -m benchmarks.bench_perf threads         # encoder, 1 vs 2 threads

Each prints Markdown (and writes ``--json``); plots go to ``benchmarks/plots/``.
"""

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

PLOTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plots")


def _timed(fn: Callable[[], Any]) -> Tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(variants: Dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> Dict[str, Dict[str, float]]:
    """Runs the variants in turn (rotating the order each repeat); median wall / CPU seconds."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    walls: Dict[str, List[float]] = {n: [] for n in names}
    cpus: Dict[str, List[float]] = {n: [] for n in names}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            w, c = _timed(variants[name])
            walls[name].append(w)
            cpus[name].append(c)
    return {n: {"wall": statistics.median(walls[n]), "cpu": statistics.median(cpus[n]),
                "wall_min": min(walls[n])} for n in names}


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _peak_rss_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------------------- 1. loss


def loss_bench(repeats: int) -> Tuple[str, Dict[str, Any]]:
    """Loss forward + backward at the ML-100k id batch's shapes (T = 10,281 positions, N = 1,682
    items, R = 128, D = 50), the COBRA VID shape (P = 10,281, pool M = 256) and a large catalogue
    (N = 1,000,000: the gathered path)."""
    import torch

    from sidvid_rec.losses import CandidatePool, InfoNCELoss, SampledSoftmaxLoss

    torch.set_num_threads(1)
    T, D, R = 10281, 50, 128
    out: Dict[str, Any] = {}
    sections = []
    for num_items in (1682, 1_000_000):
        table = torch.nn.Parameter(torch.randn(num_items + 1, D) * 0.02)
        query = torch.randn(T, D, requires_grad=True)
        pos = torch.randint(1, num_items + 1, (T,), generator=torch.Generator().manual_seed(0))

        def variant(fused: bool, block: int, shared: bool = False) -> Callable[[], Any]:
            loss_fn = SampledSoftmaxLoss(num_items, R, 0.05, shared=shared, negatives_block=block, fused=fused)

            def run() -> None:
                g = torch.Generator().manual_seed(1)
                loss = loss_fn(query, pos, lambda ids: table[ids], generator=g).loss
                loss.backward()
                query.grad = None
                table.grad = None
            return run

        variants = {"per position, unfused (today)": variant(False, 0),
                    "per position, fused": variant(True, 0),
                    "block 64, fused": variant(True, 64),
                    "block 256, fused": variant(True, 256),
                    "block 256, unfused reference": variant(False, 256),
                    "shared (one draw per batch), fused": variant(True, 0, shared=True)}
        # peak memory of one step of each (separately, before timing)
        peaks = {}
        for name, fn in variants.items():
            base = _rss_mb()
            _peak_rss_reset()
            fn()
            peaks[name] = _peak_rss_mb() - base
        res = interleaved(variants, repeats)
        base = res["per position, unfused (today)"]
        rows = [[name, f"{r['wall'] * 1e3:.1f}", f"{r['cpu'] * 1e3:.1f}", f"{base['wall'] / r['wall']:.2f}x",
                 f"{base['cpu'] / r['cpu']:.2f}x", f"{max(peaks[name], 0):.0f}"] for name, r in res.items()]
        out[f"sampled_{num_items}"] = {"timings": res, "peak_mb": peaks}
        sections.append(f"Sampled softmax, T = {T:,}, N = {num_items:,}, R = {R}, D = {D} "
                        f"(forward + backward, median of {repeats} interleaved repeats):\n\n" + md_table(
                            ["variant", "wall ms", "CPU ms", "speed-up (wall)", "speed-up (CPU)",
                             "peak RSS increase MB"], rows))
    # COBRA VID InfoNCE shape (the ML-100k config: 128 in-batch + 128 global negatives)
    num_items = 1682
    table = torch.nn.Parameter(torch.randn(num_items + 1, D) * 0.02)
    query = torch.randn(T, D, requires_grad=True)
    g0 = torch.Generator().manual_seed(0)
    ids = torch.randint(1, num_items + 1, (2 * T,), generator=g0)
    is_sid = torch.arange(2 * T) >= T
    pos = ids[:T]

    def vid(fused: bool, pool_size: int) -> Callable[[], Any]:
        loss_fn = InfoNCELoss(num_items, "in_batch_global", num_negatives=128, temperature=0.05,
                              max_in_batch=pool_size, fused=fused)

        def run() -> None:
            pool = CandidatePool(ids, table[ids], is_sid)
            loss = loss_fn(query, pos, table[pos], pool, item_vectors_fn=lambda i: table[i],
                           generator=torch.Generator().manual_seed(1)).loss
            loss.backward()
            query.grad = None
            table.grad = None
        return run

    for pool_size, label in ((128, "M = 256 (config: 128 in-batch + 128 global)"),
                             (0, f"M = {T + 128:,} (every in-batch VID entry + 128 global)")):
        res = interleaved({"unfused (today)": vid(False, pool_size), "fused": vid(True, pool_size)}, repeats)
        base = res["unfused (today)"]
        rows = [[name, f"{r['wall'] * 1e3:.1f}", f"{r['cpu'] * 1e3:.1f}", f"{base['wall'] / r['wall']:.2f}x",
                 f"{base['cpu'] / r['cpu']:.2f}x"] for name, r in res.items()]
        out[f"vid_{pool_size}"] = res
        sections.append(f"COBRA VID InfoNCE, P = {T:,} queries, {label}:\n\n" + md_table(
            ["variant", "wall ms", "CPU ms", "speed-up (wall)", "speed-up (CPU)"], rows))
    return "\n\n".join(sections), out


# ----------------------------------------------------------------------------- 1b. training step


STEP_VARIANTS = {
    "unfused (before)": ["loss.fused=false"],
    "fused (new default)": ["loss.fused=true"],
    "fused, negatives_block=256": ["loss.fused=true", "loss.negatives_block=256"],
}


def step_bench(repeats: int, modes: Sequence[str] = ("id", "cobra"), steps: int = 6) -> Tuple[str, Dict[str, Any]]:
    """ML-100k training steps of the trainer's model (``bench_train.train_steps``: TorchRec tables
    under DMP, fused Adagrad, AdamW) per loss variant, each variant in its own fresh process, the
    processes interleaved (variant order rotated every repeat)."""
    from benchmarks import bench_train
    from benchmarks.common import call_worker, shared_data_root

    data_dir, data_format, _ = bench_train.DATASETS["ml-100k"]
    path = os.path.join(shared_data_root(), data_dir)
    cache = "/tmp/sidvid-bench-cache"
    sids_dir = os.path.join(cache, "sids-ml-100k-cobra")
    if "cobra" in modes and not os.path.isdir(sids_dir):
        call_worker("bench_train", "prepare_sids", dict(configs=[bench_train.config_path("ml-100k", "cobra")],
                                                        outs=[sids_dir], data_path=path, data_format=data_format,
                                                        cache_dir=cache, threads=1), threads=1, timeout=900)
    results: Dict[str, Dict[str, List[Dict[str, Any]]]] = {m: {v: [] for v in STEP_VARIANTS} for m in modes}
    names = list(STEP_VARIANTS)
    for rep in range(repeats):
        for mode in modes:
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                r = call_worker("bench_train", "train_steps", dict(
                    config=bench_train.config_path("ml-100k", mode), mode=mode, data_path=path,
                    data_format=data_format, cache_dir=cache, sids_dir=sids_dir if mode == "cobra" else "",
                    steps=steps, warmup=2, extra=STEP_VARIANTS[name]), threads=1, timeout=900)
                results[mode][name].append(r)
    rows = []
    for mode in modes:
        base_ms = statistics.median(r["ms_per_step"] for r in results[mode][names[0]])
        base_cpu = statistics.median(r["tokens_per_cpu_s"] for r in results[mode][names[0]])
        for name in names:
            rs = results[mode][name]
            ms = statistics.median(r["ms_per_step"] for r in rs)
            cpu_tps = statistics.median(r["tokens_per_cpu_s"] for r in rs)
            loss_ms = statistics.median(r["fwd_ms"]["loss"] + r["bwd_ms"]["loss"] for r in rs)
            enc_ms = statistics.median(r["fwd_ms"]["encoder"] + r["bwd_ms"]["encoder"] for r in rs)
            rows.append([mode, name, f"{ms:.0f}", f"{base_ms / ms:.2f}x", f"{cpu_tps:,.0f}", f"{cpu_tps / base_cpu:.2f}x",
                         f"{loss_ms:.0f}", f"{enc_ms:.0f}", f"{statistics.median(r['peak_delta_mb'] for r in rs):.0f}"])
    text = (f"ML-100k training step (batch 128, 10,281 tokens; {steps} measured steps after 2 warm-up per process, "
            f"{repeats} interleaved processes per variant; medians):\n\n" + md_table(
                ["mode", "loss variant", "ms/step", "speed-up (wall)", "tokens / CPU-s", "speed-up (CPU)",
                 "loss fwd+bwd ms", "encoder fwd+bwd ms", "peak RSS increase MB"], rows))
    return text, results


# ----------------------------------------------------------------------------- 3. evaluation and decoding


def decode_bench(repeats: int, users: int = 300, history: int = 200, num_items: int = 1682, dim: int = 50,
                 batch: int = 100, beam_variants: bool = True) -> Tuple[str, Dict[str, Any]]:
    """Seconds per 1,000 users of full-ranking evaluation (an ``id`` HSTU: query, scores against
    all items, history masked, ranks) and of every COBRA decoder (KV-cached, flat FAISS index,
    history filtered), ML-100k-sized: ``num_items`` items, ``history``-item histories, d = 50,
    2 blocks, 1 head (untrained: the cost does not depend on the weights). Interleaved repeats."""
    import numpy as np
    import torch

    from benchmarks.bench_decode import cobra_model, eval_batch, synthetic_codes, synthetic_histories
    from sidvid_rec.config import DecoderSettings
    from sidvid_rec.decode import DecodeContext, decode
    from sidvid_rec.eval.evaluate import list_ranks
    from sidvid_rec.eval.metrics import RankMetrics
    from sidvid_rec.eval.ranking import evaluate_ranking
    from sidvid_rec.losses import SampledSoftmaxLoss
    from sidvid_rec.models.hstu_rec import HSTURecommender
    from sidvid_rec.modules.embeddings import ItemEmbeddings
    from sidvid_rec.modules.hstu import HSTUEncoder
    from sidvid_rec.retrieval import VidIndex

    torch.set_num_threads(1)
    torch.manual_seed(0)
    items, times = synthetic_histories(users, history, num_items, 0)
    batches = [eval_batch(items[i:i + batch], times[i:i + batch]) for i in range(0, users, batch)]
    codes = synthetic_codes(num_items, 3, 16, 0)
    cobra = cobra_model(num_items, codes, history, dim, 2)
    sid_table, vid_table = cobra.decoding_tables()
    index = VidIndex.build(vid_table[1:], torch.arange(1, vid_table.shape[0]))
    encoder = HSTUEncoder(max_len=history + 1, dim=dim, num_blocks=2, num_heads=1, dqk=dim, dv=dim, dropout=0.0,
                          attn_dropout=0.0)
    id_model = HSTURecommender(ItemEmbeddings(num_items, dim, "id"), encoder, SampledSoftmaxLoss(num_items)).eval()
    ks = [1, 5, 10, 50, 200]

    def ranking() -> None:
        evaluate_ranking(id_model, batches, ks, True, torch.device("cpu"))

    def decoder(kind: str, **settings: Any) -> Callable[[], None]:
        ctx = DecodeContext(cobra, sid_table, index, DecoderSettings(**settings))

        @torch.no_grad()
        def run() -> None:
            metrics = RankMetrics(ks)
            for b in batches:
                top = decode(kind, ctx, b, max(ks))
                metrics.update(list_ranks(top.items, b.jagged("target_id").values()), b.weights)
        return run

    variants: Dict[str, Callable[[], None]] = {
        "full ranking (id HSTU, 1,683 scores per user)": ranking,
        "COBRA direct": decoder("direct"),
        "COBRA neighbor": decoder("neighbor"),
        "COBRA soft (k=5)": decoder("soft"),
        "COBRA beam (5 SIDs x 50 ANN, config default)": decoder("beam", beam_size=5),
    }
    if beam_variants:
        variants["COBRA beam (10 SIDs x 50 ANN)"] = decoder("beam", beam_size=10)
    res = interleaved(variants, repeats)
    per = 1000.0 / users
    base = res["COBRA direct"]
    rows = [[name, f"{r['wall'] * per:.2f}", f"{r['cpu'] * per:.2f}", f"{r['wall'] / base['wall']:.2f}x",
             f"{r['cpu'] / base['cpu']:.2f}x"] for name, r in res.items()]
    text = (f"Per 1,000 users ({users} synthetic users timed, batches of {batch}, {history}-item histories, "
            f"{num_items:,} items, d = {dim}, top-200 lists; median of {repeats} interleaved repeats):\n\n" + md_table(
                ["evaluation / decoder", "wall s / 1,000 users", "CPU s / 1,000 users", "vs direct (wall)",
                 "vs direct (CPU)"], rows))
    return text, {"per_1000": {n: {k: v * per for k, v in r.items()} for n, r in res.items()}}


# ----------------------------------------------------------------------------- main


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["loss", "step", "decode", "curves", "threads"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    text, data = {"loss": lambda: loss_bench(args.repeats), "step": lambda: step_bench(args.repeats),
                   "decode": lambda: decode_bench(args.repeats)}[args.what]()
    print(text)
    print(f"\n(wall time {time.perf_counter() - start:.0f} s; load average {os.getloadavg()})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
