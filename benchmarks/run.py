"""The benchmark suite: every speed figure of the package with its baseline, measured in one run.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python -m benchmarks.run                  # full suite (~12 min here)
    python -m benchmarks.run --quick                            # fewer points (< 5 min)
    python -m benchmarks.run --only retrieval sids --results /tmp/R.md --plots /tmp/plots
    python -m benchmarks.run --device cuda --only gpu           # sections 1, 2, 5 on CUDA

Sections (``--only`` names):

1. ``throughput`` -- training steps of the ``id``, ``sid_id`` and ``cobra`` models of the ML-100k
   and Amazon Beauty configs (sequences/s, real tokens/s, peak memory, per-phase times) and
   the trainer's whole loop on ML-100k against the reference's training tokens/s.
2. ``limit`` -- HSTU forward+backward FLOP/s over this machine's fp32 matmul rate.
3. ``scaling`` -- tokens/s and memory vs batch size and vs sequence length; jagged vs padded
   on the real length mixes (``benchmarks/jagged_vs_padded.py``).
4. ``sids`` -- semantic-ID build time and memory vs number of items, balanced vs plain.
5. ``retrieval`` -- FAISS flat / HNSW / IVF vs torch brute-force top-100.
6. ``gpu`` -- sections 1, 2 and 5 on CUDA (with ``--device cuda`` where a GPU is present;
   skipped otherwise).

Each measurement runs in a fresh worker process (its peak memory is its own). Each section
replaces its own ``<!-- bench:NAME -->`` block of the results file (default
``benchmarks/RESULTS.md``; the hand-written parts stay as they are) and writes PNG plots; the
summary table of the run is printed last.
"""

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from benchmarks import bench_train
from benchmarks.common import (REPO_ROOT, RunInfo, WorkerError, call_worker, figure, md_table, num, save_figure, section_markers,
                               shared_data_root, update_results)

SECTIONS = ("throughput", "limit", "scaling", "sids", "retrieval", "gpu")
CPU_SECTIONS = SECTIONS[:-1]
TITLES = {
    "throughput": "1. Training throughput",
    "limit": "2. Against the limit: HSTU FLOP/s vs fp32 matmul",
    "scaling": "3. Scaling: batch size, sequence length, jagged vs padded",
    "sids": "4. Semantic IDs: build time and memory vs items",
    "retrieval": "5. Retrieval: FAISS flat / HNSW / IVF vs torch brute force",
    "gpu": "6. GPU: sections 1, 2 and 5 on CUDA",
}
QUICK_LIMIT_S = 300.0


@dataclass
class Settings:
    """What a mode (quick or full) measures."""

    train_warmup: int
    train_steps: int
    trainer_epochs: int
    flops_steps: int
    matmul_n: int
    scaling_batches: List[int]
    scaling_lengths: List[int]
    scaling_tokens: int
    scaling_steps: int
    jvp_datasets: List[str]
    jvp_repeats: int
    jvp_steps: int
    sids_sizes: List[int]
    retrieval_sizes: List[int]
    retrieval_queries: int
    ef_search: List[int]
    nprobe: List[int]
    timeout_s: float


QUICK = Settings(train_warmup=1, train_steps=2, trainer_epochs=1, flops_steps=2, matmul_n=1024,
                 scaling_batches=[16, 64, 256], scaling_lengths=[50, 200, 1000], scaling_tokens=6400,
                 scaling_steps=2, jvp_datasets=["ml-100k"], jvp_repeats=1, jvp_steps=3,
                 sids_sizes=[10_000, 50_000], retrieval_sizes=[10_000, 100_000], retrieval_queries=500,
                 ef_search=[32, 64, 128, 256], nprobe=[4, 8, 16, 32, 64], timeout_s=300)
FULL = Settings(train_warmup=2, train_steps=8, trainer_epochs=3, flops_steps=5, matmul_n=2048,
                scaling_batches=[16, 32, 64, 128, 256, 512], scaling_lengths=[50, 100, 200, 500, 1000, 2000],
                scaling_tokens=12_800, scaling_steps=5, jvp_datasets=["ml-100k", "beauty"], jvp_repeats=3,
                jvp_steps=10, sids_sizes=[10_000, 100_000, 1_000_000],
                retrieval_sizes=[10_000, 100_000, 1_000_000], retrieval_queries=1000,
                ef_search=[32, 64, 128, 256, 512], nprobe=[4, 8, 16, 32, 64, 128, 256], timeout_s=3600)


@dataclass
class Row:
    """One line of the summary table."""

    section: str
    figure: str
    value: str
    baseline: str = "-"
    ratio: str = "-"
    target: str = "-"
    status: str = "-"


@dataclass
class Section:
    name: str
    body: str
    summary: List[Row] = field(default_factory=list)
    plots: List[str] = field(default_factory=list)


class Suite:
    """Paths, settings and the worker launcher shared by the sections of one run."""

    def __init__(self, args: argparse.Namespace, info: RunInfo) -> None:
        self.args = args
        self.info = info
        self.settings = QUICK if args.quick else FULL
        self.threads = args.threads
        self.results = os.path.abspath(args.results)
        self.plots = os.path.abspath(args.plots)
        self.data_root = os.path.abspath(args.data_root)
        self.cache_dir = os.path.abspath(os.path.expanduser(args.cache_dir))
        self.workdir = tempfile.mkdtemp(prefix="sidvid-bench-")

    def worker(self, module: str, func: str, **kwargs: Any) -> Any:
        return call_worker(module, func, kwargs, self.threads, self.settings.timeout_s)

    def plot_path(self, name: str) -> str:
        return os.path.join(self.plots, name)

    def link(self, path: str) -> str:
        """Markdown image of ``path``, relative to the results file."""
        rel = os.path.relpath(path, os.path.dirname(self.results))
        return f"![{os.path.basename(path)}]({rel})"

    def log(self, text: str) -> None:
        print(text, flush=True)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def _status(ok: Optional[bool]) -> str:
    return "-" if ok is None else ("met" if ok else "NOT met")


# ----------------------------------------------------------------------------- 1. throughput


def _dataset_dir(suite: Suite, dataset: str) -> str:
    return os.path.join(suite.data_root, bench_train.DATASETS[dataset][0])


def throughput_section(suite: Suite, device: str = "cpu") -> Section:
    s = suite.settings
    rows, breakdown, notes, plot_configs = [], [], [], []
    summary: List[Row] = []
    for dataset, (_, data_format, _) in bench_train.DATASETS.items():
        path = _dataset_dir(suite, dataset)
        if not os.path.isdir(path):
            notes.append(f"- {dataset}: skipped, data not found at `{path}`.")
            continue
        sids_dirs = {}
        try:
            configs = [bench_train.config_path(dataset, m) for m in ("sid_id", "cobra")]
            outs = [os.path.join(suite.workdir, f"sids-{dataset}-{m}") for m in ("sid_id", "cobra")]
            built = suite.worker("bench_train", "prepare_sids", configs=configs, outs=outs, data_path=path,
                                 data_format=data_format, cache_dir=suite.cache_dir, threads=max(suite.threads, 1))
            sids_dirs = dict(zip(("sid_id", "cobra"), outs))
            for mode, b in zip(("sid_id", "cobra"), built):
                notes.append(f"- {dataset} `{mode}` SIDs: `tfidf` text embeddings ({b['dim']}-d) of the "
                             f"{b['items']:,} items, balanced RQ-KMeans L={b['layers']}, K={b['codebook_size']} "
                             f"(the config's `sids` section) -> {b['distinct_sids']:,} distinct code tuples; "
                             f"built in {b['build_s']:.1f} s (embedding {b['embed_s']:.1f} s, cached after a first run).")
        except WorkerError as e:
            notes.append(f"- {dataset}: semantic IDs could not be built ({e}); sid_id and cobra skipped.")
        for mode in bench_train.MODES:
            if mode != "id" and mode not in sids_dirs:
                continue
            suite.log(f"  throughput: {dataset} {mode} ...")
            try:
                r = suite.worker("bench_train", "train_steps", config=bench_train.config_path(dataset, mode), mode=mode,
                                 data_path=path, data_format=data_format, cache_dir=suite.cache_dir,
                                 sids_dir=sids_dirs.get(mode, ""), steps=s.train_steps, warmup=s.train_warmup,
                                 device=device)
            except WorkerError as e:
                notes.append(f"- {dataset} {mode}: failed ({e}).")
                continue
            mem = (f"{num(r['gpu_peak_mb'])} (GPU)" if r.get("gpu_peak_mb") is not None
                   else f"{num(r['peak_delta_mb'])} / {num(r['peak_rss_mb'])}")
            rows.append([dataset, mode, num(r["tokens_per_step"]), num(r["encoder_tokens_per_step"]),
                         num(r["sequences_per_s"], 1), f"**{num(r['tokens_per_s'])}**", num(r["tokens_per_cpu_s"]),
                         num(r["ms_per_step"]), mem])
            f, b = r["fwd_ms"], r["bwd_ms"]
            parts = {"data": f["data"], "embedding": f["embedding"] + b["embedding"],
                     "encoder": f["encoder"] + b["encoder"], "loss": f["loss"] + b["loss"], "other": f["other"],
                     "optimizer": f["optimizer"]}
            breakdown.append([dataset, mode, num(f["data"], 1),
                              f"{num(f['embedding'], 1)} + {num(b['embedding'], 1)}",
                              f"{num(f['encoder'])} + {num(b['encoder'])}", f"{num(f['loss'])} + {num(b['loss'])}",
                              num(f["other"], 1), num(f["optimizer"], 1), num(r["mean_step_ms"])])
            plot_configs.append((f"{dataset}\n{mode}", parts))
            if dataset == "ml-100k" and mode == "id":
                summary.append(Row("throughput", "ML-100k id training step, tokens/s (median)", num(r["tokens_per_s"])))
    body = []
    if rows:
        body.append(
            f"Training steps of the model the trainer builds (`build_model`: TorchRec tables under "
            f"DistributedModelParallel with the fused row-wise Adagrad in backward; `build_optimizers`: "
            f"AdamW for the dense part), batches from the trainer's `BatchIterator` (batch 128, the "
            f"configs' settings: ML-100k d=50, max_len 200, 128 negatives per position for id/sid_id; "
            f"Beauty d=64, max_len 20). {s.train_warmup} warm-up + {s.train_steps} measured steps per "
            f"configuration, each configuration in a fresh process. tokens = real (unpadded) history "
            f"items; COBRA's encoder sees two tokens per item (SID + VID), shown as encoder tokens. "
            f"tokens/s and sequences/s: medians of the per-step wall-clock rates; tokens / CPU-s: "
            f"tokens over the process's CPU time (less sensitive to the other jobs on the machine). Memory: peak RSS increase over "
            f"the RSS before the first step / the process's peak RSS during the steps (MB).")
        body.append(md_table(["data", "mode", "tokens/step", "encoder tokens/step", "sequences/s", "tokens/s",
                              "tokens / CPU-s", "ms/step (median)", "peak memory increase / peak (MB)"], rows))
        body.append(
            "Step-time breakdown (ms per step, mean over the measured steps, forward + backward). The "
            "model's own modules are wrapped with timers; the backward is split where the gradient "
            "crosses the encoder (tensor hooks): *embedding* = table lookups (inputs and loss "
            "candidates) + the input-side table backward with the fused table update; *encoder* = "
            "HSTU (attention + linear layers); *loss* = sampled softmax / InfoNCE with their "
            "candidate-side backward; *other* = forward glue (COBRA interleaving and layout); "
            "*optimizer* = zero_grad + AdamW step; *data* = batch building (collate + KJT).")
        body.append(md_table(["data", "mode", "data", "embedding", "encoder", "loss", "other", "optimizer",
                              "step (mean)"], breakdown))
    plots = []
    if plot_configs:
        fig, (ax,) = figure(width=max(6.0, 1.3 * len(plot_configs)))
        bottom = [0.0] * len(plot_configs)
        for phase in bench_train.PHASES:
            values = [p[phase] for _, p in plot_configs]
            ax.bar([c for c, _ in plot_configs], values, bottom=bottom, label=phase)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_ylabel("ms per training step")
        ax.set_title(f"Training step breakdown ({device}, {suite.threads} thread(s))")
        ax.legend(fontsize=8)
        plots.append(save_figure(fig, suite.plot_path(f"throughput_breakdown{'_cuda' if device != 'cpu' else ''}.png")))
        body.append(suite.link(plots[-1]))
    body.append(_trainer_loop(suite, device, summary))
    if notes:
        body.append("\n".join(notes))
    return Section("throughput", "\n\n".join(body), summary, plots)


def _trainer_loop(suite: Suite, device: str, summary: List[Row]) -> str:
    """The trainer's whole training loop on ML-100k vs the reference's training tokens/s."""
    path = _dataset_dir(suite, "ml-100k")
    if not os.path.isdir(path):
        return f"Trainer loop vs reference: skipped, ML-100k not found at `{path}`."
    epochs = suite.settings.trainer_epochs
    suite.log("  throughput: trainer loop on ml-100k ...")
    try:
        r = suite.worker("bench_train", "trainer_loop", config="configs/ml-100k/hstu.yaml", data_path=path,
                         data_format="ml-100k", cache_dir=suite.cache_dir,
                         run_dir=os.path.join(suite.workdir, "train-ml-100k"), epochs=epochs, device=device)
    except WorkerError as e:
        return f"Trainer loop vs reference: failed ({e})."
    times = r["epoch_s"]
    steady = times[1:] if len(times) > 1 else times  # the first epoch pays the warm-up
    epoch_s = sorted(steady)[len(steady) // 2]
    tps = r["tokens_per_epoch"] / epoch_s
    cpu_s = r["epoch_cpu_s"][times.index(epoch_s)]
    ref = bench_train.REFERENCE_TOKENS_PER_S
    ref_epoch = bench_train.REFERENCE_TOKENS_PER_EPOCH / ref
    ok = tps >= 2 * ref
    summary.append(Row("throughput", "trainer loop, ML-100k id (gr), training tokens/s", f"**{num(tps)}**",
                       f"reference HSTU {num(ref)}", _ratio(tps, ref), ">= 2x reference", _status(ok)))
    epochs_text = ", ".join(f"{t:.2f}" for t in times)
    return (
        f"**Trainer loop vs the reference.** `sidvid_rec.train.trainer.run_training` on "
        f"`configs/ml-100k/hstu.yaml` (id, protocol gr: the reference's model, data and settings) for "
        f"{epochs} epoch(s); each epoch's `_train_epoch` (data, forward, backward, both optimizers, "
        f"loss logging) is timed, evaluation and checkpoint writes are not, as in the reference's "
        f"figure. Training tokens per epoch: {r['tokens_per_epoch']:,} real history tokens of "
        f"{r['sequences_per_epoch']} sequences (the reference counts {bench_train.REFERENCE_TOKENS_PER_EPOCH:,}). "
        f"Epoch times: {epochs_text} s; the figure uses the median epoch "
        f"{'after the first (warm-up)' if len(times) > 1 else '(a single epoch, warm-up included)'}: "
        f"{epoch_s:.2f} s.\n\n"
        + md_table(["implementation", "threads", "s / epoch", "CPU s / epoch", "training tokens/s", "vs reference"], [
            ["generative-recommenders research HSTU (../shared/REFERENCE.md, measured alone)", "2",
             f"{ref_epoch:.1f}", f"~{0.85 * ref_epoch:.1f} (0.85 cores busy)", num(ref), "1.00x"],
            [f"sidvid_rec trainer (this run, {device})", str(suite.threads), f"{epoch_s:.2f}", f"{cpu_s:.2f}",
             f"**{num(tps)}**", f"**{tps / ref:.2f}x**"],
        ])
        + f"\n\nTarget >= 2x the reference: **{_status(ok)}**. The reference figure was measured on this "
          f"machine but not in this run (its code is not installed here): it ran alone with 2 threads, "
          f"this run shares the machine (see the load average), so the ratio is conservative when the "
          f"load is high. Peak RSS of the training process: {num(r['peak_rss_mb'])} MB (reference 3.2 GB)."
    )


# ----------------------------------------------------------------------------- 2. limit


def limit_section(suite: Suite, device: str = "cpu") -> Section:
    s = suite.settings
    ml = os.path.join(_dataset_dir(suite, "ml-100k"), "u.data")
    suite.log("  limit: HSTU FLOP/s and matmul rate ...")
    try:
        r = suite.worker("bench_train", "hstu_flops", ml100k_file=ml, steps=s.flops_steps, matmul_n=s.matmul_n,
                         matmul_repeats=5, device=device)
    except WorkerError as e:
        return Section("limit", f"Failed: {e}.")
    peak = max(r["matmul_before"]["best_flops"], r["matmul_after"]["best_flops"])
    rows, summary = [], []
    for name, w in r["workloads"].items():
        frac = w["achieved_flops"] / peak
        rows.append([name, num(w["tokens"]), f"{w['flops_per_step'] / 1e9:.2f}", f"{100 * w['attention_share']:.0f}%",
                     f"{w['executed_square_over_real']:.2f}", num(w["ms"]), f"{w['achieved_flops'] / 1e9:.1f}",
                     f"{peak / 1e9:.1f}", f"**{100 * frac:.0f}%**"])
        summary.append(Row("limit", f"HSTU fwd+bwd FLOP/s, {name}", f"{w['achieved_flops'] / 1e9:.1f} GFLOP/s",
                           f"matmul {peak / 1e9:.1f} GFLOP/s", f"{100 * frac:.0f}%"))
    d = r["dims"]
    n = r["matmul_before"]["n"]
    body = (
        f"HSTU encoder of the ML-100k config (d={d['dim']}, {d['num_blocks']} blocks, {d['num_heads']} head, "
        f"dqk=dv={d['dqk']}, dropout 0.2) forward + backward (`out.backward(grad)` with a random "
        f"gradient; no embedding lookup, loss or optimizer), {s.flops_steps} measured calls after one "
        f"warm-up, on real ML-100k batches (128 random users, histories capped at 200) and on a "
        f"synthetic batch of 8 sequences of 1000 items (attention-dominated).\n\n"
        f"FLOP count per call (T = sum L, S = sum L^2, a multiply-add = 2 FLOPs, per layer, "
        f"forward): `uvqk` 2·T·d·H·(2dv+2dqk) + output projection 2·T·H·dv·d + attention "
        f"2·S·H·dqk (q k^T) + 2·S·H·dv (A v), attention over the full L x L square of each sequence "
        f"(the reference computation, held fixed: the block-causal kernel computes only part of it, "
        f"'executed / real area', which shows as a higher rate). Backward = 2 x forward for "
        f"every matmul, so a training call = 3 x forward x layers. Norms, SiLU, bias gathers and "
        f"dropout are not counted (they are memory-bound, O(T·d) and O(S)). 'executed / real area': "
        f"the attention area the length-chunked kernel computes (chunks padded to their longest "
        f"member; with block-causal attention only the query blocks' keys up to the block's end) over S.\n\n"
        f"Limit: the best of 5 `torch.matmul` of [{n}, {n}] fp32 matrices (2·n^3 FLOPs) in the same "
        f"process, before ({r['matmul_before']['best_flops'] / 1e9:.1f} GFLOP/s) and after "
        f"({r['matmul_after']['best_flops'] / 1e9:.1f} GFLOP/s) the HSTU runs; the larger is the limit.\n\n"
        + md_table(["workload", "tokens", "GFLOP / call", "attention share", "executed / real area", "ms / call",
                    "achieved GFLOP/s", "matmul GFLOP/s", "of the limit"], rows)
        + _limit_variants(r, peak)
        + "\n\nThe matmul rate is what one core reaches on large square products; HSTU's matmuls are "
          "thin (d=50: [T, 50] x [50, 200], and [n, 50] x [50, n] per sequence block), so they run far "
          "below it, and the elementwise work between them (SiLU, bias gather, LayerNorm, dropout) "
          "costs time without counted FLOPs."
    )
    return Section("limit", body, summary)


def _limit_variants(r: Dict[str, Any], peak: float) -> str:
    """The encoder kernels timed side by side on the same batches (``bench_train.ENCODER_VARIANTS``)."""
    bf16 = r["matmul_bf16"]["best_flops"]
    rows = []
    for workload, per in r["variants"].items():
        base = next(iter(per.values()))["achieved_flops"]
        rows += [[workload, name, num(w["ms"]), f"{w['achieved_flops'] / 1e9:.1f}", f"{w['achieved_flops'] / base:.2f}x",
                  f"{w['executed_square_over_real']:.2f}", f"**{100 * w['achieved_flops'] / peak:.0f}%**",
                  f"{100 * w['achieved_flops'] / bf16:.0f}%"] for name, w in per.items()]
    return (f"\n\nEach encoder kernel on the same batches, interleaved batch by batch (`train.precision`, "
            f"`train.attention_block`; the table above is `{r['default_variant']}`). bf16 matmul "
            f"[{r['matmul_bf16']['n']}]^2: {bf16 / 1e9:.1f} GFLOP/s.\n\n"
            + md_table(["workload", "kernel", "ms / call", "achieved GFLOP/s", "vs whole square", "executed / real area",
                        "of the fp32 limit", "of the bf16 matmul"], rows))


# ----------------------------------------------------------------------------- 3. scaling


def scaling_section(suite: Suite) -> Section:
    s = suite.settings
    batch_rows, length_rows, notes = [], [], []
    for b in s.scaling_batches:
        suite.log(f"  scaling: batch {b} x 200 ...")
        try:
            batch_rows.append(suite.worker("bench_scaling", "scaling_step", batch_size=b, length=200,
                                           steps=s.scaling_steps, warmup=1))
        except WorkerError as e:
            notes.append(f"- batch {b}: failed ({e}).")
    for length in s.scaling_lengths:
        b = max(1, s.scaling_tokens // length)
        suite.log(f"  scaling: {b} x length {length} ...")
        try:
            length_rows.append(suite.worker("bench_scaling", "scaling_step", batch_size=b, length=length,
                                            steps=s.scaling_steps, warmup=1))
        except WorkerError as e:
            notes.append(f"- length {length}: failed ({e}).")

    def table(rows: List[Dict[str, Any]]) -> str:
        return md_table(["batch", "length", "tokens/step", "ms/step", "tokens/s", "peak RSS increase (MB)"],
                        [[r["batch_size"], r["length"], num(r["tokens"]), num(r["ms_per_step"]),
                          num(r["tokens_per_s"]), num(r["peak_delta_mb"])] for r in rows])

    plots = []
    if batch_rows or length_rows:
        fig, axes = figure(ncols=2)
        for ax, rows, key, label in ((axes[0], batch_rows, "batch_size", "batch size (length 200)"),
                                     (axes[1], length_rows, "length", f"sequence length (~{num(s.scaling_tokens)} tokens/batch)")):
            if not rows:
                continue
            x = [r[key] for r in rows]
            ax.plot(x, [r["tokens_per_s"] for r in rows], "o-", color="C0")
            ax.set_xscale("log")
            ax.set_xticks(x, [str(v) for v in x])
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            ax.set_xlabel(label)
            ax.set_ylabel("tokens/s", color="C0")
            twin = ax.twinx()
            twin.plot(x, [r["peak_delta_mb"] for r in rows], "s--", color="C1")
            twin.set_ylim(bottom=0)
            twin.set_ylabel("peak RSS increase (MB)", color="C1")
        fig.suptitle("HSTU training step scaling")
        plots.append(save_figure(fig, suite.plot_path("scaling.png")))
    jvp_text, jvp_summary = _jagged_vs_padded(suite)
    body = [
        "One training step of the jagged HSTU (the step of `benchmarks/jagged_vs_padded.py`: item "
        "lookup, encoder d=50 / 2 blocks / 1 head, sampled softmax with 128 shared negatives, backward, "
        "AdamW) on synthetic batches whose sequences all have exactly `length` items, each point in a "
        f"fresh process, median of {s.scaling_steps} steps after one warm-up. Memory: peak RSS increase "
        "over the RSS before the first step.",
        "**vs batch size** (length 200): tokens/s should stay flat (the cost is linear in tokens).",
        table(batch_rows) if batch_rows else "(no points)",
        f"**vs sequence length** (batch = {num(s.scaling_tokens)} // length sequences, so every step holds "
        f"about the same number of tokens): the attention area per token grows with the length, so "
        f"tokens/s falls and memory (the kept scores) grows.",
        table(length_rows) if length_rows else "(no points)",
    ]
    body += [suite.link(p) for p in plots]
    body.append(jvp_text)
    if notes:
        body.append("\n".join(notes))
    summary = jvp_summary
    if length_rows:
        first, last = length_rows[0], length_rows[-1]
        summary.append(Row("scaling", f"tokens/s at length {last['length']} vs {first['length']} (same tokens/step)",
                           num(last["tokens_per_s"]), num(first["tokens_per_s"]),
                           _ratio(last["tokens_per_s"], first["tokens_per_s"])))
    return Section("scaling", "\n\n".join(body), summary, plots)


def _jagged_vs_padded(suite: Suite) -> Tuple[str, List[Row]]:
    from benchmarks import jagged_vs_padded as jvp

    s = suite.settings
    rows, summary, notes = [], [], []
    for dataset in s.jvp_datasets:
        if not os.path.exists(jvp.DATA[dataset][0]):
            notes.append(f"- {dataset}: skipped, `{jvp.DATA[dataset][0]}` not found.")
            continue
        results: Dict[str, List[Dict[str, float]]] = {"jagged": [], "padded": []}
        suite.log(f"  scaling: jagged vs padded on {dataset} ...")
        try:
            for rep in range(s.jvp_repeats):
                for path in (("padded", "jagged") if rep % 2 == 0 else ("jagged", "padded")):
                    results[path].append(jvp.run_worker(dataset, path, s.jvp_steps, rep, max(suite.threads, 1)))
        except Exception as e:  # noqa: BLE001 - a failed worker is reported in the section
            notes.append(f"- {dataset}: failed ({str(e).splitlines()[0][:200]}).")
            continue
        med = {p: {k: sorted(r[k] for r in rs)[len(rs) // 2] for k in rs[0]} for p, rs in results.items()}
        j, p = med["jagged"], med["padded"]
        speed, memory = j["tokens_per_s"] / p["tokens_per_s"], j["peak_delta_mb"] / max(p["peak_delta_mb"], 1e-9)
        for name, m, sp, me in (("padded", p, 1.0, 1.0), ("jagged", j, speed, memory)):
            rows.append([dataset, name, num(m["tokens_per_batch"]), num(m["tokens_per_s"]), num(m["ms_per_step"]),
                         num(m["peak_delta_mb"]), f"{sp:.2f}", f"{me:.2f}"])
        if dataset == "ml-100k":
            ok = speed >= 1.5 and memory <= 0.6
            summary.append(Row("scaling", "jagged vs padded, ML-100k: tokens/s / peak memory",
                               f"{num(j['tokens_per_s'])} / {num(j['peak_delta_mb'])} MB",
                               f"padded {num(p['tokens_per_s'])} / {num(p['peak_delta_mb'])} MB",
                               f"{speed:.2f}x / {memory:.2f}x", ">= 1.5x / <= 0.6x", _status(ok)))
    text = (
        "**Jagged vs padded on the real length mixes** (`benchmarks/jagged_vs_padded.py`'s workers: "
        "batches of 128 random users, ML-100k capped at 200 items, Beauty at 20; the padded path runs "
        "`PaddedHSTUEncoder` on `[B, max length in batch, D]`; fresh process per run, alternating, "
        f"{s.jvp_repeats} repeat(s) x {s.jvp_steps} steps, medians; memory = peak RSS increase). Target on "
        "ML-100k: jagged >= 1.5x padded tokens/s at <= 0.6x its peak memory.\n\n"
        + (md_table(["data", "path", "tokens/batch", "tokens/s", "ms/step", "peak RSS increase (MB)",
                     "speed vs padded", "memory vs padded"], rows) if rows else "(no runs)")
    )
    if notes:
        text += "\n\n" + "\n".join(notes)
    return text, summary


# ----------------------------------------------------------------------------- 4. semantic IDs


def sids_section(suite: Suite) -> Section:
    s = suite.settings
    results, notes = [], []
    for n in s.sids_sizes:
        for balance in ("none", "balanced"):
            suite.log(f"  sids: {n:,} x 384, {balance} ...")
            try:
                results.append(suite.worker("bench_sids", "sids_build", n=n, dim=384, balance=balance,
                                            codebook_size=256, layers=3, threads=max(suite.threads, 1)))
            except WorkerError as e:
                notes.append(f"- {n:,} {balance}: failed ({e}).")
    rows = [[num(r["n"]), r["balance"], f"{r['build_s']:.1f}", f"{r['cpu_s']:.1f}", num(r["input_mb"]),
             num(r["peak_delta_mb"]), num(r["peak_rss_mb"]), "/".join(str(x) for x in r["rounds"]),
             " ; ".join(f"{a}-{b}" for a, b in r["sizes_min_max"])]
            for r in results]
    plots = []
    if results:
        fig, axes = figure(ncols=2)
        for balance, style in (("none", "o--"), ("balanced", "s-")):
            rs = [r for r in results if r["balance"] == balance]
            axes[0].plot([r["n"] for r in rs], [r["build_s"] for r in rs], style, label=balance)
            axes[1].plot([r["n"] for r in rs], [r["peak_rss_mb"] / 1024 for r in rs], style, label=balance)
        for ax, label in ((axes[0], "build time (s)"), (axes[1], "peak RSS (GiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("items (x 384)")
            ax.set_ylabel(label)
            ax.legend()
        fig.suptitle("Semantic IDs: residual k-means L=3, K=256")
        plots.append(save_figure(fig, suite.plot_path("sids_scale.png")))
    summary = []
    balanced = [r for r in results if r["balance"] == "balanced"]
    if balanced:
        big = max(balanced, key=lambda r: r["n"])
        plain = next((r for r in results if r["balance"] == "none" and r["n"] == big["n"]), None)
        at_1m = big["n"] >= 1_000_000
        ok = (big["build_s"] < 600 and big["peak_rss_mb"] < 8192) if at_1m else None
        summary.append(Row("sids", f"balanced build, {num(big['n'])} x 384 (L=3, K=256): time / peak RSS",
                           f"{big['build_s']:.1f} s / {big['peak_rss_mb'] / 1024:.2f} GiB",
                           f"plain {plain['build_s']:.1f} s" if plain else "-",
                           _ratio(big["build_s"], plain["build_s"]) if plain else "-",
                           "1M: < 600 s, < 8 GiB", _status(ok) if at_1m else "1M not run (see Scale section)"))
    body = [
        "`build_semantic_ids` (residual k-means, L=3, K=256, tol 0.1, dedup code) on "
        "`benchmarks/sids_scale.py`'s synthetic `[n, 384]` unit vectors (Zipf-weighted 1000-component "
        "Gaussian mixture), `balance: none` (plain FAISS k-means per layer) vs `balanced`, FAISS on "
        f"{max(suite.threads, 1)} thread(s), each build in a fresh process. Memory: peak RSS during the build "
        "(input included) and its increase over the RSS with the input loaded. Time grows less than "
        "linearly with n: the k-means (and the sampled balancing rounds) train on at most 256·K points "
        "per layer, only the assignments and the final balancing rounds touch every item.",
        md_table(["items", "balance", "build s", "CPU s", "input MB", "peak increase MB", "peak RSS MB",
                  "balancing rounds", "cluster sizes per layer (min-max)"], rows)
        if rows else "(no builds)",
    ]
    if not any(r["n"] >= 1_000_000 for r in balanced):
        body.append("1,000,000 x 384 is not part of this run; the 'Scale' section of the Semantic IDs "
                    "part above measured the balanced build at 149.3 s (249.6 s under heavier load) and "
                    "3.65 GiB peak RSS (target: < 10 min, < 8 GiB).")
    body += [suite.link(p) for p in plots]
    if notes:
        body.append("\n".join(notes))
    return Section("sids", "\n\n".join(body), summary, plots)


# ----------------------------------------------------------------------------- 5. retrieval


def retrieval_section(suite: Suite, device: str = "cpu") -> Section:
    s = suite.settings
    results, notes = [], []
    for n in s.retrieval_sizes:
        suite.log(f"  retrieval: {n:,} x 64 ...")
        try:
            results.append(suite.worker("bench_retrieval", "retrieval", n=n, dim=64, num_queries=s.retrieval_queries,
                                        k=100, hnsw_m=32, ef_search=s.ef_search, ivf_nlist=0, nprobe=s.nprobe,
                                        target_recall=0.95, threads=max(suite.threads, 1), device=device))
        except WorkerError as e:
            notes.append(f"- {n:,}: failed ({e}).")
    rows = []
    for r in results:
        best = r["best"]
        for row in r["rows"]:
            mark = "**" if best and row["index"] == best["index"] and row["setting"] == best["setting"] else ""
            rows.append([num(r["n"]), row["index"], row["setting"], f"{row['build_s']:.2f}", num(row["qps"]),
                         f"{row['recall']:.4f}", f"{mark}{row['speedup_vs_exact']:.1f}x{mark}"])
    plots = []
    if results:
        fig, axes = figure(ncols=len(results), width=4.5)
        for ax, r in zip(axes, results):
            for prefix, style in (("faiss HNSW", "o-"), ("faiss IVF", "s-")):
                rs = [x for x in r["rows"] if x["index"].startswith(prefix)]
                if rs:
                    ax.plot([x["recall"] for x in rs], [x["qps"] for x in rs], style, label=rs[0]["index"])
            for x, marker in ((r["rows"][0], "*"), (r["rows"][1], "D")):
                ax.plot([x["recall"]], [x["qps"]], marker, markersize=10, label=x["index"])
            ax.axvline(0.95, color="grey", lw=0.8, ls=":")
            ax.set_yscale("log")
            ax.set_xlabel("recall@100")
            ax.set_ylabel("queries/s")
            ax.set_title(f"{num(r['n'])} items x {r['dim']}")
            ax.legend(fontsize=7)
        plots.append(save_figure(fig, suite.plot_path(f"retrieval{'_cuda' if device != 'cpu' else ''}.png")))
    summary = []
    if results:
        big = max(results, key=lambda r: r["n"])
        best = big["best"]
        at_1m = big["n"] >= 1_000_000
        if best:
            ok = best["speedup_vs_exact"] >= 10 and best["recall"] >= 0.95
            summary.append(Row("retrieval", f"fastest index with recall@100 >= 0.95 at {num(big['n'])} items",
                               f"{best['index']} {best['setting']}: {num(best['qps'])} q/s, recall {best['recall']:.3f}",
                               f"torch exact {num(big['rows'][0]['qps'])} q/s", f"{best['speedup_vs_exact']:.1f}x",
                               "1M: >= 10x at recall >= 0.95", _status(ok) if at_1m else "1M not run"))
        else:
            summary.append(Row("retrieval", f"index with recall@100 >= 0.95 at {num(big['n'])} items", "none reached it",
                               target="1M: >= 10x at recall >= 0.95", status="NOT met" if at_1m else "1M not run"))
    q = s.retrieval_queries
    body = [
        f"Top-100 by inner product over synthetic unit vectors (dim 64, the order of the models' "
        f"d=50/64; `benchmarks/sids_scale.py`'s Zipf-weighted 1000-component Gaussian mixture, so "
        f"the vectors are clustered like learned item vectors; uniform random vectors are the worst "
        f"case of every approximate index), {q} queries from the same mixture answered as one batch, "
        f"{max(suite.threads, 1)} thread(s), device {device}. Indexes: the package's `VidIndex` "
        f"(`flat` = IndexFlatIP, `hnsw` = IndexHNSWFlat M=32, efConstruction 40, `ivf` = IndexIVFFlat "
        f"with the package's default nlist = 4·sqrt(n), trained on the vectors). Baseline: "
        f"`torch.topk(queries @ vectors.T, 100)` over query blocks; recall@100 = share of the exact "
        f"top-100 returned. The approximate indexes are swept over efSearch / nprobe (a sweep stops at "
        f"recall >= 0.999); **bold**: the fastest setting with recall >= 0.95 at each size.",
        md_table(["items", "index", "setting", "build s", "queries/s", "recall@100", "speed vs exact"], rows)
        if rows else "(no runs)",
    ]
    body += [suite.link(p) for p in plots]
    if notes:
        body.append("\n".join(notes))
    return Section("retrieval", "\n\n".join(body), summary, plots)


# ----------------------------------------------------------------------------- 6. GPU


def gpu_available() -> Tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False on this machine"
    return True, torch.cuda.get_device_name(0)


def gpu_section(suite: Suite) -> Optional[Section]:
    """Sections 1, 2 and 5 on CUDA; ``None`` (nothing written) when skipped."""
    ok, what = gpu_available()
    if suite.args.device != "cuda" or not ok:
        reason = what if not ok else "run with --device cuda to measure it"
        suite.log(f"  gpu: skipped on CPU ({reason})")
        return None
    parts = [throughput_section(suite, "cuda"), limit_section(suite, "cuda"), retrieval_section(suite, "cuda")]
    body = [f"Device: {what}. Same workloads as sections 1, 2 and 5, on CUDA (faiss-gpu for flat and IVF "
            f"where installed; HNSW has no GPU version and stays on the CPU)."]
    summary = []
    for part in parts:
        body.append(f"### {TITLES[part.name]} (CUDA)\n\n{part.body}")
        summary += [Row("gpu", r.figure, r.value, r.baseline, r.ratio, r.target, r.status) for r in part.summary]
    return Section("gpu", "\n\n".join(body), summary, sum((p.plots for p in parts), []))


# ----------------------------------------------------------------------------- driver


RUNNERS: Dict[str, Callable[[Suite], Optional[Section]]] = {
    "throughput": throughput_section,
    "limit": limit_section,
    "scaling": scaling_section,
    "sids": sids_section,
    "retrieval": retrieval_section,
    "gpu": gpu_section,
}


def summary_table(rows: Sequence[Row]) -> str:
    return md_table(["section", "figure", "value", "baseline", "ratio", "target", "status"],
                    [[r.section, r.figure, r.value, r.baseline, r.ratio, r.target, r.status] for r in rows])


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer points and steps (< 5 minutes)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION",
                        help=f"run only these sections ({', '.join(SECTIONS)})")
    parser.add_argument("--results", default=os.path.join(REPO_ROOT, "benchmarks", "RESULTS.md"),
                        help="Markdown file whose bench:* sections are replaced (default: benchmarks/RESULTS.md)")
    parser.add_argument("--plots", default=os.path.join(REPO_ROOT, "benchmarks", "plots"),
                        help="directory of the PNG plots (default: benchmarks/plots)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op / OpenMP threads of every worker (default 1: the machine is shared)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: also run the gpu section (sections 1, 2, 5 on CUDA) when a GPU is present")
    parser.add_argument("--data-root", default=shared_data_root(),
                        help="directory holding movielens/ml-100k and amazon/beauty (default: ../shared/data)")
    parser.add_argument("--cache-dir", default="~/.cache/sidvid_rec",
                        help="data and text-embedding cache of the workers (default: the package's)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temporary directory of the run")
    return parser.parse_args(argv)


def _has_section(path: str, name: str) -> bool:
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return section_markers(name)[0] in f.read()


def command_line(argv: Sequence[str]) -> str:
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
    return " ".join(filter(None, [env, "python -m benchmarks.run", " ".join(shlex.quote(a) for a in argv)]))


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads < 0:
        print("error: --threads must be >= 0", file=sys.stderr)
        return 2
    names = args.only or list(SECTIONS)
    info = RunInfo(command=command_line(argv), threads=args.threads, device=args.device, quick=args.quick)
    suite = Suite(args, info)
    os.environ["PYTHONPATH"] = REPO_ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    os.chdir(REPO_ROOT)  # workers and configs/ paths are relative to the repository root
    started = time.perf_counter()
    sections: List[Section] = []
    if not args.only and not _has_section(suite.results, "summary"):  # keep the summary above the sections
        update_results(suite.results, {"summary": "## Suite: summary\n\n(written when the suite ends)"})
    try:
        for name in names:
            suite.log(f"[{name}] {TITLES[name]}")
            load_before, t0 = os.getloadavg(), time.perf_counter()
            section = RUNNERS[name](suite)
            if section is None:
                continue
            seconds = time.perf_counter() - t0
            header = info.header(load_before, os.getloadavg(), seconds)
            section.body = f"## Suite: {TITLES[name]}\n\n{header}\n\n{section.body}"
            update_results(suite.results, {name: section.body})  # each section lands as soon as it is done
            sections.append(section)
            suite.log(f"[{name}] done in {seconds:.0f} s")
    finally:
        if not args.keep_workdir:
            shutil.rmtree(suite.workdir, ignore_errors=True)
    total = time.perf_counter() - started
    rows = [r for s in sections for r in s.summary]
    if args.quick:
        rows.append(Row("suite", "--quick wall time", f"{total:.0f} s", target="< 300 s",
                        status=_status(total < QUICK_LIMIT_S)))
    else:
        rows.append(Row("suite", "wall time", f"{total / 60:.1f} min"))
    table = summary_table(rows)
    if not args.only:  # a partial run would drop the other sections' rows
        update_results(suite.results, {"summary": (
            f"## Suite: summary\n\nCommand: `{info.command}`; {total / 60:.1f} min; written "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Every ratio below is measured in this "
            f"run against the baseline in the same row, except the reference HSTU's training tokens/s "
            f"(../shared/REFERENCE.md). The `--quick` target (< 5 min) is checked by "
            f"`tests/test_benchmarks.py`, which runs the quick suite; a quick run reports its wall time "
            f"in its own summary.\n\n{table}")})
    print(f"\nResults: {suite.results}; plots: {suite.plots}")
    print("\nSummary\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
