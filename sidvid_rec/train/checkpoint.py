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
directories are removed by the next save. A save that fails (disk full, read-only directory)
removes its own temporaries and raises one :class:`~sidvid_rec.errors.ArtifactError` on every
rank. The data directory must be on a file system every rank sees (one machine, or shared
storage).

**Record** (``torch.save`` of plain Python values, read back with ``weights_only=True``):
the config fingerprint (a checkpoint of another model is refused in one line), the data
fingerprint (a checkpoint whose training data changed since is refused), the data position
(epochs done, batches of the next epoch done, optimizer steps), the trainer state (early
stopping, history), the world size and sharding that wrote it, and the sha256 of every file
of its data directory (the manifest, written by rank 0 between the last shard and the commit).

**Trust model.** A run directory may come from someone else, and torch.distributed.checkpoint
stores its ``.metadata`` as a pickle, which ``FileSystemReader`` would load with ``pickle.load``
(running whatever code it names). So, before DCP opens anything, every file of the data
directory is checked against the record's manifest (a missing, extra, truncated or modified
file is refused in one line), and ``.metadata`` is then read by :class:`SafeFileSystemReader`,
whose unpickler builds only the classes a DCP ``Metadata`` is made of; any other global is
refused. The manifest is not signed: it catches accidents (a cut-short copy, a full disk, a
file edited or swapped by hand), not someone who rewrites the files and their hashes alike.
What stops code execution is the restricted unpickler, together with loading only tensors
(shards are read with ``torch.load(weights_only=True)``; DCP would read a non-tensor entry with
``weights_only=False``, so a state holding one is refused). Records are read with
``weights_only=True``. Records written before the manifest existed (version 2) are refused
unless ``SIDVID_ALLOW_UNVERIFIED_CHECKPOINTS=1`` is set (the restricted unpickler still applies).
Hashing reads every byte once more (rank 0 when saving, each loading process when loading); a
file swapped between the check and DCP's read escapes the manifest, not the unpickler.

**Resharding.** ``torch.distributed.checkpoint.load`` fills the *current* model's shards from
whatever shards were saved, so a run resumes on another number of ranks or sharding. The one
exception: row-wise Adagrad under column-wise sharding keeps one momentum per column shard,
whose size depends on the world size; such a mismatch is refused with the shapes named.
"""

import dataclasses
import functools
import hashlib
import json
import os
import re
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from sidvid_rec import artifacts, storage
from sidvid_rec.config import Config
from sidvid_rec.errors import ArtifactError, UserError
from sidvid_rec.process_group import DistContext
from sidvid_rec.train.safe_dcp import SafeFileSystemReader, _describe, _unwrap

RECORD_FORMAT = "sidvid_rec.checkpoint"
RECORD_VERSION = 3
_LEGACY_VERSIONS = (2,)
"""Record versions still read: written before the manifest and the data fingerprint."""
ALLOW_UNVERIFIED_ENV = "SIDVID_ALLOW_UNVERIFIED_CHECKPOINTS"
"""Set to ``1`` to load a checkpoint that has no manifest (a version-2 record) without verification."""
BEST = "best"
_RECORD = re.compile(r"^(epoch|step)-(\d+)\.pt$")
_DATA_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*\.dcp$")
"""A data directory is a plain name inside ``checkpoints/`` (a record cannot point elsewhere)."""


FINGERPRINT_ADDED_KEYS = {"cobra_sid_head": "whole", "sid_gen_item_ids": False,
                          "sid_gen_prefix_inputs": False, "sid_gen_item_output": False,
                          "sid_gen_node_output": False}
"""``model.*`` keys added after runs were fingerprinted, each with the value that means the old
behaviour: at that value a key is left out of the hash, so the runs written before it keep
their fingerprints (and their checkpoints load); any other value is hashed as usual."""


def model_fingerprint(cfg: Config, num_items: int) -> str:
    """Hash of everything that decides parameter shapes and meaning."""
    model = {key: value for key, value in cfg.model.__dict__.items()
             if key not in FINGERPRINT_ADDED_KEYS or value != FINGERPRINT_ADDED_KEYS[key]}
    shape = {"model": model, "num_items": num_items, "max_len": cfg.data.max_len,
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
    files: Optional[Dict[str, str]] = None
    """sha256 of every file of the data directory, by relative path (set when saved; None in
    version-2 records, which are loaded only on request, see :data:`ALLOW_UNVERIFIED_ENV`)."""
    data_fingerprint: str = ""
    """``SequenceData.fingerprint`` of the training data, set by the caller. Empty in records
    written before it existed (or by a caller that does not pass it): those are accepted
    whatever data the reader has."""


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


def read_record(path: str, expected_fingerprint: Optional[str] = None,
                expected_data_fingerprint: Optional[str] = None) -> CheckpointRecord:
    """Reads a commit record; refuses a missing or foreign file, another model's checkpoint and,
    when ``expected_data_fingerprint`` is given, one trained on other data (records without a
    data fingerprint are accepted: they predate it)."""
    if not storage.exists(path):
        raise ArtifactError(f"checkpoint not found: {path}")
    try:
        with storage.open_file(path, "rb") as f:
            payload = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file: one message)
        raise ArtifactError(f"cannot read checkpoint {path}: {type(e).__name__}")
    if not isinstance(payload, dict) or payload.get("format") != RECORD_FORMAT:
        raise ArtifactError(f"{path} is not a sidvid-rec checkpoint record (an older format? train again)")
    if payload.get("version") not in (RECORD_VERSION, *_LEGACY_VERSIONS):
        raise ArtifactError(f"{path}: checkpoint version {payload.get('version')} is not supported "
                            f"(expected {RECORD_VERSION})")
    names = {f.name for f in dataclasses.fields(CheckpointRecord)}
    try:
        record = CheckpointRecord(**{k: v for k, v in payload.items() if k in names})
    except TypeError as e:  # a field missing from a hand-made record
        raise ArtifactError(f"{path} is not a complete checkpoint record ({e})")
    if expected_fingerprint is not None and record.fingerprint != expected_fingerprint:
        raise ArtifactError(
            f"checkpoint {path} was written for another model/data config "
            f"(fingerprint {record.fingerprint} != {expected_fingerprint})"
        )
    if expected_data_fingerprint and record.data_fingerprint and record.data_fingerprint != expected_data_fingerprint:
        raise ArtifactError(
            f"checkpoint {path}: the data changed since training (data fingerprint then "
            f"{record.data_fingerprint}, now {expected_data_fingerprint}); train again on the current data"
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

    Collective: every rank calls it with its own ``state``. Returns the record's path. When any
    rank fails to write (disk full, read-only directory ...) every rank raises one
    :class:`ArtifactError` and this save leaves nothing behind (earlier checkpoints stay).

    Args:
        run_dir: the run directory (``checkpoints/`` inside it).
        state: what ``torch.distributed.checkpoint.save`` writes (each rank its shards).
        record: position and trainer state; ``record.name`` names the checkpoint. Set
            ``record.data_fingerprint`` so that a later load can refuse changed data.
        is_best: also point ``best.pt`` at this checkpoint.
        keep: epoch records kept (and mid-epoch records newer than the last epoch record).
    """
    leaves = _non_tensor_leaves(state)
    if leaves:  # they would be stored as pickles that only an unrestricted torch.load reads back
        raise TypeError(f"checkpoint state must hold only tensors; not tensors: {leaves[:5]}")
    directory = storage.expand(checkpoint_dir(run_dir))
    data = f"{record.name}.{_shared_tag(ctx)}.dcp"
    tmp = os.path.join(directory, f".{data}.tmp")
    path = os.path.join(directory, f"{record.name}.pt")
    what = f"checkpoint {record.name} to {directory}"
    drop_tmp = functools.partial(storage.remove_tree, tmp)
    _on_all_ranks(ctx, functools.partial(storage.mkdirs, tmp) if ctx.is_main else _nothing, what, drop_tmp)
    _on_all_ranks(ctx, functools.partial(dcp.save, state, storage_writer=dcp.FileSystemWriter(tmp)), what, drop_tmp)
    commit = functools.partial(_commit, directory, tmp, data, path, record, is_best, keep)
    _on_all_ranks(ctx, commit if ctx.is_main else _nothing, what, _nothing)  # _commit cleans up after itself
    return path


def _nothing() -> None:
    """What a rank that has no part in a phase of the save runs."""


def _commit(directory: str, tmp: str, data: str, path: str, record: CheckpointRecord, is_best: bool,
            keep: int) -> None:
    """Rank 0, once every shard is written: hashes the data, moves it into place, writes the record.

    Writing the record is the commit; if anything before it fails, the data is removed again
    (no record names it: its tag is new), so a failed save leaves the directory as it was.
    """
    final = os.path.join(directory, data)
    try:
        files = artifacts.file_hashes(tmp, artifacts.list_files(tmp, exclude=()))
        storage.replace(tmp, final)
        record = dataclasses.replace(record, data=data, files=files)
        _write_record(path, record)
    except BaseException:
        storage.remove_tree(tmp)
        storage.remove_tree(final)
        raise
    if is_best:
        _write_record(os.path.join(directory, f"{BEST}.pt"), dataclasses.replace(record, name=BEST))
    collect_garbage(directory, keep)


def _on_all_ranks(ctx: DistContext, step: Callable[[], Any], what: str, cleanup: Callable[[], None]) -> None:
    """Runs ``step`` on this rank; if it failed on any rank, rank 0 runs ``cleanup`` and all raise.

    The exchange of outcomes is also the barrier between the phases of a save, and it keeps a
    rank that failed alone from leaving the others waiting in the next collective. Any exception
    counts: a full disk reaches us as a ``RuntimeError`` of torch's zip writer, not an OSError.
    """
    error: Optional[str] = None
    cause: Optional[BaseException] = None
    try:
        step()
    except (Exception, CheckpointException) as e:  # noqa: BLE001  (CheckpointException is a BaseException)
        error, cause = _describe(e), e
    errors: List[Optional[str]] = [error]
    if ctx.world_size > 1:
        errors = [None] * ctx.world_size
        dist.all_gather_object(errors, error)
    failed = [(rank, text) for rank, text in enumerate(errors) if text is not None]
    if failed:
        if ctx.is_main:
            cleanup()
        rank, text = failed[0]
        where = f" on rank {rank}" if ctx.world_size > 1 else ""
        raise ArtifactError(f"cannot write {what}{where} (is the disk full or read-only?): {text}") from cause


def _non_tensor_leaves(state: Dict[str, Any], prefix: str = "") -> List[str]:
    """Dotted keys of the leaves of ``state`` that are not tensors."""
    out: List[str] = []
    for key, value in state.items():
        if isinstance(value, dict):
            out += _non_tensor_leaves(value, f"{prefix}{key}.")
        elif not isinstance(value, (torch.Tensor, ShardedTensor)):
            out.append(f"{prefix}{key}")
    return out


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


def _unverified_allowed() -> bool:
    return os.environ.get(ALLOW_UNVERIFIED_ENV, "") == "1"


def verify_data(path: str, record: CheckpointRecord) -> str:
    """The data directory of record ``path``, once each of its files matches the record's manifest.

    Runs before torch.distributed.checkpoint opens any of them: a missing, extra, truncated or
    modified file is refused in one line. A record without a manifest (written before it
    existed) is refused unless :data:`ALLOW_UNVERIFIED_ENV` is ``1``.
    """
    if not isinstance(record.data, str) or not _DATA_NAME.match(record.data):
        raise ArtifactError(f"checkpoint {path}: bad data directory name {record.data!r}")
    directory = data_path(path, record)
    if not storage.exists(os.path.join(directory, ".metadata")):
        raise ArtifactError(f"checkpoint {path}: its data directory {directory} is missing or incomplete")
    if record.files is None:
        if _unverified_allowed():
            return directory
        raise ArtifactError(f"checkpoint {path} has no sha256 manifest (written by an older sidvid-rec), so its "
                            f"data cannot be verified: train again, or set {ALLOW_UNVERIFIED_ENV}=1 to load it "
                            "unverified if you trust where it came from")
    if not isinstance(record.files, dict) or not all(isinstance(v, str) for v in record.files.values()):
        raise ArtifactError(f"checkpoint {path}: its manifest is malformed")
    found = set(artifacts.list_files(directory, exclude=()))
    missing, extra = sorted(set(record.files) - found), sorted(found - set(record.files))
    if missing or extra:
        raise ArtifactError(f"checkpoint {path}: its data {directory} does not match the manifest "
                            f"(missing {missing[:5]}, unexpected {extra[:5]}); refusing to load it")
    for rel in sorted(record.files):
        try:
            digest = storage.sha256_file(os.path.join(directory, rel))
        except OSError as e:
            raise ArtifactError(f"checkpoint {path}: cannot read {rel} of its data ({_describe(e)})")
        if digest != record.files[rel]:
            raise ArtifactError(f"checkpoint {path}: {rel} of its data differs from the sha256 recorded when it "
                                "was saved (truncated, corrupted or modified); refusing to load it")
    return directory


def _read_metadata(directory: str) -> Metadata:
    return SafeFileSystemReader(directory).read_metadata()


_SID_TABLE = "sid_prefix"
"""Name of the SID-prefix table (and its buffer) in state keys: ``modules.embeddings.SID_FEATURE``
(not imported: this module stays free of torchrec; a test keeps the two equal)."""


def _current_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def shape_mismatch(path: str, key: str, saved: Tuple[int, ...], needed: Tuple[int, ...],
                    record: Optional[CheckpointRecord]) -> str:
    """One line saying why ``key`` has another shape than this run needs, by its likely cause."""
    head = f"checkpoint {path}: {key} has shape {saved}, this run needs {needed}"
    if key.startswith("optim.fused."):
        # The model's tables matched (model.* keys come first), so the table optimizer's state
        # differs by layout: row-wise Adagrad keeps one momentum per column shard.
        written = f"{record.world_size} rank(s), train.sharding={record.sharding}" if record else "another job"
        return (f"{head}: column-wise sharded optimizer state depends on the world size and resumes only on "
                f"the same one (written by {written}; this job has {_current_world_size()} rank(s))")
    if _SID_TABLE in key.split("."):
        return (f"{head}: the semantic IDs changed size since the checkpoint was written (sids.dir rebuilt "
                "with another sids.codebook_size or sids.layers, or another sids.dir); use the semantic IDs "
                "it was trained with, or train into a new run directory")
    return f"{head}: the model's shapes differ from the run that wrote it"


def _check_shapes(metadata: Metadata, state: Dict[str, Any], path: str,
                  record: Optional[CheckpointRecord] = None) -> None:
    """Every leaf of ``state`` must be a tensor in the checkpoint with the same global shape.

    Only tensors: DCP fills any other leaf with ``torch.load(weights_only=False)`` of the saved
    bytes, which would run code from a crafted checkpoint. A shape mismatch is refused in one
    line naming its likely cause (the SID table changed size; column-wise optimizer state on
    another world size), from ``record`` when given.
    """
    leaves = _non_tensor_leaves(state)
    if leaves:
        raise TypeError(f"only tensors are loaded from checkpoints; not tensors: {leaves[:5]}")
    saved = metadata.state_dict_metadata
    for key, shape in flatten_keys(state).items():
        meta = saved.get(key)
        if not isinstance(meta, TensorStorageMetadata):
            raise ArtifactError(f"checkpoint {path} lacks {key}")
        if tuple(meta.size) != tuple(shape):
            raise ArtifactError(shape_mismatch(path, key, tuple(meta.size), tuple(shape), record))


def _dcp_load(state: Dict[str, Any], directory: str, path: str, no_dist: bool = False) -> None:
    """``dcp.load`` through :class:`SafeFileSystemReader`; its failures become one line.

    The manifest normally refuses a damaged directory first; this covers unverified checkpoints
    and files that change while being read. ``state`` may be partly filled when it fails.
    """
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            if no_dist:
                warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=SafeFileSystemReader(directory), no_dist=no_dist)
    except (Exception, CheckpointException) as e:  # noqa: BLE001  (CheckpointException is a BaseException)
        inner = _unwrap(e)
        if isinstance(inner, UserError):
            raise inner
        raise ArtifactError(f"checkpoint {path}: cannot load its data {directory} ({_describe(e)})")


def drop_unmatched(state: Dict[str, Any], saved: Dict[str, Any], optional: Sequence[str],
                   prefix: str = "") -> List[str]:
    """Removes from ``state`` (in place) the tensor leaves under an ``optional`` key prefix that
    the checkpoint lacks or holds with another shape; returns their dotted keys.

    What such entries are for: state a checkpoint may legitimately not have, e.g. the CUDA RNG
    state in a checkpoint written before it was saved (or on the CPU), or a generator state of
    another device. The caller then re-seeds what was dropped instead of failing the resume.
    """
    dropped: List[str] = []
    for key in list(state):
        name, value = f"{prefix}{key}", state[key]
        if isinstance(value, dict):
            dropped += drop_unmatched(value, saved, optional, f"{name}.")
            continue
        if not any(name.startswith(p) for p in optional):
            continue
        meta = saved.get(name)
        shape = value.size() if isinstance(value, (torch.Tensor, ShardedTensor)) else None
        if not isinstance(meta, TensorStorageMetadata) or shape is None or tuple(meta.size) != tuple(shape):
            del state[key]
            dropped.append(name)
    return dropped


def load_checkpoint(path: str, state: Dict[str, Any], expected_fingerprint: Optional[str] = None,
                    expected_data_fingerprint: Optional[str] = None,
                    optional: Sequence[str] = (), dropped: Optional[List[str]] = None) -> CheckpointRecord:
    """Fills ``state`` in place from the checkpoint of record ``path`` (collective); returns the record.

    ``state`` holds the current (possibly sharded) tensors; each rank reads the parts its
    shards need, whatever world size wrote them. Nothing is loaded when a check fails: the
    fingerprints (:func:`read_record`), the manifest (:func:`verify_data`), the metadata and
    the shapes are all checked first. Entries under an ``optional`` key prefix (``"rng."``) that
    the checkpoint lacks or shapes differently are removed from ``state`` instead
    (:func:`drop_unmatched`); their keys are appended to ``dropped``.
    """
    record = read_record(path, expected_fingerprint, expected_data_fingerprint)
    directory = verify_data(path, record)
    metadata = _read_metadata(directory)
    if optional:
        removed = drop_unmatched(state, metadata.state_dict_metadata, optional)
        if dropped is not None:
            dropped.extend(removed)
    _check_shapes(metadata, state, path, record)
    _dcp_load(state, directory, path)
    return record


# ----------------------------------------------------------------------------- random streams


def rng_state(generator: torch.Generator, device: torch.device) -> Dict[str, torch.Tensor]:
    """This rank's random streams as tensors (what a checkpoint's ``rng.rank<r>`` holds):
    ``torch`` (the CPU RNG), ``generator`` (the negative-sampling generator, on the training
    device) and, when training on CUDA, ``cuda`` (that device's RNG: dropout draws there)."""
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: Dict[str, torch.Tensor], generator: torch.Generator, device: torch.device) -> List[str]:
    """Inverse of :func:`rng_state` for the entries ``state`` has; returns the names it did not
    have (an old or CPU checkpoint has no ``cuda``), which the caller re-seeds."""
    missing = []
    for name in ("torch", "generator") + (("cuda",) if torch.device(device).type == "cuda" else ()):
        if name not in state:
            missing.append(name)
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "generator" in state:
        generator.set_state(state["generator"])
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    return missing


def load_model_weights(path: str, model: torch.nn.Module, expected_fingerprint: Optional[str] = None,
                       expected_data_fingerprint: Optional[str] = None) -> CheckpointRecord:
    """Loads only the model part of a checkpoint into a (DMP) model; returns the record."""
    state = {"model": model.state_dict()}
    record = load_checkpoint(path, state, expected_fingerprint, expected_data_fingerprint)
    model.load_state_dict(state["model"])
    return record


def read_full_tensors(path: str, prefix: str = "model.", expected_fingerprint: Optional[str] = None,
                      expected_data_fingerprint: Optional[str] = None
                      ) -> Tuple[CheckpointRecord, Dict[str, torch.Tensor]]:
    """Full (gathered) tensors under ``prefix`` of a checkpoint, in this process alone.

    Reads every rank's shard files; needs no process group and no model. Keys are returned
    without ``prefix`` (``embeddings.ebc.embedding_bags.item_id.weight`` ...). Checked as
    :func:`load_checkpoint` checks.
    """
    record = read_record(path, expected_fingerprint, expected_data_fingerprint)
    directory = verify_data(path, record)
    saved = _read_metadata(directory).state_dict_metadata
    tensors = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in saved.items()
               if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    _dcp_load(tensors, directory, path, no_dist=True)
    return record, {key[len(prefix):]: value for key, value in tensors.items()}
