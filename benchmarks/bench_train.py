"""Sections 1 and 2 of the suite: training throughput, and HSTU FLOP/s against the matmul limit.

Workers (each runs in its own process, see :func:`benchmarks.common.call_worker`):

* :func:`prepare_sids` -- semantic IDs for a config with the package's API
  (``tfidf`` item-text embeddings -> ``build_semantic_ids`` -> ``write_semantic_ids``).
* :func:`train_steps` -- training steps of the real model as the trainer builds it
  (``build_model``: TorchRec tables under DistributedModelParallel with the fused row-wise
  Adagrad, ``build_optimizers``: AdamW for the dense part), timed by phase.
* :func:`trainer_loop` -- ``sidvid_rec.train.trainer.run_training`` itself, with each epoch's
  training loop timed (evaluation and checkpoints excluded): the figure the reference's
  training tokens/s (../shared/REFERENCE.md) compares to.
* :func:`hstu_flops` -- HSTU encoder forward+backward FLOP/s and this machine's fp32 matmul rate.

Phase breakdown of :func:`train_steps` (wall time per step): the model's own modules are
wrapped with timers (the item tables' ``vectors``/``embed``, the encoder, the losses), so the
forward runs exactly as in training. The backward is split where the gradient crosses the
encoder: tensor hooks on the encoder's output and input record when each gradient is ready;
before the output's hook: the losses (with the candidate-side table backward), between the
hooks: the encoder, after the input's: the input-side table backward with the fused
in-backward table update.
"""

import os
import statistics
import time
from typing import Any, Dict, List, Optional, Tuple

REFERENCE_TOKENS_PER_S = 6511.0
"""generative-recommenders' research HSTU, training tokens/s on ML-100k (../shared/REFERENCE.md)."""
REFERENCE_TOKENS_PER_EPOCH = 84087
MODES = ("id", "sid_id", "cobra")
DATASETS = {
    # name: (data directory under the shared data root, data format, config directory)
    "ml-100k": ("movielens/ml-100k", "ml-100k", "configs/ml-100k"),
    "beauty": ("amazon/beauty", "amazon", "configs/amazon-beauty"),
}
PHASES = ("data", "embedding", "encoder", "loss", "other", "optimizer")


def config_path(dataset: str, mode: str) -> str:
    return os.path.join(DATASETS[dataset][2], "cobra.yaml" if mode == "cobra" else "hstu.yaml")


def _overrides(data_path: str, data_format: str, cache_dir: str, extra: Optional[List[str]] = None) -> List[str]:
    # The suite times the reference loss (R uniform negatives), whatever a config ships (Beauty's: the exact softmax).
    return [f"data.path={data_path}", f"data.format={data_format}", f"data.cache_dir={cache_dir}",
            "loss.negatives=uniform", *(extra or [])]


# ----------------------------------------------------------------------------- workers


def prepare_sids(configs: List[str], outs: List[str], data_path: str, data_format: str, cache_dir: str,
                 threads: int) -> List[Dict[str, Any]]:
    """Builds each config's semantic IDs (its ``sids`` section) from ``tfidf`` text embeddings into
    the matching ``outs`` directory; one row of build facts per config."""
    import numpy as np

    from sidvid_rec.text import embed_dataset
    from sidvid_rec.cli.sids_cmd import rq_params
    from sidvid_rec.config import load_config
    from sidvid_rec.data import load_sequences
    from sidvid_rec.semantic_ids import build_semantic_ids, write_semantic_ids
    from sidvid_rec.semantic_ids.kmeans import faiss_threads

    rows = []
    for config, out in zip(configs, outs):
        cfg = load_config(config, _overrides(data_path, data_format, cache_dir,
                                             ["sids.encoder=tfidf", f"sids.threads={threads}"]))
        data = load_sequences(cfg.data)
        start = time.perf_counter()
        vectors, manifest = embed_dataset(cfg, data, progress=False)  # cached after the first run
        embed_s = time.perf_counter() - start
        x = vectors[1:]
        start = time.perf_counter()
        with faiss_threads(cfg.sids.threads):
            sids = build_semantic_ids(x, rq_params(cfg.sids), cfg.sids.dedup, progress=False)
        build_s = time.perf_counter() - start
        write_semantic_ids(out, sids, x, {"encoder": manifest["encoder"], "data_fingerprint": data.fingerprint,
                                          "data_format": data.format, "note": "benchmark suite, tfidf"})
        rows.append({"config": config, "items": int(x.shape[0]), "dim": int(x.shape[1]), "layers": cfg.sids.layers,
                     "codebook_size": cfg.sids.codebook_size,
                     "distinct_sids": int(np.unique(sids.codes, axis=0).shape[0]),
                     "embed_s": embed_s, "build_s": build_s})
    return rows


def _instrument(model: Any, clock: Any, marks: Dict[str, float], device: str) -> None:
    """Wraps the model's embedding, encoder and loss calls with phase timers (instance attributes,
    so the model's own ``forward`` runs unchanged) and hooks the encoder's gradients."""
    import torch

    from benchmarks.common import synchronize

    emb = model.embeddings
    for name in ("vectors", "embed", "fuse"):
        setattr(emb, name, clock.wrap("embedding", getattr(emb, name)))
    if hasattr(model, "type_emb"):  # COBRA: the token-type lookup is an embedding too
        model.type_emb.forward = clock.wrap("embedding", model.type_emb.forward)

    def mark(name: str):
        def hook(_grad: torch.Tensor) -> None:
            synchronize(device)
            marks.setdefault(name, time.perf_counter())
        return hook

    encoder_forward = model.encoder.forward

    def timed_encoder(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with clock.phase("encoder"):
            out = encoder_forward(x, *args, **kwargs)
        marks["encoder_tokens"] = float(x.shape[0])
        if torch.is_grad_enabled():
            out.register_hook(mark("encoder_out"))
            if x.requires_grad:
                x.register_hook(mark("encoder_in"))
        return out

    model.encoder.forward = timed_encoder
    if hasattr(model, "_sid_loss"):  # COBRA: SID sampled softmax (with its negative draw) + VID InfoNCE
        model._sid_loss = clock.wrap("loss", model._sid_loss)
        model.vid_loss.forward = clock.wrap("loss", model.vid_loss.forward)
    else:
        loss_forward = clock.wrap("loss", model.loss.forward)

        def counted_loss(query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            marks["loss_positions"] = marks.get("loss_positions", 0.0) + float(query.shape[0])
            return loss_forward(query, *args, **kwargs)

        model.loss.forward = counted_loss


def train_steps(config: str, mode: str, data_path: str, data_format: str, cache_dir: str, sids_dir: str,
                steps: int, warmup: int, device: str = "cpu", extra: Optional[List[str]] = None) -> Dict[str, Any]:
    """Times ``steps`` training steps (after ``warmup``) of the trainer's model; per-phase means.
    ``extra``: more ``section.key=value`` overrides (e.g. ``loss.fused=false``)."""
    import torch

    from benchmarks.common import PhaseClock, current_rss_mb, peak_rss_mb, reset_peak_rss, synchronize
    from sidvid_rec.config import load_config
    from sidvid_rec.data import load_sequences, make_split
    from sidvid_rec.data.batches import BatchIterator, to_device
    from sidvid_rec.models.build import unwrap
    from sidvid_rec.train.distributed import build_sharded_model
    from sidvid_rec.process_group import init_distributed
    from sidvid_rec.train.optimizers import build_optimizers
    from sidvid_rec.train.trainer import negative_generator

    more = [f"model.mode={mode}", f"train.device={device}"] + ([f"sids.dir={sids_dir}"] if sids_dir else [])
    cfg = load_config(config, _overrides(data_path, data_format, cache_dir, more + list(extra or [])))
    ctx = init_distributed(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    data = load_sequences(cfg.data)
    split = make_split(data, "train", cfg.data.protocol, cfg.data.max_len)
    model = build_sharded_model(cfg, data, ctx)
    optimizers = build_optimizers(model, cfg.train)
    generator = negative_generator(ctx.device)  # on the training device, as the trainer's
    generator.manual_seed(cfg.train.seed)
    batches = BatchIterator(split, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed)

    def endless():
        epoch = 0
        while True:
            batches.set_epoch(epoch)
            yield from batches
            epoch += 1

    stream = endless()
    clock, marks = PhaseClock(device), {}
    _instrument(unwrap(model), clock, marks, device)
    model.train()
    rss_before = current_rss_mb()
    reset_peak_rss()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    records = []
    for step in range(warmup + steps):
        marks.clear()
        clock.take()
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        with clock.phase("data"):
            batch = to_device(next(stream), ctx.device)  # pinned, non-blocking on CUDA (as the trainer)
        with clock.phase("other"):  # forward glue; the wrapped modules book their own time
            out = model(batch, generator=generator)
        with clock.phase("optimizer"):
            optimizers.zero_grad()
        synchronize(device)
        backward_start = time.perf_counter()
        out.loss.backward()
        synchronize(device)
        backward_end = time.perf_counter()
        with clock.phase("optimizer"):
            optimizers.step()
        synchronize(device)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if step < warmup:
            continue
        forward = clock.take()
        grad_out = marks.get("encoder_out", backward_start)
        grad_in = marks.get("encoder_in", grad_out)
        lengths = batch.jagged("item_id").lengths()
        records.append({
            "seconds": elapsed,
            "square": int((lengths * lengths).sum()),
            "loss_positions": int(marks.get("loss_positions", 0)),
            "cpu_seconds": cpu,
            "tokens": int(batch.jagged("item_id").lengths().sum()),
            "sequences": batch.batch_size,
            "encoder_tokens": int(marks.get("encoder_tokens", 0)),
            "fwd": {p: forward.get(p, 0.0) for p in PHASES},
            "bwd": {"loss": grad_out - backward_start, "encoder": grad_in - grad_out,
                    "embedding": backward_end - grad_in},
        })
    peak = peak_rss_mb()
    if device.startswith("cuda"):
        gpu_peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        gpu_peak = None
    n = len(records)
    total_s = sum(r["seconds"] for r in records)
    return {
        "dataset_items": data.num_items, "steps": n, "batch_size": cfg.train.batch_size,
        "tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in records),
        "mean_tokens_per_s": sum(r["tokens"] for r in records) / total_s,
        "tokens_per_cpu_s": sum(r["tokens"] for r in records) / sum(r["cpu_seconds"] for r in records),
        "sequences_per_s": statistics.median(r["sequences"] / r["seconds"] for r in records),
        "ms_per_step": 1e3 * statistics.median(r["seconds"] for r in records),
        "tokens_per_step": sum(r["tokens"] for r in records) / n,
        "encoder_tokens_per_step": sum(r["encoder_tokens"] for r in records) / n,
        "square_per_step": sum(r["square"] for r in records) / n,  # sum of L^2 over the batch's sequences
        "loss_positions_per_step": sum(r["loss_positions"] for r in records) / n,  # id / sid_id only
        "fwd_ms": {p: 1e3 * sum(r["fwd"][p] for r in records) / n for p in PHASES},
        "bwd_ms": {p: 1e3 * sum(r["bwd"][p] for r in records) / n for p in ("loss", "encoder", "embedding")},
        "mean_step_ms": 1e3 * total_s / n,
        "rss_before_mb": rss_before, "peak_rss_mb": peak, "peak_delta_mb": peak - rss_before,
        "gpu_peak_mb": gpu_peak,
    }


def trainer_loop(config: str, data_path: str, data_format: str, cache_dir: str, run_dir: str, epochs: int,
                 device: str = "cpu", extra: Optional[List[str]] = None) -> Dict[str, Any]:
    """``run_training`` for ``epochs`` epochs (protocol gr); each epoch's training loop is timed.

    Evaluation (only after the last epoch here) and checkpoint writes lie outside the timed
    ``_train_epoch`` calls, as they lie outside the reference's training tokens/s.
    """
    import numpy as np

    from benchmarks.common import peak_rss_mb
    from sidvid_rec.config import load_config
    from sidvid_rec.data import load_sequences, make_split
    from sidvid_rec.train import trainer

    cfg = load_config(config, _overrides(data_path, data_format, cache_dir, [
        "model.mode=id", "data.protocol=gr", f"train.epochs={epochs}", "train.eval_every=100000",
        f"train.device={device}", *(extra or [])]))
    data = load_sequences(cfg.data)
    split = make_split(data, "train", cfg.data.protocol, cfg.data.max_len)
    tokens = int(np.diff(split.offsets).sum()) - split.num_examples  # inputs: every item but the last
    epoch_s: List[float] = []
    epoch_cpu_s: List[float] = []
    original = trainer.Trainer._train_epoch

    def timed_epoch(*args: Any, **kwargs: Any) -> float:
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = original(*args, **kwargs)
        epoch_s.append(time.perf_counter() - start)
        epoch_cpu_s.append(time.process_time() - cpu_start)
        return loss

    trainer.Trainer._train_epoch = timed_epoch  # Trainer.fit looks it up at call time (self comes first in args)
    start = time.perf_counter()
    metrics = trainer.run_training(cfg, run_dir)
    return {"epoch_s": epoch_s, "epoch_cpu_s": epoch_cpu_s, "tokens_per_epoch": tokens, "sequences_per_epoch": split.num_examples,
            "total_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
            "test_hr10": metrics.get("test", {}).get("hr@10")}


def hstu_train_flops(lengths: List[int], dim: int, num_blocks: int, num_heads: int, dqk: int, dv: int) -> Dict[str, float]:
    """FLOPs of one HSTU encoder forward + backward over sequences of ``lengths``.

    Per layer, forward (T = sum L, S = sum L^2, one multiply-add = 2 FLOPs):
    ``uvqk``: 2 T d H(2 dv + 2 dqk); output projection: 2 T H dv d;
    attention: ``q k^T`` 2 S H dqk + ``A v`` 2 S H dv (the full L x L square per sequence: the
    reference computation, held fixed whatever part of it a kernel computes; a causal-only count
    would be about half).
    Backward = 2 x forward for every matmul (gradients of both operands), so training =
    3 x forward. Norms, SiLU, bias gathers and dropout (O(T d) and O(S)) are not counted.
    """
    tokens = float(sum(lengths))
    square = float(sum(l * l for l in lengths))
    linear = 2 * tokens * dim * num_heads * (2 * dv + 2 * dqk) + 2 * tokens * num_heads * dv * dim
    attention = 2 * square * num_heads * (dqk + dv)
    return {"linear": 3 * num_blocks * linear, "attention": 3 * num_blocks * attention,
            "total": 3 * num_blocks * (linear + attention), "tokens": tokens, "square": square}


def matmul_rate(n: int, repeats: int, device: str = "cpu", dtype: str = "float32") -> Dict[str, float]:
    """Best FLOP/s of ``[n, n] @ [n, n]`` in ``dtype`` over ``repeats`` runs (2 n^3 FLOPs each)."""
    import torch

    from benchmarks.common import synchronize

    kind = getattr(torch, dtype)
    a, b = torch.randn(n, n, device=device, dtype=kind), torch.randn(n, n, device=device, dtype=kind)
    out = torch.empty(n, n, device=device, dtype=kind)
    torch.matmul(a, b, out=out)  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"n": n, "best_flops": 2 * n**3 / min(times), "median_flops": 2 * n**3 / statistics.median(times)}


ENCODER_VARIANTS: Dict[str, Tuple[str, int]] = {
    "fp32, whole square (before)": ("fp32", 0),
    "fp32, block-causal (default)": ("fp32", 64),
    "bf16, block-causal": ("bf16", 64),
}
"""Encoder kernels the ``limit`` workload times side by side: (``train.precision``,
``train.attention_block``). The first is the kernel before block-causal attention (the baseline
of the ratios); the second is the default."""
DEFAULT_ENCODER_VARIANT = "fp32, block-causal (default)"


def _limit_workloads(ml100k_file: str, steps: int) -> Dict[str, Tuple[int, List[Tuple[Any, Any, Any]]]]:
    """The ``limit`` section's batches: real ML-100k (when present) and 8 synthetic sequences of 1000."""
    import numpy as np
    import torch

    from benchmarks import jagged_vs_padded as jvp
    from sidvid_rec.ops import jagged

    workloads = {}
    if os.path.exists(ml100k_file):
        jvp.DATA["ml-100k"] = (ml100k_file, 200)
        workloads["ML-100k batch (128 users, <= 200)"] = (200, [(ids, ts, off) for ids, ts, off in
                                                                 jvp.make_batches("ml-100k", steps + 1, seed=0)[0]])
    rng = np.random.default_rng(0)
    long_batches = []
    for _ in range(steps + 1):
        offsets = jagged.lengths_to_offsets(torch.full((8,), 1000, dtype=torch.int64))
        ts = torch.from_numpy(np.cumsum(rng.integers(1, 86400, size=8000)).astype(np.int64))
        long_batches.append((torch.zeros(8000, dtype=torch.int64), ts, offsets))
    workloads["synthetic 8 x 1000"] = (1000, long_batches)
    return workloads


def hstu_flops(ml100k_file: str, steps: int, matmul_n: int, matmul_repeats: int, device: str = "cpu",
               variants: Optional[Dict[str, Tuple[str, int]]] = None) -> Dict[str, Any]:
    """Encoder fwd+bwd FLOP/s on ML-100k batches and on long synthetic sequences, vs the matmul rate.

    The model is the ML-100k config's HSTU (d=50, 2 blocks, 1 head, dqk=dv=50, dropout 0.2). Each
    kernel of ``variants`` (default :data:`ENCODER_VARIANTS`) runs every batch, the variants
    interleaved batch by batch with their order rotated, the same weights and inputs for all.
    ``workloads`` holds the default variant's figures; ``variants`` every variant's.
    """
    import torch

    from benchmarks.common import synchronize
    from sidvid_rec.modules.hstu import HSTUEncoder
    from sidvid_rec.ops import hstu_attention, jagged

    variants = dict(ENCODER_VARIANTS if variants is None else variants)
    dims = dict(dim=50, num_blocks=2, num_heads=1, dqk=50, dv=50)
    rate_before = matmul_rate(matmul_n, matmul_repeats, device)
    rate_bf16 = matmul_rate(matmul_n, matmul_repeats, device, "bfloat16")
    results: Dict[str, Dict[str, Any]] = {}
    names = list(variants)
    for name, (max_len, batches) in _limit_workloads(ml100k_file, steps).items():
        torch.manual_seed(0)
        encoder = HSTUEncoder(max_len=max_len, dropout=0.2, attn_dropout=0.0, **dims).to(device)
        times: Dict[str, List[float]] = {v: [] for v in names}
        executed: Dict[str, List[int]] = {v: [] for v in names}
        flops = []
        for i, (_, ts, offsets) in enumerate(batches):
            ts, offsets = ts.to(device), offsets.to(device)
            tokens = int(offsets[-1])
            x = torch.randn(tokens, dims["dim"], device=device, requires_grad=True)
            grad = torch.randn(tokens, dims["dim"], device=device)
            for variant in names[i % len(names):] + names[:i % len(names)]:
                encoder.precision, encoder.causal_block = variants[variant]
                synchronize(device)
                start = time.perf_counter()
                encoder(x, offsets, ts).backward(grad)
                synchronize(device)
                if i > 0:  # the first batch warms every variant up
                    times[variant].append(time.perf_counter() - start)
                    plan = hstu_attention.build_attention_plan(offsets, ts, ts, None, max_len, 128, True,
                                                               causal_block=encoder.causal_block)
                    executed[variant].append(plan.executed_area())
            if i > 0:
                flops.append(hstu_train_flops(jagged.offsets_to_lengths(offsets).tolist(), **dims))
        total = sum(x["total"] for x in flops)
        results[name] = {variant: {
            "ms": 1e3 * statistics.median(times[variant]), "tokens": sum(x["tokens"] for x in flops) / len(flops),
            "flops_per_step": total / len(flops),
            "attention_share": sum(x["attention"] for x in flops) / total,
            "achieved_flops": total / sum(times[variant]),
            "executed_square_over_real": sum(executed[variant]) / sum(x["square"] for x in flops),
        } for variant in names}
    rate_after = matmul_rate(matmul_n, matmul_repeats, device)
    default = DEFAULT_ENCODER_VARIANT if DEFAULT_ENCODER_VARIANT in names else names[0]
    return {"matmul_before": rate_before, "matmul_after": rate_after, "matmul_bf16": rate_bf16,
            "workloads": {name: per[default] for name, per in results.items()}, "variants": results,
            "default_variant": default, "dims": dims}
