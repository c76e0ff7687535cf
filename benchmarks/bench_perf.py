"""Issue 17 (performance): loss kernels, training step, evaluation / decoding per 1,000 users,
cost curves, encoder threads. Every figure is a ratio against a baseline measured in the same
run, interleaved (baseline and candidates alternate, repeat after repeat), wall time with CPU
time (``time.process_time``) beside it, one intra-op thread per process unless stated.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_perf loss            # the loss variants, ML-100k shapes
    OMP_NUM_THREADS=1 python -m benchmarks.bench_perf step            # training steps, fused vs unfused
    OMP_NUM_THREADS=1 python -m benchmarks.bench_perf decode          # eval + decoders per 1,000 users
    OMP_NUM_THREADS=1 python -m benchmarks.bench_perf length|catalogue|negatives  # cost curves
    OMP_NUM_THREADS=1 python -m benchmarks.bench_perf threads         # encoder, 1 vs 2 threads
    OMP_NUM_THREADS=1 python -m benchmarks.bench_perf mustshow --repeats 3 --steps 6 --epochs 10 --seeds 0 1 2 3
        # issue 17 must-show: step effective FLOP/s vs matmul, COBRA / id, trainer tokens/s + HR@10 per path

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
    "unfused loss, whole-square attention (before)": ["loss.fused=false", "train.attention_block=0"],
    "fused loss, block-causal attention (default)": ["loss.fused=true", "train.attention_block=64"],
    "fused, negatives_block=256, whole square": ["loss.fused=true", "loss.negatives_block=256",
                                                 "train.attention_block=0"],
    "fused, negatives_block=256, block-causal": ["loss.fused=true", "loss.negatives_block=256",
                                                 "train.attention_block=64"],
    "fused, negatives_block=256, block-causal, bf16": ["loss.fused=true", "loss.negatives_block=256",
                                                       "train.attention_block=64", "train.precision=bf16"],
}
"""Training-step paths, the first the baseline of every ratio (the code before issue 17's loss and
attention work); each is a set of config overrides, so every path stays selectable."""


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


# ----------------------------------------------------------------------------- 1c. issue 17 must-show


MUST_NEGATIVES = 128
"""Negatives per position of the reference computation the effective FLOP/s counts (held fixed)."""


def reference_step_flops(tokens: float, square: float, positions: float, dim: int = 50, num_blocks: int = 2,
                         num_heads: int = 1, dqk: int = 50, dv: int = 50,
                         negatives: int = MUST_NEGATIVES) -> Dict[str, float]:
    """FLOPs of the *reference* ML-100k ``id`` training step, whatever the path computes.

    Encoder: :func:`benchmarks.bench_train.hstu_train_flops` (per layer, forward: ``uvqk``
    2 T d H (2 dv + 2 dqk), output projection 2 T H dv d, attention 2 S H (dqk + dv) over the
    full L x L square; training = 3 x forward). Loss: a sampled softmax with ``negatives``
    negatives per position, each of the P positions scoring its positive and its R negatives
    (d-dot products, 2 P (R + 1) d forward), backward = 2 x forward (query and candidate
    gradients): 6 P (R + 1) d. Lookups, norms, SiLU, dropout, log-softmax and the optimizers are
    not counted.
    """
    linear = 2 * tokens * dim * num_heads * (2 * dv + 2 * dqk) + 2 * tokens * num_heads * dv * dim
    attention = 2 * square * num_heads * (dqk + dv)
    encoder = 3 * num_blocks * (linear + attention)
    loss = 6.0 * positions * (negatives + 1) * dim
    return {"encoder": encoder, "loss": loss, "total": encoder + loss}


def mustshow_run(repeats: int, steps: int, epochs: int, seeds: Sequence[int], json_path: str) -> Dict[str, Any]:
    """Issue 17's must-show figures in one run: the matmul rate and the encoder alone
    (``bench_train.hstu_flops``, as the suite's ``limit`` section), the ML-100k ``id`` and ``cobra``
    training steps per loss path (:func:`step_bench`: fresh processes, interleaved), and the real
    trainer on ML-100k ``gr`` for ``epochs`` epochs per path and seed (interleaved): epoch
    tokens/s and test HR@10. Raw results go to ``json_path`` after every part."""
    import tempfile

    from benchmarks import bench_train
    from benchmarks.common import call_worker, shared_data_root

    data_dir, data_format, _ = bench_train.DATASETS["ml-100k"]
    path = os.path.join(shared_data_root(), data_dir)
    out: Dict[str, Any] = {"repeats": repeats, "steps": steps, "epochs": epochs, "seeds": list(seeds),
                           "load_before": os.getloadavg()}

    def save() -> None:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1, default=str)

    def limit() -> Dict[str, Any]:
        return call_worker("bench_train", "hstu_flops", dict(ml100k_file=os.path.join(path, "u.data"), steps=5,
                                                             matmul_n=2048, matmul_repeats=5), threads=1, timeout=900)

    out["limit_before"] = limit()
    save()
    _, out["steps_results"] = step_bench(repeats, ("id", "cobra"), steps)
    save()
    names = list(STEP_VARIANTS)
    trainer: Dict[str, List[Dict[str, Any]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="sidvid-must-") as tmp:
        for i, seed in enumerate(seeds if epochs > 0 else []):  # --epochs 0: no trainer runs
            for name in names[i % len(names):] + names[:i % len(names)]:
                r = call_worker("bench_train", "trainer_loop", dict(
                    config="configs/ml-100k/hstu.yaml", data_path=path, data_format=data_format,
                    cache_dir="/tmp/sidvid-bench-cache", run_dir=os.path.join(tmp, f"{name[:5]}-{seed}"),
                    epochs=epochs, extra=STEP_VARIANTS[name] + [f"train.seed={seed}"]), threads=1, timeout=1800)
                r["seed"] = seed
                trainer[name].append(r)
                out["trainer"] = trainer
                save()
    out["limit_after"] = limit()
    out["load_after"] = os.getloadavg()
    save()
    return out


def encoder_rows(lims: List[Dict[str, Any]], peak: float) -> List[List[str]]:
    """One row per encoder kernel of ``bench_train.hstu_flops`` results (several runs of it)."""
    key = "ML-100k batch (128 users, <= 200)"
    if "variants" not in lims[0]:  # a record from before the kernels were timed side by side
        rates = [l["workloads"][key]["achieved_flops"] for l in lims]
        frac = statistics.median(rates) / peak
        return [["fp32, whole square", ", ".join(f"{r / 1e9:.1f}" for r in rates), "1.00x", "-", f"**{100 * frac:.0f}%**",
                 "-", "met" if frac >= 0.5 else "**not met**"]]
    bf16 = max(l["matmul_bf16"]["best_flops"] for l in lims)
    names = list(lims[0]["variants"][key])
    base = statistics.median(l["variants"][key][names[0]]["achieved_flops"] for l in lims)
    rows = []
    for name in names:
        runs = [l["variants"][key][name] for l in lims]
        rate = statistics.median(r["achieved_flops"] for r in runs)
        rows.append([name, ", ".join(f"{r['achieved_flops'] / 1e9:.1f}" for r in runs), f"{rate / base:.2f}x",
                     f"{runs[0]['executed_square_over_real']:.2f}", f"**{100 * rate / peak:.0f}%**",
                     f"{100 * rate / bf16:.0f}%", "met" if rate / peak >= 0.5 else "**not met**"])
    return rows


def mustshow_report(out: Dict[str, Any]) -> str:
    """Markdown of :func:`mustshow_run`'s raw results."""
    from benchmarks.bench_train import REFERENCE_TOKENS_PER_S

    names = list(out["steps_results"]["id"])  # the paths this run measured, the baseline first
    lims = [out["limit_before"], out["limit_after"]]
    peak = max(l[k]["best_flops"] for l in lims for k in ("matmul_before", "matmul_after"))
    res = out["steps_results"]

    def step_rates(r: Dict[str, Any]) -> Tuple[float, float, Dict[str, float]]:
        f = reference_step_flops(r["encoder_tokens_per_step"], r["square_per_step"], r["loss_positions_per_step"])
        cpu_s = r["tokens_per_step"] / r["tokens_per_cpu_s"]
        return f["total"] / (r["mean_step_ms"] / 1e3), f["total"] / cpu_s, f

    id_rows, flop_info = [], {}
    base_wall = statistics.median(step_rates(r)[0] for r in res["id"][names[0]])
    base_cpu = statistics.median(step_rates(r)[1] for r in res["id"][names[0]])
    for name in names:
        rates = [step_rates(r) for r in res["id"][name]]
        wall = statistics.median(x[0] for x in rates)
        cpu = statistics.median(x[1] for x in rates)
        flop_info = rates[0][2]
        ms = statistics.median(r["mean_step_ms"] for r in res["id"][name])
        id_rows.append([name, f"{ms:.0f}", f"{wall / 1e9:.1f}", f"{wall / base_wall:.2f}x",
                        f"{cpu / 1e9:.1f}", f"{cpu / base_cpu:.2f}x", f"**{100 * wall / peak:.0f}%**",
                        f"{100 * cpu / peak:.0f}%", "met" if wall / peak >= 0.40 else "**not met**"])
    r0 = res["id"][names[0]][0]
    cobra_rows = []
    for name in names:
        id_ms = statistics.median(r["mean_step_ms"] for r in res["id"][name])
        co_ms = statistics.median(r["mean_step_ms"] for r in res["cobra"][name])
        id_cpu = statistics.median(r["tokens_per_step"] / r["tokens_per_cpu_s"] for r in res["id"][name])
        co_cpu = statistics.median(r["tokens_per_step"] / r["tokens_per_cpu_s"] for r in res["cobra"][name])
        cobra_rows.append([name, f"{co_ms:.0f}", f"{id_ms:.0f}", f"**{co_ms / id_ms:.2f}x**", f"{co_cpu / id_cpu:.2f}x",
                           "met" if co_ms / id_ms <= 1.5 else "**not met**"])
    co_base = statistics.median(r["mean_step_ms"] for r in res["cobra"][names[0]])
    trainer_rows = []
    tr = out.get("trainer", {})

    def epoch_rate(r: Dict[str, Any]) -> Tuple[float, float]:
        times, cpus = r["epoch_s"][1:] or r["epoch_s"], r["epoch_cpu_s"][1:] or r["epoch_cpu_s"]
        return r["tokens_per_epoch"] / statistics.median(times), r["tokens_per_epoch"] / statistics.median(cpus)

    if tr:
        tb = statistics.median(epoch_rate(r)[0] for r in tr[names[0]])
        tbc = statistics.median(epoch_rate(r)[1] for r in tr[names[0]])
        for name in names:
            rs = tr[name]
            w = statistics.median(epoch_rate(r)[0] for r in rs)
            c = statistics.median(epoch_rate(r)[1] for r in rs)
            hr = [r["test_hr10"] for r in rs]
            old_hr = {r["seed"]: r["test_hr10"] for r in tr[names[0]]}
            diffs = [r["test_hr10"] - old_hr[r["seed"]] for r in rs if r["seed"] in old_hr]
            diff = (f"{statistics.mean(diffs):+.4f} ({min(diffs):+.4f} .. {max(diffs):+.4f})" if name != names[0]
                    else "-")
            trainer_rows.append([name, f"**{w:,.0f}**", f"{w / tb:.2f}x", f"{c:,.0f}", f"{c / tbc:.2f}x",
                                 f"{w / 24994:.2f}x", f"{w / REFERENCE_TOKENS_PER_S:.2f}x",
                                 "met" if w >= 2 * 24994 else "**not met**",
                                 ", ".join(f"{h:.4f}" for h in hr),
                                 f"{statistics.mean(hr):.4f}", diff])
    text = [
        "Matmul rate (the limit): best of 5 `torch.matmul` [2048, 2048] fp32, measured four times in this run "
        "(before and after the encoder workload, at the start and at the end): "
        + ", ".join(f"{l[k]['best_flops'] / 1e9:.1f}" for l in lims for k in ("matmul_before", "matmul_after"))
        + f" GFLOP/s; the limit is the largest, **{peak / 1e9:.1f} GFLOP/s**."
        + ("" if "matmul_bf16" not in lims[0] else
           " The same product in bfloat16 (the `bf16` kernels' arithmetic; this CPU has AVX-512 BF16): "
           + ", ".join(f"{l['matmul_bf16']['best_flops'] / 1e9:.1f}" for l in lims) + " GFLOP/s."),
        "**Encoder forward+backward alone** (`bench_train.hstu_flops`, the suite's `limit` workload, ML-100k batches, "
        "each kernel on the same batches, interleaved; start and end of the run):",
        md_table(["encoder kernel", "GFLOP/s (start, end)", "vs before", "executed / real attention area",
                  "of the fp32 matmul", "of the bf16 matmul", "target >= 50% (fp32 matmul)"], encoder_rows(lims, peak)),
        f"**Whole ML-100k `id` training step as effective FLOP/s** (reference FLOPs over the whole step's time: "
        f"data, lookups, encoder, loss, backward, fused Adagrad, AdamW). Per step of this run's batches "
        f"(T = {r0['encoder_tokens_per_step']:,.0f} tokens, S = sum L^2 = {r0['square_per_step']:,.0f}, "
        f"P = {r0['loss_positions_per_step']:,.0f} loss positions): encoder {flop_info['encoder'] / 1e9:.2f} GFLOP + "
        f"loss {flop_info['loss'] / 1e9:.2f} GFLOP = {flop_info['total'] / 1e9:.2f} GFLOP, the same count for every "
        f"path. {out['repeats']} fresh processes per path, interleaved, {out['steps']} measured steps after 2 "
        f"warm-up each; medians over processes of (FLOPs / mean step wall time) and (FLOPs / CPU time per step).",
        md_table(["path", "ms / step", "effective GFLOP/s (wall)", "vs old (wall)", "effective GFLOP/CPU-s",
                  "vs old (CPU)", "of matmul (wall)", "of matmul (CPU)", "target >= 40%"], id_rows),
        f"**COBRA step / `id` step**, same users and batches (same seed, same `BatchIterator`; "
        f"{res['cobra'][names[0]][0]['tokens_per_step']:,.0f} history tokens per step for both, COBRA's encoder "
        f"sees {res['cobra'][names[0]][0]['encoder_tokens_per_step']:,.0f}); `configs/ml-100k/cobra.yaml` vs "
        f"`configs/ml-100k/hstu.yaml` with the path's `loss.*` overrides, the same processes as above. COBRA old-path "
        f"step {co_base:.0f} ms.",
        md_table(["path", "COBRA ms / step", "id ms / step", "COBRA / id (wall)", "COBRA / id (CPU)",
                  "target <= 1.5x"], cobra_rows),
    ]
    if trainer_rows:
        text += [
            f"**Trainer loop and quality**, ML-100k `gr` (`configs/ml-100k/hstu.yaml`, `run_training`, "
            f"{out['epochs']} epochs per run, seeds {out['seeds']}, one run per path and seed, the path order "
            f"rotated per seed). tokens/s: the {tr[names[0]][0]['tokens_per_epoch']:,} training tokens of an epoch "
            f"over the median epoch time after the first; median over seeds. HR@10: test HR@10 "
            f"(one held-out item for each of the {tr[names[0]][0]['sequences_per_epoch']} users) after the last "
            f"epoch (the identical {out['epochs']}-epoch budget for every path; the config's 101-epoch budget is "
            f"not run here). Recorded baseline: 24,994 tokens/s (suite, 2026-11-30, old path).",
            md_table(["path", "tokens/s (wall)", "vs old (this run)", "tokens / CPU-s", "vs old (CPU)",
                      "vs 24,994", "vs reference 6,511", "target >= 2 x 24,994", "test HR@10 per seed",
                      "HR@10 mean", "HR@10 minus old, same seed: mean (min .. max)"], trainer_rows),
        ]
    text.append(f"Load average before / after: {out['load_before']} / {out.get('load_after')}.")
    return "\n\n".join(text)


# ----------------------------------------------------------------------------- 3. evaluation and decoding


def _beam_loop(cobra: Any, sid_table: Any, index: Any, beam: int, ks: List[int]) -> Callable[..., None]:
    """The ``beam`` decoder as it was before (one FAISS search per beam SID), for the ratio."""
    import torch

    from sidvid_rec.config import DecoderSettings
    from sidvid_rec.decode import DecodeContext
    from sidvid_rec.decode.base import DecodeState, retrieve, top_sids
    from sidvid_rec.decode.beam import fuse_scores, rank_candidates
    from sidvid_rec.eval.evaluate import list_ranks
    from sidvid_rec.eval.metrics import RankMetrics

    ctx = DecodeContext(cobra, sid_table, index, DecoderSettings(beam_size=beam))
    s = ctx.settings

    @torch.no_grad()
    def run(batches: List[Any]) -> None:
        metrics = RankMetrics(ks)
        for batch in batches:
            k = max(ks)
            state = DecodeState(ctx, batch)
            logits = state.sid_logits()
            _, beam_sids = top_sids(logits, s.beam_size)
            queries = state.vid_queries(ctx.sid_table[beam_sids])
            items, vid_logits = [], []
            for j in range(beam_sids.shape[1]):
                hits = retrieve(ctx, batch, queries[:, j], max(s.beam_ann, k))
                items.append(hits.ids)
                vid_logits.append(hits.scores / cobra.temperature)
            items_t, vid_t = torch.stack(items, dim=1), torch.stack(vid_logits, dim=1)
            fused = fuse_scores(s.beam_fuse, logits, beam_sids, vid_t, s.alpha, s.beta)
            b = items_t.shape[0]
            top = rank_candidates(items_t.reshape(b, -1), fused.reshape(b, -1), vid_t.reshape(b, -1), k)
            metrics.update(list_ranks(top.items, batch.jagged("target_id").values()), batch.weights)
    return run


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
        loop = _beam_loop(cobra, sid_table, index, 5, ks)
        variants["COBRA beam (5 SIDs), one search per beam (before)"] = lambda: loop(batches)
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


# ----------------------------------------------------------------------------- 4. cost curves


class _Trainer:
    """A training step of the ``id`` model at ML-100k settings (d = 50, 2 blocks, 1 head) on a
    synthetic jagged batch: table lookup (``nn.Embedding(sparse=True)``), HSTU, sampled softmax,
    backward, a row-wise SGD update of the touched table rows and SGD on the dense part (the
    fused TorchRec optimizers also touch only the looked-up rows)."""

    def __init__(self, num_items: int, max_len: int, num_negatives: int = 128, block: int = 0, dim: int = 50) -> None:
        import torch

        from sidvid_rec.losses import SampledSoftmaxLoss
        from sidvid_rec.modules.hstu import HSTUEncoder

        self.table = torch.nn.Embedding(num_items + 1, dim, sparse=True)
        torch.nn.init.normal_(self.table.weight, std=0.02)
        self.encoder = HSTUEncoder(max_len=max_len, dim=dim, num_blocks=2, num_heads=1, dqk=dim, dv=dim,
                                   dropout=0.2, attn_dropout=0.0).train()
        self.num_items = num_items
        self.set_loss(num_negatives, block)

    def set_loss(self, num_negatives: int, block: int) -> None:
        from sidvid_rec.losses import SampledSoftmaxLoss

        self.loss = SampledSoftmaxLoss(self.num_items, num_negatives, 0.05, negatives_block=block)

    def batch(self, sequences: int, length: int, seed: int = 0):
        import torch

        g = torch.Generator().manual_seed(seed)
        tokens = sequences * length
        ids = torch.randint(1, self.num_items + 1, (tokens + sequences,), generator=g)
        keep = torch.ones(tokens + sequences, dtype=torch.bool)
        keep[torch.arange(1, sequences + 1) * (length + 1) - 1] = False
        inputs = ids[keep]
        targets = ids[torch.roll(keep, 1)]
        offsets = torch.arange(sequences + 1) * length
        times = torch.cumsum(torch.randint(1, 1000, (tokens,), generator=g), 0) + 1_000_000_000
        return inputs, targets, offsets, times

    def step(self, batch, seed: int = 0) -> None:
        import torch

        inputs, targets, offsets, times = batch
        h = self.encoder(self.table(inputs), offsets, times, host_offsets=offsets)
        out = self.loss(h, targets, self.table, generator=torch.Generator().manual_seed(seed))
        out.loss.backward()
        with torch.no_grad():
            grad = self.table.weight.grad.coalesce()
            self.table.weight.index_add_(0, grad.indices()[0], grad.values(), alpha=-0.01)
            self.table.weight.grad = None
            for p in self.encoder.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-0.001)
                    p.grad = None


def _mallopt_mmap_threshold(nbytes: int) -> bool:
    """glibc ``mallopt(M_MMAP_THRESHOLD, nbytes)``: blocks at least this large are mmapped, so
    freeing them returns them to the OS (the peak RSS then reads a step's own peak)."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes)))
    except (OSError, AttributeError):
        return False


def _measure(fn: Callable[[], Any], steps: int) -> Dict[str, float]:
    """Median wall / CPU seconds of ``steps`` calls after a warm-up (default allocator), then the
    peak RSS of one more call over the RSS before it, with large blocks mmapped (64 KiB
    threshold) so that memory freed earlier does not hide the call's own peak."""
    fn()  # warm-up
    walls, cpus = [], []
    if os.environ.get("BENCH_MEMORY_ONLY") == "1":  # a memory run: no timed steps (times are reported as NaN)
        steps = 0
        walls, cpus = [float("nan")], [float("nan")]
    for _ in range(steps):
        w, c = _timed(fn)
        walls.append(w)
        cpus.append(c)
    pinned = "MALLOC_MMAP_THRESHOLD_" in os.environ  # the whole process already mmaps large blocks
    exact = pinned or _mallopt_mmap_threshold(64 << 10)
    if not pinned:
        fn()  # frees the default allocator's retained blocks under the new threshold
    base = _rss_mb()
    _peak_rss_reset()
    fn()
    peak = _peak_rss_mb() - base
    if not pinned:
        _mallopt_mmap_threshold(32 << 20)  # back to glibc's largest dynamic threshold
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "peak_mb": peak, "rss_mb": base,
            "exact_peak": exact}


def _plot(name: str, title: str, xlabel: str, series: Dict[str, Tuple[List[float], List[float]]],
          mem: Dict[str, Tuple[List[float], List[float]]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import math

    def finite(xy: Tuple[List[float], List[float]]) -> Tuple[List[float], List[float]]:
        pairs = [(x, y) for x, y in zip(*xy) if y is not None and math.isfinite(y) and y > 0]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    series = {k: finite(v) for k, v in series.items()}
    mem = {k: finite(v) for k, v in mem.items()}
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for label, (x, y) in series.items():
        if x:
            a.plot(x, y, marker="o", label=label)
    for label, (x, y) in mem.items():
        if x:
            b.plot(x, y, marker="o", label=label)
    for ax, ylabel in ((a, "training tokens/s (wall)"), (b, "peak memory (MB)")):
        if not ax.lines:  # nothing measured on this axis (e.g. a memory-only run's times)
            ax.set_visible(False)
            continue
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if a.lines:
        a.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(PLOTS, exist_ok=True)
    path = os.path.join(PLOTS, f"{name}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curve_length(steps: int = 3, tokens: int = 8192) -> Tuple[str, Dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    lengths = [50, 200, 512, 1024, 2048, 4096]
    trainer = _Trainer(1682, max(lengths))
    rows, data = [], []
    for length in lengths:
        batch = trainer.batch(max(tokens // length, 1), length)
        n = batch[0].numel()
        r = _measure(lambda: trainer.step(batch), steps)
        data.append({"length": length, "tokens": n, **r})
        rows.append([f"{length:,}", f"{n:,}", f"{n / r['wall']:,.0f}", f"{n / r['cpu']:,.0f}",
                     f"{n / r['wall'] / (data[0]['tokens'] / data[0]['wall']):.2f}x", f"{max(r['peak_mb'], 0):,.0f}"])
    plot = _plot("curve_length", "id training step vs history length (8,192 tokens/step, 1 thread)",
                 "history length", {"tokens/s": ([d["length"] for d in data], [d["tokens"] / d["wall"] for d in data])},
                 {"peak RSS increase": ([d["length"] for d in data], [d["peak_mb"] for d in data])})
    text = ("Tokens/s vs history length (sequences of exactly L items, ~8,192 tokens per step, N = 1,682, "
            "R = 128 per position, fused loss; median of 3 steps after 1 warm-up):\n\n" + md_table(
                ["L", "tokens/step", "tokens/s (wall)", "tokens / CPU-s", "vs L = 50", "peak RSS increase MB"], rows)
            + f"\n\n![{os.path.basename(plot)}](plots/{os.path.basename(plot)})")
    return text, {"length": data}


def curve_catalogue(steps: int = 3) -> Tuple[str, Dict[str, Any]]:
    import gc

    import torch

    torch.set_num_threads(1)
    sizes = [10_000, 100_000, 1_000_000, 10_000_000]
    rows, data = [], []
    for size in sizes:
        base_rss = _rss_mb()
        trainer = _Trainer(size, 200)
        table_mb = _rss_mb() - base_rss
        batch = trainer.batch(50, 200)
        n = batch[0].numel()
        point = {"items": size, "tokens": n, "table_mb": table_mb}
        for label, block in (("per position", 0), ("block 256", 256)):
            trainer.set_loss(128, block)
            r = _measure(lambda: trainer.step(batch), steps)
            point[label] = r
        point["export"] = _export_write(trainer.table.weight.detach())
        data.append(point)
        pp, bl = point["per position"], point["block 256"]
        rows.append([f"{size:,}", f"{table_mb:,.0f}", f"{n / pp['wall']:,.0f}", f"{n / pp['cpu']:,.0f}",
                     f"{max(pp['peak_mb'], 0):,.0f}", f"{n / bl['wall']:,.0f}", f"{n / bl['cpu']:,.0f}",
                     f"{max(bl['peak_mb'], 0):,.0f}", f"{pp['wall'] / bl['wall']:.2f}x",
                     f"{point['export']['seconds']:.2f} s ({point['export']['gb_per_s']:.2f} GB/s)"])
        del trainer
        gc.collect()
    xs = [d["items"] for d in data]
    plot = _plot("curve_catalogue", "id training step vs catalogue size (L = 200, 10,000 tokens/step, R = 128)",
                 "items (table rows, d = 50)",
                 {lab: (xs, [d["tokens"] / d[lab]["wall"] for d in data]) for lab in ("per position", "block 256")},
                 {**{f"step peak, {lab}": (xs, [d[lab]["peak_mb"] for d in data]) for lab in ("per position", "block 256")},
                  "table": (xs, [d["table_mb"] for d in data])})
    text = ("Tokens/s vs catalogue size (50 sequences x 200 items = 10,000 tokens per step, R = 128, fused loss; "
            "each table built, measured and freed before the next; median of 3 steps after 1 warm-up):\n\n" + md_table(
                ["items", "table MB (RSS)", "tokens/s per position", "tokens/CPU-s", "step peak MB",
                 "tokens/s block 256", "tokens/CPU-s", "step peak MB", "block 256 speed-up",
                 "export write (normalise + safetensors)"], rows)
            + f"\n\n![{os.path.basename(plot)}](plots/{os.path.basename(plot)})")
    return text, {"catalogue": data}


def _export_write(table: Any) -> Dict[str, float]:
    """Seconds to L2-normalise ``table`` and write it as one safetensors file (what an export's
    candidate vectors cost), with fsync; the file is removed afterwards."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        path = os.path.join(tmp, "candidates.safetensors")
        start = time.perf_counter()
        vectors = torch.nn.functional.normalize(table, dim=-1)
        save_file({"candidates": vectors}, path)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        seconds = time.perf_counter() - start
        size = os.path.getsize(path)
    return {"seconds": seconds, "bytes": size, "gb_per_s": size / seconds / 1e9}


def curve_negatives(steps: int = 2, num_items: int = 100_000) -> Tuple[str, Dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    counts = [128, 256, 512, 1024, 2048, 4096]
    trainer = _Trainer(num_items, 200)
    batch = trainer.batch(50, 200)
    n = batch[0].numel()
    rows, data = [], []
    for r_neg in counts:
        point = {"negatives": r_neg}
        for label, block in (("per position", 0), ("block 256", 256)):
            trainer.set_loss(r_neg, block)
            point[label] = _measure(lambda: trainer.step(batch), steps)
        data.append(point)
        pp, bl = point["per position"], point["block 256"]
        rows.append([f"{r_neg:,}", f"{n / pp['wall']:,.0f}", f"{n / pp['cpu']:,.0f}", f"{max(pp['peak_mb'], 0):,.0f}",
                     f"{n / bl['wall']:,.0f}", f"{n / bl['cpu']:,.0f}", f"{max(bl['peak_mb'], 0):,.0f}",
                     f"{pp['wall'] / bl['wall']:.2f}x"])
    xs = [d["negatives"] for d in data]
    plot = _plot("curve_negatives", f"id training step vs negatives (L = 200, 10,000 tokens/step, N = {num_items:,})",
                 "negatives R", {lab: (xs, [n / d[lab]["wall"] for d in data]) for lab in ("per position", "block 256")},
                 {lab: (xs, [d[lab]["peak_mb"] for d in data]) for lab in ("per position", "block 256")})
    text = (f"Tokens/s vs number of negatives (10,000 tokens per step, N = {num_items:,}, fused loss; median of "
            f"{steps} steps after 1 warm-up):\n\n" + md_table(
                ["R", "tokens/s per position", "tokens/CPU-s", "step peak MB", "tokens/s block 256", "tokens/CPU-s",
                 "step peak MB", "block 256 speed-up"], rows)
            + f"\n\n![{os.path.basename(plot)}](plots/{os.path.basename(plot)})")
    return text, {"negatives": data}


def combine_curves(timing: Dict[str, str], memory: Dict[str, str]) -> str:
    """Final tables and plots of the three curves: tokens/s from runs with glibc's default
    allocator (``timing[name]``: JSON of ``length``/``catalogue``/``negatives``) and peak memory
    from runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (``memory[name]``), where every large block
    is mmapped and returned on free, so the peak RSS increase is the step's own. The allocator
    setting costs page faults, which is why the times come from the other run."""
    out = []

    def load(path: str) -> Any:
        with open(path) as f:
            return json.load(f)

    if "length" in timing:
        t, m = load(timing["length"])["length"], load(memory["length"])["length"]
        rows = [[f"{a['length']:,}", f"{a['tokens']:,}", f"{a['tokens'] / a['wall']:,.0f}", f"{a['tokens'] / a['cpu']:,.0f}",
                 f"{(a['tokens'] / a['wall']) / (t[0]['tokens'] / t[0]['wall']):.2f}x",
                 f"{(a['tokens'] / a['cpu']) / (t[0]['tokens'] / t[0]['cpu']):.2f}x", f"{b['peak_mb']:,.0f}"]
                for a, b in zip(t, m)]
        xs = [a["length"] for a in t]
        plot = _plot("curve_length", "id training step vs history length (~8,192 tokens/step, 1 thread)", "history length L",
                     {"tokens/s (wall)": (xs, [a["tokens"] / a["wall"] for a in t]),
                      "tokens / CPU-s": (xs, [a["tokens"] / a["cpu"] for a in t])},
                     {"step peak RSS increase": (xs, [b["peak_mb"] for b in m])})
        out.append("**Tokens/s vs history length** (sequences of exactly L items, ~8,192 tokens per step, N = 1,682, "
                   "R = 128 per position, fused loss; median of 3 steps after 1 warm-up):\n\n" + md_table(
                       ["L", "tokens/step", "tokens/s (wall)", "tokens / CPU-s", "vs L = 50 (wall)", "vs L = 50 (CPU)",
                        "step peak RSS increase MB"], rows) + f"\n\n![curve_length.png](plots/{os.path.basename(plot)})")
    if "catalogue" in timing:
        t, m = load(timing["catalogue"])["catalogue"], load(memory["catalogue"])["catalogue"]
        rows = []
        for a, b in zip(t, m):
            pp, bl = a["per position"], a["block 256"]
            n = a["tokens"]
            rows.append([f"{a['items']:,}", f"{b['table_mb']:,.0f}", f"{n / pp['wall']:,.0f}", f"{n / pp['cpu']:,.0f}",
                         f"{b['per position']['peak_mb']:,.0f}", f"{n / bl['wall']:,.0f}", f"{n / bl['cpu']:,.0f}",
                         f"{b['block 256']['peak_mb']:,.0f}", f"{pp['wall'] / bl['wall']:.2f}x / {pp['cpu'] / bl['cpu']:.2f}x",
                         f"{a['export']['seconds']:.2f} s ({a['export']['gb_per_s']:.2f} GB/s)"])
        xs = [a["items"] for a in t]
        plot = _plot("curve_catalogue", "id training step vs catalogue size (L = 200, 10,000 tokens/step, R = 128)",
                     "items (table rows, d = 50)",
                     {lab: (xs, [a["tokens"] / a[lab]["wall"] for a in t]) for lab in ("per position", "block 256")},
                     {**{f"step peak, {lab}": (xs, [b[lab]["peak_mb"] for b in m]) for lab in ("per position", "block 256")},
                      "table (RSS)": (xs, [b["table_mb"] for b in m])})
        out.append("**Tokens/s vs catalogue size** (50 sequences x 200 items = 10,000 tokens per step, R = 128, fused "
                   "loss, d = 50; each table built, measured and freed before the next; median of 3 steps after 1 "
                   "warm-up):\n\n" + md_table(
                       ["items", "table MB (RSS)", "tokens/s, per position", "tokens / CPU-s", "step peak MB",
                        "tokens/s, block 256", "tokens / CPU-s", "step peak MB", "block 256 speed-up (wall / CPU)",
                        "export write (normalise + safetensors + fsync)"], rows)
                   + f"\n\n![curve_catalogue.png](plots/{os.path.basename(plot)})")
    if "negatives" in timing:
        t, m = load(timing["negatives"])["negatives"], load(memory["negatives"])["negatives"]
        rows = []
        n = 10000
        for a, b in zip(t, m):
            pp, bl = a["per position"], a["block 256"]
            rows.append([f"{a['negatives']:,}", f"{n / pp['wall']:,.0f}", f"{n / pp['cpu']:,.0f}",
                         f"{b['per position']['peak_mb']:,.0f}", f"{n / bl['wall']:,.0f}", f"{n / bl['cpu']:,.0f}",
                         f"{b['block 256']['peak_mb']:,.0f}", f"{pp['wall'] / bl['wall']:.2f}x / {pp['cpu'] / bl['cpu']:.2f}x"])
        xs = [a["negatives"] for a in t]
        plot = _plot("curve_negatives", "id training step vs negatives (L = 200, 10,000 tokens/step, N = 100,000)",
                     "negatives R", {lab: (xs, [n / a[lab]["wall"] for a in t]) for lab in ("per position", "block 256")},
                     {lab: (xs, [b[lab]["peak_mb"] for b in m]) for lab in ("per position", "block 256")})
        out.append("**Tokens/s vs number of negatives** (10,000 tokens per step, N = 100,000, d = 50, fused loss; "
                   "median of 2 steps after 1 warm-up):\n\n" + md_table(
                       ["R", "tokens/s, per position", "tokens / CPU-s", "step peak MB", "tokens/s, block 256",
                        "tokens / CPU-s", "step peak MB", "block 256 speed-up (wall / CPU)"], rows)
                   + f"\n\n![curve_negatives.png](plots/{os.path.basename(plot)})")
    return "\n\n".join(out)


# ----------------------------------------------------------------------------- 2. encoder: threads, torch.compile


def _ml100k_like_batch(trainer: "_Trainer", seed: int = 0):
    """128 sequences whose lengths follow ML-100k's gr training split shape (20..200, ~80 mean,
    10,281 tokens in all): lengths drawn once with a fixed seed and rescaled to the total."""
    import torch

    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(20, 201, (128,), generator=g).float() ** 1.5
    lengths = (raw / raw.sum() * 10281).round().long().clamp(1, 200)
    lengths[0] += 10281 - int(lengths.sum())
    ids = torch.randint(1, trainer.num_items + 1, (int(lengths.sum()),), generator=g)
    offsets = torch.zeros(129, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    times = torch.cumsum(torch.randint(1, 1000, (ids.numel(),), generator=g), 0) + 1_000_000_000
    return ids, ids.roll(-1), offsets, times


def threads_bench(repeats: int) -> Tuple[str, Dict[str, Any]]:
    """Encoder forward + backward on an ML-100k-shaped batch (10,281 tokens, 128 sequences) with
    1 and 2 intra-op threads (same process, interleaved), and torch.compile of the encoder
    (inductor; compile time reported apart) against eager, 1 thread."""
    import torch

    trainer = _Trainer(1682, 200)
    ids, _, offsets, times = _ml100k_like_batch(trainer)
    x = trainer.table.weight.detach()[ids].clone().requires_grad_()
    encoder = trainer.encoder

    def encode(module: Any, threads: int) -> Callable[[], None]:
        def run() -> None:
            torch.set_num_threads(threads)
            out = module(x, offsets, times, host_offsets=offsets)
            out.sum().backward()
            x.grad = None
            for p in encoder.parameters():
                p.grad = None
        return run

    res = interleaved({"eager, 1 thread": encode(encoder, 1), "eager, 2 threads": encode(encoder, 2)}, repeats)
    torch.set_num_threads(1)
    base = res["eager, 1 thread"]
    rows = [[n, f"{r['wall'] * 1e3:.0f}", f"{r['cpu'] * 1e3:.0f}", f"{base['wall'] / r['wall']:.2f}x",
             f"{base['cpu'] / r['cpu']:.2f}x", f"{10281 / r['wall']:,.0f}"] for n, r in res.items()]
    data: Dict[str, Any] = {"threads": res}
    compile_note = ""
    try:
        compiled = torch.compile(encoder, dynamic=True)
        start, cpu0 = time.perf_counter(), time.process_time()
        encode(compiled, 1)()
        compile_s, compile_cpu = time.perf_counter() - start, time.process_time() - cpu0
        res2 = interleaved({"eager, 1 thread": encode(encoder, 1), "torch.compile, 1 thread": encode(compiled, 1)},
                           repeats)
        data["compile"] = {"compile_s": compile_s, **res2}
        b2 = res2["eager, 1 thread"]
        rows += [[f"{n} (2nd run)", f"{r['wall'] * 1e3:.0f}", f"{r['cpu'] * 1e3:.0f}", f"{b2['wall'] / r['wall']:.2f}x",
                  f"{b2['cpu'] / r['cpu']:.2f}x", f"{10281 / r['wall']:,.0f}"] for n, r in res2.items()]
        compile_note = f"torch.compile (inductor, dynamic shapes): first call {compile_s:.0f} s wall / {compile_cpu:.0f} s CPU."
    except Exception as e:  # noqa: BLE001 -- report why compile could not run, keep the eager figures
        compile_note = f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        data["compile_error"] = compile_note
    text = (f"HSTU encoder forward + backward, ML-100k-shaped batch (10,281 tokens, 128 sequences <= 200, d = 50, "
            f"2 blocks, dropout 0.2; median of {repeats} interleaved repeats):\n\n" + md_table(
                ["variant", "wall ms", "CPU ms", "speed-up (wall)", "speed-up (CPU)", "tokens/s"], rows)
            + f"\n\n{compile_note}")
    return text, data


# ----------------------------------------------------------------------------- main


def _mustshow(args: argparse.Namespace) -> Tuple[str, Dict[str, Any]]:
    if args.report:
        with open(args.report) as f:
            out = json.load(f)
    else:
        out = mustshow_run(args.repeats, args.steps, args.epochs, args.seeds, args.json or "/tmp/mustshow.json")
    return mustshow_report(out), out


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["loss", "step", "decode", "length", "catalogue", "negatives", "threads",
                                         "combine", "mustshow"])
    parser.add_argument("--steps", type=int, default=6, help="mustshow: measured steps per process")
    parser.add_argument("--epochs", type=int, default=10, help="mustshow: trainer epochs per run (0: no trainer runs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="mustshow: trainer seeds")
    parser.add_argument("--report", default="", help="mustshow: only format this raw JSON")
    parser.add_argument("--timing", nargs="*", default=[], help="combine: NAME=JSON of the default-allocator runs")
    parser.add_argument("--memory", nargs="*", default=[], help="combine: NAME=JSON of the mmap-threshold runs")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    text, data = {"loss": lambda: loss_bench(args.repeats), "step": lambda: step_bench(args.repeats),
                   "decode": lambda: decode_bench(args.repeats), "length": curve_length,
                   "catalogue": curve_catalogue, "negatives": curve_negatives,
                   "threads": lambda: threads_bench(args.repeats),
                   "mustshow": lambda: _mustshow(args),
                   "combine": lambda: (combine_curves(dict(a.split("=", 1) for a in args.timing),
                                                      dict(a.split("=", 1) for a in args.memory)), {})}[args.what]()
    print(text)
    print(f"\n(wall time {time.perf_counter() - start:.0f} s; load average {os.getloadavg()})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
