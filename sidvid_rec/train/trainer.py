"""The training recipe, top to bottom: data -> model -> optimizers -> epochs -> best checkpoint.

Run directory layout::

    RUN_DIR/config.yaml          resolved config (what was trained)
    RUN_DIR/checkpoints/         epoch-<n>.pt (newest two) and best.pt, each written atomically
    RUN_DIR/history.json         per-epoch loss and validation metrics
    RUN_DIR/metrics.json         {"valid": {...}, "test": {...}} of the best checkpoint
    RUN_DIR/tb/                  TensorBoard scalars

Model selection: with ``protocol: loo`` the checkpoint with the best validation NDCG@10 is
kept and training stops after ``train.patience`` evaluations without improvement. With
``protocol: gr`` there is no validation split (generative-recommenders protocol), so no
selection is done: the last epoch is the "best" one and test metrics are logged per epoch
for the learning curve only.
"""

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
from tqdm import tqdm

from sidvid_rec import io
from sidvid_rec.config import Config, config_from_dict, dump_config
from sidvid_rec.data import load_sequences, make_split
from sidvid_rec.data.batches import BatchIterator
from sidvid_rec.errors import ArtifactError
from sidvid_rec.models.builder import build_model, evaluate_model
from sidvid_rec.train import checkpoint as ckpt
from sidvid_rec.train.distributed import DistContext, all_reduce_sum, barrier, init_distributed
from sidvid_rec.train.sharding import TrainingOptimizers, build_optimizers, gather_state_dict

SELECT_METRIC = "ndcg@10"


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_metric: float = -math.inf
    best_epoch: int = -1
    evals_without_improvement: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)


def selection_split(protocol: str) -> str:
    return "valid" if protocol == "loo" else "test"


def prepare_run_dir(cfg: Config, run_dir: str, ctx: DistContext) -> None:
    """Writes ``config.yaml``; on resume, refuses a run directory trained with another model."""
    path = os.path.join(run_dir, "config.yaml")
    if ctx.is_main:
        io.mkdirs(run_dir)
        with io.atomic_open(path, "w") as f:
            f.write(dump_config(cfg))
    barrier(ctx)


def _seed_everything(seed: int, rank: int) -> None:
    # Dense parameters start identical on every rank (DDP also broadcasts them); dropout and
    # negative sampling differ per rank through the generator seeded with the rank below.
    torch.manual_seed(seed)


def run_training(cfg: Config, run_dir: str, ctx: Optional[DistContext] = None) -> Dict[str, Dict[str, float]]:
    """Trains ``cfg`` into ``run_dir`` and returns the best checkpoint's metrics."""
    ctx = ctx or init_distributed(cfg.train.device)
    _seed_everything(cfg.train.seed, ctx.rank)
    data = load_sequences(cfg.data, write_cache=ctx.is_main)
    train_split = make_split(data, "train", cfg.data.protocol, cfg.data.max_len)
    select = selection_split(cfg.data.protocol)
    select_split = make_split(data, select, cfg.data.protocol, cfg.data.max_len)

    model = build_model(cfg, data, ctx)
    optimizers = build_optimizers(model, cfg.train, ctx)
    fingerprint = ckpt.model_fingerprint(cfg, data.num_items)
    state = TrainState()
    generator = torch.Generator(device="cpu").manual_seed(cfg.train.seed * 1000 + ctx.rank)

    if cfg.train.resume:
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is not None:
            state = _restore(latest, fingerprint, model, optimizers, generator)
    prepare_run_dir(cfg, run_dir, ctx)

    batches = BatchIterator(train_split, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                            rank=ctx.rank, world_size=ctx.world_size)
    writer = _tensorboard(run_dir) if ctx.is_main else None
    for epoch in range(state.epoch, cfg.train.epochs):
        loss = _train_epoch(model, optimizers, batches, epoch, state, generator, cfg, ctx, writer)
        state.epoch = epoch + 1
        record: Dict[str, float] = {"epoch": state.epoch, "loss": loss, "step": state.step}
        stop = False
        if state.epoch % cfg.train.eval_every == 0 or state.epoch == cfg.train.epochs:
            metrics = evaluate_model(model, select_split, cfg, ctx)
            record.update({f"{select}/{k}": v for k, v in metrics.items()})
            stop = _update_selection(state, metrics[SELECT_METRIC], cfg)
            if writer is not None:
                for k, v in metrics.items():
                    writer.add_scalar(f"{select}/{k}", v, state.epoch)
        state.history.append(record)
        _save(run_dir, model, optimizers, generator, state, fingerprint, ctx, is_best=state.best_epoch == state.epoch)
        if ctx.is_main:
            io.write_json(os.path.join(run_dir, "history.json"), state.history)
            tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if stop or (cfg.train.max_steps and state.step >= cfg.train.max_steps):
            break
    if writer is not None:
        writer.close()
    return finalize(cfg, run_dir, ctx)


def _train_epoch(model, optimizers: TrainingOptimizers, batches: BatchIterator, epoch: int, state: TrainState,
                 generator: torch.Generator, cfg: Config, ctx: DistContext, writer) -> float:
    model.train()
    batches.set_epoch(epoch)
    total, count = torch.zeros(2, dtype=torch.float64), 0
    progress = tqdm(batches, total=len(batches), desc=f"epoch {epoch + 1}", disable=not ctx.is_main,
                    leave=False, dynamic_ncols=True)
    for batch in progress:
        batch = batch.to(ctx.device)
        out = model(batch, generator=generator)
        optimizers.zero_grad()
        out.loss.backward()
        optimizers.step()
        state.step += 1
        total += torch.tensor([float(out.loss.detach()), 1.0], dtype=torch.float64)
        count += 1
        if ctx.is_main and state.step % 10 == 0:
            progress.set_postfix(loss=f"{float(out.loss.detach()):.4f}")
            if writer is not None:
                writer.add_scalar("train/loss", float(out.loss.detach()), state.step)
        if cfg.train.max_steps and state.step >= cfg.train.max_steps:
            break
    total = all_reduce_sum(total, ctx)
    return float(total[0] / max(total[1], 1.0))


def _update_selection(state: TrainState, value: float, cfg: Config) -> bool:
    """Records an evaluation; returns True when early stopping should end training."""
    if cfg.data.protocol == "gr":  # no validation split: keep the latest
        state.best_metric, state.best_epoch = value, state.epoch
        return False
    if value > state.best_metric:
        state.best_metric, state.best_epoch, state.evals_without_improvement = value, state.epoch, 0
        return False
    state.evals_without_improvement += 1
    return state.evals_without_improvement >= cfg.train.patience


def _save(run_dir, model, optimizers, generator, state, fingerprint, ctx, is_best: bool) -> None:
    payload = {
        "fingerprint": fingerprint,
        "model": gather_state_dict(model.state_dict()),
        "optimizers": optimizers.state_dict(),
        "train_state": asdict(state),
        "rng": {"torch": torch.get_rng_state(), "generator": generator.get_state()},
        "world_size": ctx.world_size,
    }
    if ctx.is_main:
        ckpt.save_checkpoint(run_dir, f"epoch-{state.epoch}.pt", payload)
        if is_best:
            ckpt.save_checkpoint(run_dir, "best.pt", payload)
    barrier(ctx)


def _restore(path, fingerprint, model, optimizers, generator) -> TrainState:
    payload = ckpt.load_checkpoint(path, fingerprint)
    model.load_state_dict(payload["model"])
    optimizers.load_state_dict(payload["optimizers"])
    torch.set_rng_state(payload["rng"]["torch"])
    generator.set_state(payload["rng"]["generator"])
    tqdm.write(f"resumed from {path} (epoch {payload['train_state']['epoch']})")
    return TrainState(**payload["train_state"])


def _tensorboard(run_dir: str):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=os.path.join(run_dir, "tb"))


def load_run_config(run_dir: str) -> Config:
    import yaml

    path = os.path.join(run_dir, "config.yaml")
    if not io.exists(path):
        raise ArtifactError(f"{run_dir} is not a run directory (no config.yaml)")
    with io.open_file(path, "r") as f:
        return config_from_dict(yaml.safe_load(f))


def finalize(cfg: Config, run_dir: str, ctx: DistContext) -> Dict[str, Dict[str, float]]:
    """Evaluates the best checkpoint on every split and writes ``metrics.json``."""
    data = load_sequences(cfg.data)
    model = build_model(cfg, data, ctx)
    payload = ckpt.load_checkpoint(ckpt.best_checkpoint(run_dir), ckpt.model_fingerprint(cfg, data.num_items))
    model.load_state_dict(payload["model"])
    splits = ["valid", "test"] if cfg.data.protocol == "loo" else ["test"]
    results = {s: evaluate_model(model, make_split(data, s, cfg.data.protocol, cfg.data.max_len), cfg, ctx)
               for s in splits}
    results["best_epoch"] = payload["train_state"]["best_epoch"]
    if ctx.is_main:
        io.write_json(os.path.join(run_dir, "metrics.json"), results)
    return results
