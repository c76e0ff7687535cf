"""Distributed checkpoints that survive a crash: ``torch.distributed.checkpoint`` data + a commit record.

Layout of ``RUN_DIR/checkpoints/``::

    epoch-3.pt                   commit record of the checkpoint taken after epoch 3
    epoch-3.<tag>.dcp/           its data: a torch.distributed.checkpoint directory
                                 (``.metadata`` + one ``__<rank>_0.distcp`` file per rank)
    step-140.pt                  a mid-epoch checkpoint (``train.checkpoint_every``) ...
    step-140.<tag>.dcp/          ... and its data
    best.pt                      record of the best epoch (points at that epoch's data)

**Atomic.** Every rank writes its own shards (sharded tables and their fused optimizer
state; rank 0 also the replicated dense tensors) into ``.<data>.tmp``; once all ranks are
done rank 0 renames it into place and only then writes the small record (temp file +
rename). A checkpoint exists iff its record does, so a process killed at any moment leaves
the previous checkpoints or the new one, never half of one; orphaned data and temporary
directories are removed by the next save. The data directory must be on a file system every
rank sees (one machine, or shared storage).

**Record** (``torch.save`` of plain Python values, read back with ``weights_only=True``):
the config fingerprint (a checkpoint of another model is refused in one line), the data
position (epochs done, batches of the next epoch done, optimizer steps), the trainer state
(early stopping, history), and the world size and sharding that wrote it.

**Resharding.** ``torch.distributed.checkpoint.load`` fills the *current* model's shards from
whatever shards were saved, so a run resumes on another number of ranks or sharding. The one
exception: row-wise Adagrad under column-wise sharding keeps one momentum per column shard,
whose size depends on the world size; such a mismatch is refused with the shapes named.
"""

import dataclasses
import hashlib
import json
import os
import re
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from sidvid_rec import storage
from sidvid_rec.config import Config
from sidvid_rec.errors import ArtifactError
from sidvid_rec.process_group import DistContext, barrier

RECORD_FORMAT = "sidvid_rec.checkpoint"
RECORD_VERSION = 2
BEST = "best"
_RECORD = re.compile(r"^(epoch|step)-(\d+)\.pt$")


def model_fingerprint(cfg: Config, num_items: int) -> str:
    """Hash of everything that decides parameter shapes and meaning."""
    shape = {"model": cfg.model.__dict__, "num_items": num_items, "max_len": cfg.data.max_len,
             "data_path": cfg.data.path, "format": cfg.data.format}
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class CheckpointRecord:
    """What a checkpoint is; the commit record stored as ``<name>.pt``."""

    name: str
    """``epoch-<n>``, ``step-<n>`` or ``best``."""
    fingerprint: str
    """:func:`model_fingerprint` of the run that wrote it."""
    epoch: int
    """Epochs completed."""
    batch: int
    """Batches of epoch ``epoch`` (0-based) already trained; 0 at an epoch's end."""
    step: int
    """Optimizer steps taken."""
    world_size: int
    """Ranks that wrote it (RNG streams are restored only on the same world size)."""
    sharding: str
    """``train.sharding`` of the run that wrote it."""
    train_state: Dict[str, Any] = field(default_factory=dict)
    """The trainer's :class:`~sidvid_rec.train.trainer.TrainState` as a dict."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Anything else the trainer needs to continue (e.g. the epoch's running loss)."""
    data: str = ""
    """Name of the data directory inside ``checkpoints/`` (set when saved)."""


# ----------------------------------------------------------------------------- paths


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def _record_names(directory: str) -> List[str]:
    return [n for n in storage.ls(directory) if _RECORD.match(n)] if storage.exists(directory) else []


def list_checkpoints(run_dir: str) -> List[str]:
    """Epoch-end checkpoint records of a run, oldest epoch first."""
    directory = checkpoint_dir(run_dir)
    names = [n for n in _record_names(directory) if n.startswith("epoch-")]
    names.sort(key=lambda n: int(_RECORD.match(n).group(2)))
    return [os.path.join(directory, n) for n in names]


def _position(path: str) -> Tuple[int, int]:
    """Sort key of a record: (step, 1 for an epoch record) -- at equal steps the epoch record
    (written after validation) is the more complete one."""
    record = read_record(path)
    return record.step, int(record.name.startswith("epoch-"))


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The record to resume from: the furthest in training (epoch or mid-epoch), or None."""
    directory = checkpoint_dir(run_dir)
    paths = [os.path.join(directory, n) for n in _record_names(directory)]
    return max(paths, key=_position) if paths else None


def best_checkpoint(run_dir: str) -> str:
    path = os.path.join(checkpoint_dir(run_dir), f"{BEST}.pt")
    if not storage.exists(path):
        raise ArtifactError(f"run directory {run_dir} has no checkpoint (expected {path}); train first")
    return path


def data_path(record_path: str, record: CheckpointRecord) -> str:
    return os.path.join(os.path.dirname(record_path), record.data)


# ----------------------------------------------------------------------------- records


def _write_record(path: str, record: CheckpointRecord) -> None:
    payload = {"format": RECORD_FORMAT, "version": RECORD_VERSION, **dataclasses.asdict(record)}
    with storage.atomic_open(path, "wb") as f:
        torch.save(payload, f)


def read_record(path: str, expected_fingerprint: Optional[str] = None) -> CheckpointRecord:
    """Reads a commit record; refuses a missing or foreign file and another model's checkpoint."""
    if not storage.exists(path):
        raise ArtifactError(f"checkpoint not found: {path}")
    try:
        with storage.open_file(path, "rb") as f:
            payload = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file: one message)
        raise ArtifactError(f"cannot read checkpoint {path}: {type(e).__name__}")
    if not isinstance(payload, dict) or payload.get("format") != RECORD_FORMAT:
        raise ArtifactError(f"{path} is not a sidvid-rec checkpoint record (an older format? train again)")
    if payload.get("version") != RECORD_VERSION:
        raise ArtifactError(f"{path}: checkpoint version {payload.get('version')} is not supported "
                            f"(expected {RECORD_VERSION})")
    names = {f.name for f in dataclasses.fields(CheckpointRecord)}
    record = CheckpointRecord(**{k: v for k, v in payload.items() if k in names})
    if expected_fingerprint is not None and record.fingerprint != expected_fingerprint:
        raise ArtifactError(
            f"checkpoint {path} was written for another model/data config "
            f"(fingerprint {record.fingerprint} != {expected_fingerprint})"
        )
    return record


# ----------------------------------------------------------------------------- saving


def _shared_tag(ctx: DistContext) -> str:
    """A random tag chosen by rank 0 and known to every rank (names the data directory)."""
    tag = [uuid.uuid4().hex[:8]]
    if ctx.world_size > 1:
        dist.broadcast_object_list(tag, src=0)
    return tag[0]


def save_checkpoint(run_dir: str, state: Dict[str, Any], record: CheckpointRecord, ctx: DistContext,
                    is_best: bool = False, keep: int = 2) -> str:
    """Writes ``state`` (nested dicts of tensors / ShardedTensors) and commits ``record``.

    Collective: every rank calls it with its own ``state``. Returns the record's path.

    Args:
        run_dir: the run directory (``checkpoints/`` inside it).
        state: what ``torch.distributed.checkpoint.save`` writes (each rank its shards).
        record: position and trainer state; ``record.name`` names the checkpoint.
        is_best: also point ``best.pt`` at this checkpoint.
        keep: epoch records kept (and mid-epoch records newer than the last epoch record).
    """
    directory = storage.expand(checkpoint_dir(run_dir))
    data = f"{record.name}.{_shared_tag(ctx)}.dcp"
    tmp = os.path.join(directory, f".{data}.tmp")
    if ctx.is_main:
        storage.mkdirs(tmp)
    barrier(ctx)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp))
    barrier(ctx)
    path = os.path.join(directory, f"{record.name}.pt")
    if ctx.is_main:
        storage.replace(tmp, os.path.join(directory, data))
        record = dataclasses.replace(record, data=data)
        _write_record(path, record)
        if is_best:
            _write_record(os.path.join(directory, f"{BEST}.pt"), dataclasses.replace(record, name=BEST))
        collect_garbage(directory, keep)
    barrier(ctx)
    return path


def collect_garbage(directory: str, keep: int = 2) -> None:
    """Drops old records and every data or temporary directory no remaining record uses.

    Keeps the newest ``keep`` epoch records, the mid-epoch records newer than the newest
    epoch record (at most ``keep``), and ``best.pt``. Call when no save is in flight.
    """
    names = _record_names(directory)
    epochs = sorted((n for n in names if n.startswith("epoch-")), key=lambda n: int(_RECORD.match(n).group(2)))
    steps = sorted((n for n in names if n.startswith("step-")), key=lambda n: int(_RECORD.match(n).group(2)))
    last_epoch_step = read_record(os.path.join(directory, epochs[-1])).step if epochs else -1
    live_steps = [n for n in steps if int(_RECORD.match(n).group(2)) > last_epoch_step][-keep:]
    for name in set(names) - set(epochs[-keep:]) - set(live_steps):
        storage.path_manager.rm(os.path.join(directory, name))
    kept = epochs[-keep:] + live_steps + ([f"{BEST}.pt"] if storage.exists(os.path.join(directory, f"{BEST}.pt")) else [])
    used = {read_record(os.path.join(directory, n)).data for n in kept}
    for entry in storage.ls(directory):
        stale = entry.endswith(".dcp") and entry not in used
        if stale or (entry.startswith(".") and ".tmp" in entry):
            storage.remove_tree(os.path.join(directory, entry))


def clear_checkpoints(run_dir: str) -> int:
    """Removes every checkpoint of a run (a fresh run in an old directory); returns how many records."""
    directory = checkpoint_dir(run_dir)
    count = len(_record_names(directory)) + int(storage.exists(os.path.join(directory, f"{BEST}.pt")))
    if storage.exists(directory):
        storage.remove_tree(directory)
    return count


# ----------------------------------------------------------------------------- loading


def flatten_keys(state: Dict[str, Any], prefix: str = "") -> Dict[str, torch.Size]:
    """``{dotted key: global shape}`` of every tensor leaf, as torch.distributed.checkpoint names them."""
    out: Dict[str, torch.Size] = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_keys(value, f"{name}."))
        elif isinstance(value, (torch.Tensor, ShardedTensor)):
            out[name] = value.size()
    return out


def _check_shapes(directory: str, state: Dict[str, Any], path: str) -> None:
    """Every tensor of ``state`` must be in the checkpoint with the same global shape."""
    try:
        saved = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"checkpoint {path}: its data {directory} is unreadable ({type(e).__name__})")
    for key, shape in flatten_keys(state).items():
        meta = saved.get(key)
        if not isinstance(meta, TensorStorageMetadata):
            raise ArtifactError(f"checkpoint {path} lacks {key}")
        if tuple(meta.size) != tuple(shape):
            raise ArtifactError(
                f"checkpoint {path}: {key} has shape {tuple(meta.size)}, this run needs {tuple(shape)} "
                "(column-wise sharded optimizer state resumes only on the same world size)"
            )


def load_checkpoint(path: str, state: Dict[str, Any], expected_fingerprint: Optional[str] = None) -> CheckpointRecord:
    """Fills ``state`` in place from the checkpoint of record ``path`` (collective); returns the record.

    ``state`` holds the current (possibly sharded) tensors; each rank reads the parts its
    shards need, whatever world size wrote them. Nothing is loaded when a check fails.
    """
    record = read_record(path, expected_fingerprint)
    directory = data_path(path, record)
    if not storage.exists(os.path.join(directory, ".metadata")):
        raise ArtifactError(f"checkpoint {path}: its data directory {directory} is missing or incomplete")
    _check_shapes(directory, state, path)
    dcp.load(state, storage_reader=dcp.FileSystemReader(directory))
    return record


def load_model_weights(path: str, model: torch.nn.Module, expected_fingerprint: Optional[str] = None) -> CheckpointRecord:
    """Loads only the model part of a checkpoint into a (DMP) model; returns the record."""
    state = {"model": model.state_dict()}
    record = load_checkpoint(path, state, expected_fingerprint)
    model.load_state_dict(state["model"])
    return record


def read_full_tensors(path: str, prefix: str = "model.", expected_fingerprint: Optional[str] = None
                      ) -> Tuple[CheckpointRecord, Dict[str, torch.Tensor]]:
    """Full (gathered) tensors under ``prefix`` of a checkpoint, in this process alone.

    Reads every rank's shard files; needs no process group and no model. Keys are returned
    without ``prefix`` (``embeddings.ebc.embedding_bags.item_id.weight`` ...).
    """
    record = read_record(path, expected_fingerprint)
    directory = data_path(path, record)
    if not storage.exists(os.path.join(directory, ".metadata")):
        raise ArtifactError(f"checkpoint {path}: its data directory {directory} is missing or incomplete")
    saved = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    tensors = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in saved.items()
               if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(tensors, storage_reader=dcp.FileSystemReader(directory), no_dist=True)
    return record, {key[len(prefix):]: value for key, value in tensors.items()}
