"""The training recipe, top to bottom: data -> model -> optimizers -> epochs -> best checkpoint.

Run directory layout::

    RUN_DIR/config.yaml          resolved config (what was trained)
    RUN_DIR/checkpoints/         epoch-<n>.pt (newest two), step-<n>.pt (mid-epoch), best.pt:
                                 commit records of torch.distributed.checkpoint directories
                                 (train/checkpoint.py), each written atomically
    RUN_DIR/history.json         per-epoch loss and validation metrics
    RUN_DIR/metrics.json         {"valid": {...}, "test": {...}} of the best checkpoint
    RUN_DIR/evaluations.json     the same, and every later `evaluate`, keyed by settings
    RUN_DIR/tb/                  TensorBoard scalars

Model selection: with ``protocol: loo`` the checkpoint with the best validation NDCG@10 is
kept and training stops after ``train.patience`` evaluations without improvement. With
``protocol: gr`` there is no validation split (generative-recommenders protocol), so no
selection is done: the last epoch is the "best" one and test metrics are logged per epoch
for the learning curve only.

Distributed: launched by ``torchrun``/TorchX, every rank runs this same recipe; each reads
its slice of every global batch, the tables are sharded (train/distributed.py), metrics are
reduced over ranks, and each rank's loss is scaled to its share of the global-batch mean, so
that the averaged gradients equal one process's (with ``model.dropout=0`` and
``loss.shared_negatives=true`` N ranks then train the very same model as one process). With ``train.resume=true`` training continues from the
furthest checkpoint (an epoch end or, with ``train.checkpoint_every``, a step inside an
epoch), on the same or another number of ranks; without it a run directory's old
checkpoints are removed first, so a later resume can never pick up a stale run.
"""

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from tqdm import tqdm

from sidvid_rec import storage
from sidvid_rec.config import Config, dump_config, with_absolute_paths
from sidvid_rec.data import SequenceData, load_sequences, make_split
from sidvid_rec.data.batches import BatchIterator, LookupBuilder, prefetch_to_device
from sidvid_rec.errors import ConfigError
from sidvid_rec.models.build import unwrap
from sidvid_rec.eval.evaluate import evaluate_model
from sidvid_rec.eval.records import METRICS_FILE, record_evaluation
from sidvid_rec.process_group import DistContext, all_reduce_sum, barrier, init_distributed
from sidvid_rec.train import checkpoint as ckpt
from sidvid_rec.train.distributed import build_sharded_model, set_bag_count_hooks
from sidvid_rec.train.optimizers import build_optimizers
from sidvid_rec.stack import require_fbgemm

require_fbgemm()
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist  # noqa: E402
from sidvid_rec.train.schedule import build_schedule

BATCH_LOOKUP_MODES = ("id", "sid", "sid_id")
"""Modes whose training step can take its table lookups from the batch (one HSTU item table
lookup + one sampled softmax); ``cobra`` and ``sid_gen`` build their KJTs in their forward."""


class _TqdmHandler(logging.Handler):
    """Writes records with ``tqdm.write`` (stdout, as before), so they never break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


log = logging.getLogger(__name__)
if not log.handlers:
    log.addHandler(_TqdmHandler())
    log.setLevel(logging.INFO)
    log.propagate = False  # the CLI silences other loggers; the trainer's lines are its progress report

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
        storage.mkdirs(run_dir)
        with storage.atomic_open(path, "w") as f:
            f.write(dump_config(cfg))
    barrier(ctx)


def _seed_streams(cfg: Config, rank: int, step: int, generator: torch.Generator) -> None:
    """Seeds the random streams: dropout (global torch RNG, CPU and CUDA, per rank) and negative sampling.

    Negatives are drawn per rank, except ``loss.shared_negatives``: one set for the whole
    global batch, so every rank draws the same set (as one process would).
    """
    seed = cfg.train.seed
    torch.manual_seed(seed * 1000 + 500 + rank + 7919 * step)  # seeds every CUDA device too
    generator.manual_seed(seed * 1000 + (0 if cfg.loss.shared_negatives else rank) + 7919 * step)


def negative_generator(device: torch.device) -> torch.Generator:
    """The negative-sampling generator, on the training device: the losses draw ids where the
    generator lives, so a CPU generator under CUDA training would draw on the CPU and copy the
    ids to the GPU every step (a host -> device copy and sync per draw)."""
    return torch.Generator(device=device)


def _global_mean_scale(num_positions: int, ctx: DistContext) -> float:
    """Factor that turns this rank's mean loss into its share of the global-batch mean.

    DDP and the fused table optimizer average gradients over ranks; each rank's loss is a
    mean over its own positions. Scaling by ``W * n_rank / n_global`` makes the averaged
    gradient the gradient of the mean over the whole global batch, as in one process.
    """
    if ctx.world_size == 1:
        return 1.0
    total = all_reduce_sum(torch.tensor([float(num_positions)], dtype=torch.float64), ctx)
    return ctx.world_size * num_positions / max(float(total[0]), 1.0)


def uses_batch_lookups(cfg: Config) -> bool:
    """Whether the training batches carry the lookups' KJT (``train.batch_lookups`` or the pipeline)."""
    return cfg.train.batch_lookups or cfg.train.pipeline == "sparse_dist"


def check_batch_lookups(cfg: Config, ctx: DistContext) -> None:
    """One-line :class:`ConfigError` for a setting batch-side lookups / the pipeline cannot run."""
    if not uses_batch_lookups(cfg):
        return
    what = "train.pipeline=sparse_dist" if cfg.train.pipeline == "sparse_dist" else "train.batch_lookups=true"
    if cfg.model.mode not in BATCH_LOOKUP_MODES:
        raise ConfigError(f"{what} needs batch-side lookups, which model.mode={cfg.model.mode} does not have "
                          f"(it builds its KJTs in the forward); use model.mode {'/'.join(BATCH_LOOKUP_MODES)} "
                          "or train.pipeline=plain")
    if cfg.loss.negatives != "uniform":
        raise ConfigError(f"{what} draws uniform negatives in the data loader; loss.negatives={cfg.loss.negatives} "
                          "is not supported there (use loss.negatives=uniform)")


def lookup_builder(cfg: Config, model: torch.nn.Module) -> Optional[LookupBuilder]:
    """The data loader's :class:`LookupBuilder` for ``model``'s tables, or None without batch-side lookups."""
    if not uses_batch_lookups(cfg):
        return None
    emb = unwrap(model).embeddings
    return LookupBuilder(emb.num_items, cfg.loss.num_negatives, cfg.loss.shared_negatives, emb.feature_names,
                         emb.sid_prefix_table if emb.uses_sid else None, seed=cfg.train.seed)


LOG_EVERY = 10
"""Steps between two reads of the loss for the progress bar and TensorBoard (each read is a
device -> host copy; the epoch's loss is accumulated on the device in between)."""


class LossTotals:
    """The epoch's running ``(sum of loss * scale, batches)``: the sum a float64 tensor on the
    training device (``add`` never reads the loss back to the host), the count a host number.

    Args:
        loss_sum, loss_count: totals carried over (a resumed epoch's, on rank 0).
        device: where the loss tensors live.
    """

    def __init__(self, loss_sum: float, loss_count: float, device: torch.device) -> None:
        self.sum = torch.tensor(float(loss_sum), dtype=torch.float64, device=device)
        self.count = float(loss_count)

    def add(self, loss: torch.Tensor, scale: float) -> None:
        self.sum += loss.detach().to(torch.float64) * scale
        self.count += 1.0

    def reduced(self, ctx: DistContext) -> tuple:
        """``(sum, count)`` summed over ranks, as host floats (one read of the device sum)."""
        total = torch.stack([self.sum.cpu(), torch.tensor(self.count, dtype=torch.float64)])
        total = all_reduce_sum(total, ctx)
        return float(total[0]), float(total[1])


def _checked_batches(batches, num_items: int):
    """``batches`` (CPU) with their item ids checked on the host (one line on a bad id)."""
    for batch in batches:
        batch.check_item_ids(num_items)
        yield batch


@dataclass
class Position:
    """Where to continue inside the epoch ``TrainState.epoch`` (restored from a checkpoint)."""

    batch: int = 0
    """Batches of that epoch already trained."""
    loss_sum: float = 0.0
    """Sum over ranks and trained batches of the batch losses (the epoch's mean loss continues)."""
    loss_count: float = 0.0
    """Batches behind ``loss_sum``, summed over ranks."""


class Trainer:
    """The state one training run shares across its epochs: model, optimizers, batches, the
    negative-sampling generator, where training stands, and where it writes.

    Built by :func:`run_training`; :meth:`fit` is the epoch loop.
    """

    def __init__(self, cfg: Config, run_dir: str, ctx: DistContext, data: SequenceData) -> None:
        self.cfg, self.run_dir, self.ctx = cfg, run_dir, ctx
        check_batch_lookups(cfg, ctx)
        self.select = selection_split(cfg.data.protocol)
        self.select_split = make_split(data, self.select, cfg.data.protocol, cfg.data.max_len)
        self.model = build_sharded_model(cfg, data, ctx)
        self.optimizers = build_optimizers(self.model, cfg.train)
        self.fingerprint = ckpt.model_fingerprint(cfg, data.num_items)
        self.data_fingerprint = data.fingerprint
        self.num_items = data.num_items
        self.generator = negative_generator(ctx.device)
        _seed_streams(cfg, ctx.rank, 0, self.generator)
        self.state, self.position = TrainState(), Position()
        train_split = make_split(data, "train", cfg.data.protocol, cfg.data.max_len)
        self.batches = BatchIterator(train_split, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                                     rank=ctx.rank, world_size=ctx.world_size,
                                     lookups=lookup_builder(cfg, self.model))
        # Warm-up / cosine lr (train/schedule.py); None for a constant lr. Built before a
        # restore, so its base lr are the configured ones.
        self.schedule = build_schedule(self.optimizers, cfg.train, len(self.batches))
        self.writer = None

    def start(self) -> None:
        """Resumes from the furthest checkpoint (``train.resume``) or clears old ones; writes ``config.yaml``."""
        latest = ckpt.latest_checkpoint(self.run_dir) if self.cfg.train.resume else None
        if latest is not None:
            self._restore(latest)
        elif self.ctx.is_main:
            removed = ckpt.clear_checkpoints(self.run_dir)
            if removed:
                log.info(f"fresh run (train.resume=false): removed {removed} old checkpoint(s) of {self.run_dir}")
        prepare_run_dir(self.cfg, self.run_dir, self.ctx)
        self.writer = _tensorboard(self.run_dir) if self.ctx.is_main else None

    def fit(self) -> None:
        """Epochs from where the state stands until the last, early stopping or ``train.max_steps``."""
        cfg, state = self.cfg, self.state
        for epoch in range(state.epoch, cfg.train.epochs):
            loss = self._train_epoch(epoch)
            self.position = Position()
            state.epoch = epoch + 1
            record: Dict[str, float] = {"epoch": state.epoch, "loss": loss, "step": state.step}
            stop = False
            if state.epoch % cfg.train.eval_every == 0 or state.epoch == cfg.train.epochs:
                metrics = evaluate_model(self.model, self.select_split, cfg, self.ctx)
                record.update({f"{self.select}/{k}": v for k, v in metrics.items()})
                stop = _update_selection(state, metrics[SELECT_METRIC], cfg)
                if self.writer is not None:
                    for k, v in metrics.items():
                        self.writer.add_scalar(f"{self.select}/{k}", v, state.epoch)
            state.history.append(record)
            self._save(f"epoch-{state.epoch}", self.position, is_best=state.best_epoch == state.epoch)
            if self.ctx.is_main:
                storage.write_json(os.path.join(self.run_dir, "history.json"), state.history)
                log.info(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            if stop or (cfg.train.max_steps and state.step >= cfg.train.max_steps):
                break
        if self.writer is not None:
            self.writer.close()

    def _train_epoch(self, epoch: int) -> float:
        """Trains one epoch from batch ``position.batch``; returns the epoch's mean loss over ranks."""
        cfg, ctx, state, position = self.cfg, self.ctx, self.state, self.position
        self.model.train()
        self.batches.set_epoch(epoch, start_batch=position.batch)
        # Rank 0 carries the (already reduced) totals of the batches trained before a resume.
        losses = LossTotals(position.loss_sum if ctx.is_main else 0.0, position.loss_count if ctx.is_main else 0.0,
                            ctx.device)
        every = cfg.train.checkpoint_every
        progress = tqdm(self.batches, total=len(self.batches), initial=position.batch, desc=f"epoch {epoch + 1}",
                        disable=not ctx.is_main, leave=False, dynamic_ncols=True)
        checked = _checked_batches(progress, self.num_items)  # ids checked on the host, before the copy
        steps = self._pipeline_steps(checked) if cfg.train.pipeline == "sparse_dist" else self._plain_steps(checked)
        # Batch-side lookups come padded to equal bag counts on every rank: no padding hooks.
        set_bag_count_hooks(self.model, not uses_batch_lookups(cfg))
        try:
            for index, (loss, scale) in enumerate(steps, start=position.batch):
                state.step += 1
                # Summed over ranks, loss * scale is W times the global-batch mean (and 1 is W).
                losses.add(loss, scale)  # a device tensor: read at log time only (no sync per step)
                if ctx.is_main and state.step % LOG_EVERY == 0:
                    value = float(loss.detach())
                    progress.set_postfix(loss=f"{value:.4f}")
                    if self.writer is not None:
                        self.writer.add_scalar("train/loss", value, state.step)
                if cfg.train.max_steps and state.step >= cfg.train.max_steps:
                    break
                if every and state.step % every == 0 and index + 1 < len(self.batches):
                    loss_sum, loss_count = losses.reduced(ctx)
                    self._save(f"step-{state.step}", Position(index + 1, loss_sum, loss_count))
        finally:
            steps.close()  # the pipeline gives the model its own forwards back (evaluation looks up by itself)
            set_bag_count_hooks(self.model, True)
        loss_sum, loss_count = losses.reduced(ctx)
        return loss_sum / max(loss_count, 1.0)

    def _plain_steps(self, batches) -> Iterator[Tuple[torch.Tensor, float]]:
        """The plain loop (the reference): ``(loss, scale)`` of every batch trained."""
        for batch in prefetch_to_device(batches, self.ctx.device):
            # Before the forward: the fused table update runs inside backward, with the lr its
            # kernel took at the forward on the CPU (fbgemm's CPU lookup reads the lr tensor
            # there), so a schedule applied after the forward reached the tables one step late.
            if self.schedule is not None:
                self.schedule.apply(self.state.step)
            out = self.model(batch, generator=self.generator)
            scale = _global_mean_scale(out.num_positions, self.ctx)
            self.optimizers.zero_grad()
            (out.loss * scale).backward()
            self.optimizers.step()
            yield out.loss, scale

    def _pipeline_steps(self, batches) -> Iterator[Tuple[torch.Tensor, float]]:
        """The steps through torchrec's ``TrainPipelineSparseDist`` (``train.pipeline=sparse_dist``):
        it copies batch i+2 and distributes batch i+1's lookup input while batch i trains, and runs
        zero_grad / backward / optimizer step itself. Same ``(loss, scale)`` per batch as the plain loop."""
        ctx = self.ctx

        def forward(batch):
            out = self.model(batch)  # the negatives come with the batch: no generator
            scale = _global_mean_scale(out.num_positions, ctx)
            return out.loss * scale, (out.loss.detach(), scale)

        pipeline = TrainPipelineSparseDist(self.model, self.optimizers, ctx.device, custom_model_fwd=forward)
        # The pipeline copies with non_blocking=True on its own stream: from pinned memory on CUDA.
        it = (batch.pin_memory() for batch in batches) if ctx.device.type == "cuda" else iter(batches)
        try:
            while True:
                if self.schedule is not None:  # before progress(), as the plain loop: before the forward
                    self.schedule.apply(self.state.step)
                try:
                    loss, scale = pipeline.progress(it)
                except StopIteration:
                    return
                yield loss, scale
        finally:
            pipeline.detach()

    def _checkpoint_state(self, with_rng: bool = True) -> Dict[str, object]:
        """What a checkpoint holds: model (sharded tables + dense), both optimizers, this rank's RNG."""
        state: Dict[str, object] = {"model": self.model.state_dict(), "optim": self.optimizers.checkpoint_state()}
        if with_rng:
            state["rng"] = {f"rank{self.ctx.rank}": ckpt.rng_state(self.generator, self.ctx.device)}
        return state

    def _save(self, name: str, position: Position, is_best: bool = False) -> None:
        record = ckpt.CheckpointRecord(
            name=name, fingerprint=self.fingerprint, epoch=self.state.epoch, batch=position.batch,
            step=self.state.step, world_size=self.ctx.world_size, sharding=self.cfg.train.sharding,
            train_state=asdict(self.state), extra={"loss_sum": position.loss_sum, "loss_count": position.loss_count,
                                                   **({} if self.schedule is None else {"schedule": self.schedule.state()})},
            data_fingerprint=self.data_fingerprint,
        )
        ckpt.save_checkpoint(self.run_dir, self._checkpoint_state(), record, self.ctx, is_best=is_best)

    def _restore(self, path: str) -> None:
        """Loads a checkpoint into the live model/optimizers (any world size) and continues from it."""
        ctx = self.ctx
        record = ckpt.read_record(path, self.fingerprint, self.data_fingerprint)
        same_ranks = record.world_size == ctx.world_size
        state = self._checkpoint_state(with_rng=same_ranks)
        # RNG entries are optional: a checkpoint written before the CUDA RNG was saved (or on
        # another device, whose generator state has another size) still loads.
        dropped: List[str] = []
        ckpt.load_checkpoint(path, state, self.fingerprint, self.data_fingerprint, optional=("rng.",), dropped=dropped)
        self.model.load_state_dict(state["model"])
        self.optimizers.load_checkpoint_state(state["optim"])
        note = ""
        if same_ranks:
            missing = ckpt.restore_rng_state(state["rng"][f"rank{ctx.rank}"], self.generator, ctx.device)
            if missing:  # re-seed by the step (seeds CPU, CUDA and the generator), keep what was restored
                restored = ckpt.rng_state(self.generator, ctx.device)
                _seed_streams(self.cfg, ctx.rank, record.step, self.generator)
                for name, value in restored.items():
                    if name not in missing:
                        ckpt.restore_rng_state({name: value}, self.generator, ctx.device)
                note = f"; random streams not in the checkpoint ({', '.join(missing)}) re-seeded"
        else:  # RNG streams are per rank: a new world size gets fresh streams, seeded by the step
            _seed_streams(self.cfg, ctx.rank, record.step, self.generator)
        if ctx.is_main:
            note = note if same_ranks else f"; {record.world_size} -> {ctx.world_size} ranks, random streams re-seeded"
            log.info(f"resumed from {path} (epoch {record.epoch}, batch {record.batch}, step {record.step}{note})")
        if self.schedule is not None:
            self.schedule.load_state(record.extra.get("schedule", {}))
        self.position = Position(record.batch, float(record.extra.get("loss_sum", 0.0)),
                                 float(record.extra.get("loss_count", 0.0)))
        self.state = TrainState(**record.train_state)


def run_training(cfg: Config, run_dir: str, ctx: Optional[DistContext] = None) -> Dict[str, Dict[str, float]]:
    """Trains ``cfg`` into ``run_dir`` and returns the best checkpoint's metrics."""
    cfg = with_absolute_paths(cfg)  # config.yaml must mean the same data from any directory
    ctx = ctx or init_distributed(cfg.train.device)
    if cfg.train.checkpoint_every < 0:
        raise ConfigError(f"train.checkpoint_every must be >= 0, got {cfg.train.checkpoint_every}")
    # Dense parameters start identical on every rank (DDP also broadcasts them); tables are
    # drawn from seeded generators independent of the world size (distributed.init_tables).
    torch.manual_seed(cfg.train.seed)
    data = load_sequences(cfg.data, write_cache=ctx.is_main)
    trainer = Trainer(cfg, run_dir, ctx, data)
    trainer.start()
    trainer.fit()
    return finalize(cfg, run_dir, ctx)


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


def _tensorboard(run_dir: str):
    from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard is slow to import and only rank 0 writes

    return SummaryWriter(log_dir=os.path.join(run_dir, "tb"))


def finalize(cfg: Config, run_dir: str, ctx: DistContext) -> Dict[str, Dict[str, float]]:
    """Evaluates the best checkpoint on every split and writes ``metrics.json``."""
    data = load_sequences(cfg.data)
    model = build_sharded_model(cfg, data, ctx)
    record = ckpt.load_model_weights(ckpt.best_checkpoint(run_dir), model, ckpt.model_fingerprint(cfg, data.num_items),
                                     data.fingerprint)
    splits = ["valid", "test"] if cfg.data.protocol == "loo" else ["test"]
    results = {s: evaluate_model(model, make_split(data, s, cfg.data.protocol, cfg.data.max_len), cfg, ctx)
               for s in splits}
    results["best_epoch"] = record.train_state["best_epoch"]
    if ctx.is_main:
        storage.write_json(os.path.join(run_dir, METRICS_FILE), results)
        for split in splits:
            record_evaluation(run_dir, cfg, cfg, split, results[split])
    return results
