"""User sequences stored jagged (values + offsets), id remapping, splits and the on-disk cache.

Legend: U users, N items (ids 1..N, 0 = padding), T interactions in all, E examples of a split.
"""

import contextlib
import hashlib
import json
import os
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from sidvid_rec import storage
from sidvid_rec.config import DataConfig
from sidvid_rec.data import interactions, readers
from sidvid_rec.errors import DataError

CACHE_VERSION = 1
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(__file__), "default", "ml-latest-small")


@dataclass
class SequenceData:
    """Every kept user's time-ordered items, jagged.

    ``item_values [T]``, ``timestamps [T]``, ``ratings [T]`` are sliced per user by
    ``offsets [U+1]``. Item id 0 is padding; ``item_raw_ids[i]``, ``item_title[i]`` and
    ``item_text[i]`` describe item ``i`` (index 0 = padding: -1 / "").
    """

    item_values: np.ndarray
    timestamps: np.ndarray
    ratings: np.ndarray
    offsets: np.ndarray
    user_raw_ids: np.ndarray
    item_raw_ids: np.ndarray
    item_title: List[str]
    item_text: List[str]
    dropped_users: int
    timestamps_are_positions: bool
    format: str
    fingerprint: str

    @property
    def num_users(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def num_items(self) -> int:
        return int(self.item_raw_ids.size - 1)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def stats(self) -> Dict[str, object]:
        lengths = self.lengths
        return {
            "format": self.format,
            "users": self.num_users,
            "items": self.num_items,
            "interactions": int(self.item_values.size),
            "min_len": int(lengths.min()),
            "median_len": float(np.median(lengths)),
            "mean_len": round(float(lengths.mean()), 2),
            "max_len": int(lengths.max()),
            "dropped_users": self.dropped_users,
            "timestamps": "positions" if self.timestamps_are_positions else "unix seconds",
            "fingerprint": self.fingerprint,
        }


def build_sequences(raw: readers.RawInteractions, min_len: int, fingerprint: str) -> SequenceData:
    """Sorts each user's interactions by time (stable: file order breaks ties), drops users
    with fewer than ``min_len`` interactions and remaps the remaining items to 1..N."""
    if raw.users.size == 0:
        raise DataError("the data set holds no interactions")
    order = np.lexsort((np.arange(raw.users.size), raw.timestamps, raw.users))
    users, items = raw.users[order], raw.items[order]
    timestamps, ratings = raw.timestamps[order], raw.ratings[order]
    user_raw_ids, starts, counts = np.unique(users, return_index=True, return_counts=True)
    keep_user = counts >= min_len
    keep = np.repeat(keep_user, counts)
    if not keep.any():
        raise DataError(f"no user has at least data.min_len={min_len} interactions")
    items, timestamps, ratings = items[keep], timestamps[keep], ratings[keep]
    item_raw_ids, item_values = np.unique(items, return_inverse=True)
    offsets = np.concatenate([[0], np.cumsum(counts[keep_user])]).astype(np.int64)
    titles = [""] + [raw.item_title.get(int(i), "") for i in item_raw_ids]
    texts = [""] + [raw.item_text[int(i)] for i in item_raw_ids]
    return SequenceData(
        item_values=(item_values + 1).astype(np.int64),
        timestamps=timestamps.astype(np.int64),
        ratings=ratings.astype(np.float32),
        offsets=offsets,
        user_raw_ids=user_raw_ids[keep_user].astype(np.int64),  # aligned with offsets: kept users only
        item_raw_ids=np.concatenate([[-1], item_raw_ids]).astype(np.int64),
        item_title=titles,
        item_text=texts,
        dropped_users=int((~keep_user).sum()),
        timestamps_are_positions=raw.timestamps_are_positions,
        format=raw.format,
        fingerprint=fingerprint,
    )


# ----------------------------------------------------------------------------- cache


def resolve_data_path(cfg: DataConfig) -> str:
    return storage.expand(cfg.path) if cfg.path else DEFAULT_DATA_DIR


def fingerprint(path: str, fmt: str, min_len: int, memo_dir: Optional[str] = None,
                cfg: Optional[DataConfig] = None) -> str:
    """sha256 over the format, ``min_len`` and the bytes of the files the format reads.

    It depends on the content only (not on the path); ``memo_dir`` (a ``data.cache_dir``) lets
    it reuse file digests memoised there (see :func:`_file_sha256`); the value is the same.
    The ``interactions`` format also hashes the column settings of ``cfg`` (its item table too).
    """
    return _fingerprint(path, fmt, min_len, memo_dir, cfg)[0]


# Memo entries to write once a load has succeeded: (memo file, entry).
_Memo = Tuple[str, Dict[str, object]]


def _source_files(path: str, fmt: str, cfg: Optional[DataConfig]) -> Tuple[List[str], str]:
    """The files the format reads and what else shapes the sequences (hashed together)."""
    if fmt != readers.INTERACTIONS:
        return readers.check_input_files(path, fmt), ""
    cfg = cfg if cfg is not None else DataConfig(path=path, format=readers.INTERACTIONS)
    files, item_files = interactions.source_files(cfg, path)
    return files + item_files, interactions.fingerprint_extra(cfg, len(files))


def _fingerprint(path: str, fmt: str, min_len: int, memo_dir: Optional[str],
                 cfg: Optional[DataConfig] = None) -> Tuple[str, List[_Memo]]:
    files, extra = _source_files(path, fmt, cfg)
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{fmt}|{min_len}{extra}".encode())
    memos: List[_Memo] = []
    for f in files:
        file_digest, memo = _file_sha256(f, memo_dir)
        digest.update(file_digest.encode())
        if memo is not None:
            memos.append(memo)
    return digest.hexdigest()[:16], memos


# Hashing every input file on every load costs ~0.5-1 s per GB (ML-20M: ~0.7 GB) before the cache
# can even be looked up, so the full-file sha256 of a local file is memoised under data.cache_dir,
# keyed by (size, mtime_ns, ctime_ns, inode). Any write changes mtime and ctime, and ctime cannot be
# set back (touch/utime/cp -p/rsync keep mtime but not ctime), so a file changed in place is always
# re-hashed. Hashing only the first/last MiB would be cheaper but miss edits in the middle. A file
# changed within _RACY_NS of hashing is not memoised: a second edit within the same coarse
# file-system timestamp tick would leave the key unchanged (git's "racy clean" problem).
_RACY_NS = 2_000_000_000


def _stat_key(path: str) -> Optional[Dict[str, int]]:
    if "://" in path:  # no reliable stat through iopath: always hash
        return None
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def _memo_file(memo_dir: str, path: str) -> str:
    return os.path.join(memo_dir, "file-hashes", hashlib.sha256(path.encode()).hexdigest()[:24] + ".json")


def _read_memo(memo: str, path: str, key: Dict[str, int]) -> Optional[str]:
    """The memoised hex digest of ``path`` if ``memo`` is intact and matches ``key``."""
    try:
        with storage.open_file(memo, "r") as f:
            entry = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None  # a missing or damaged memo only costs a re-hash
    if not isinstance(entry, dict) or entry.get("path") != path or any(entry.get(k) != v for k, v in key.items()):
        return None
    digest = entry.get("sha256")
    valid = isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
    return digest if valid else None


def _file_sha256(path: str, memo_dir: Optional[str]) -> Tuple[str, Optional[_Memo]]:
    """Hex sha256 of ``path``'s bytes and, when it should be memoised, the memo entry to write."""
    try:
        key = _stat_key(path) if memo_dir else None
        memo = _memo_file(memo_dir, path) if key else None
        cached = _read_memo(memo, path, key) if memo and storage.exists(memo) else None
        if cached is not None:
            return cached, None
        start = time.time_ns()
        digest = storage.sha256_file(path)
        stable = key is not None and _stat_key(path) == key
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}")
    if not stable or max(key["mtime_ns"], key["ctime_ns"]) > start - _RACY_NS:
        return digest, None
    return digest, (memo, {"path": path, **key, "sha256": digest})


def _write_memos(memos: List[_Memo]) -> None:
    for memo, entry in memos:
        with contextlib.suppress(OSError):  # a read-only cache only loses the speed-up
            storage.write_json(memo, entry)


def _cache_dir(cfg: DataConfig, fp: str) -> str:
    return os.path.join(storage.expand_setting(cfg.cache_dir, "data.cache_dir"), "sequences", fp)


def _save_cache(data: SequenceData, directory: str) -> None:
    with storage.atomic_dir(directory) as tmp:
        with storage.open_file(os.path.join(tmp, "sequences.npz"), "wb") as f:
            np.savez(f, item_values=data.item_values, timestamps=data.timestamps, ratings=data.ratings,
                     offsets=data.offsets, user_raw_ids=data.user_raw_ids, item_raw_ids=data.item_raw_ids)
        meta = {"item_title": data.item_title, "item_text": data.item_text, "dropped_users": data.dropped_users,
                "timestamps_are_positions": data.timestamps_are_positions, "format": data.format,
                "fingerprint": data.fingerprint, "version": CACHE_VERSION}
        with storage.open_file(os.path.join(tmp, "items.json"), "w") as f:
            json.dump(meta, f)


_CACHE_ARRAYS = {"item_values": np.int64, "timestamps": np.int64, "ratings": np.float32, "offsets": np.int64,
                 "user_raw_ids": np.int64, "item_raw_ids": np.int64}
_CACHE_META = {"item_title": list, "item_text": list, "dropped_users": int, "timestamps_are_positions": bool,
               "format": str, "fingerprint": str, "version": int}


def _load_cache(directory: str, fp: str) -> Optional[SequenceData]:
    """The cached data of fingerprint ``fp``, or ``None`` (with a one-line warning) when damaged."""
    try:
        arrays, meta = _read_cache_files(directory)
        problem = _cache_problem(arrays, meta, fp)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, RecursionError) as e:
        problem = f"unreadable: {type(e).__name__}: {e}"
    if problem is not None:  # a damaged cache is rebuilt from the source data, never trusted
        print(f"warning: rebuilding the damaged data cache {directory} ({' '.join(problem.split())[:200]})",
              file=sys.stderr)
        return None
    meta.pop("version")
    return SequenceData(**arrays, **meta)


def _read_cache_files(directory: str) -> Tuple[Dict[str, np.ndarray], object]:
    """The arrays of ``sequences.npz`` and the parsed ``items.json`` of a cache entry, unchecked."""
    with storage.open_file(os.path.join(directory, "sequences.npz"), "rb") as f:
        loaded = np.load(f, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a lone .npy array parses too
            raise ValueError("sequences.npz is not an .npz archive")
        with loaded:
            arrays = {name: loaded[name] for name in loaded.files}
    with storage.open_file(os.path.join(directory, "items.json"), "r") as f:
        meta = json.load(f)
    return arrays, meta


def _cache_problem(arrays: Dict[str, np.ndarray], meta: object, fp: str) -> Optional[str]:
    """What is inconsistent in a cache entry's arrays and ``items.json``; ``None`` when it is sound."""
    if set(arrays) != set(_CACHE_ARRAYS):
        return f"sequences.npz holds {sorted(arrays)}"
    for name, dtype in _CACHE_ARRAYS.items():
        if arrays[name].dtype != dtype or arrays[name].ndim != 1:
            return f"{name} is {arrays[name].dtype}{list(arrays[name].shape)}"
    if not isinstance(meta, dict) or set(meta) != set(_CACHE_META):
        return "items.json does not hold the expected keys"
    for key, kind in _CACHE_META.items():
        if type(meta[key]) is not kind:  # exact: a bool is not an int here
            return f"items.json {key} is {type(meta[key]).__name__}"
    if meta["version"] != CACHE_VERSION or meta["fingerprint"] != fp or meta["format"] not in readers.KNOWN_FORMATS:
        return "items.json names another version, fingerprint or format"
    offsets, values, n = arrays["offsets"], arrays["item_values"], arrays["item_raw_ids"].size - 1
    t = values.size
    if (t < 1 or offsets.size < 2 or offsets[0] != 0 or offsets[-1] != t or np.any(np.diff(offsets) < 0)
            or arrays["timestamps"].size != t or arrays["ratings"].size != t
            or arrays["user_raw_ids"].size != offsets.size - 1):
        return "sequence arrays disagree in length"
    if n < 1 or values.min() < 1 or values.max() > n or meta["dropped_users"] < 0:
        return "item ids out of range"
    texts = meta["item_title"] + meta["item_text"]
    if len(meta["item_title"]) != n + 1 or len(meta["item_text"]) != n + 1 or not all(type(x) is str for x in texts):
        return "item titles/texts do not match the items"
    return None


def load_sequences(cfg: DataConfig, use_cache: bool = True, write_cache: bool = True) -> SequenceData:
    """Reads (or loads from the cache) the configured data set as jagged user sequences."""
    path = resolve_data_path(cfg)
    fmt = readers.detect_format(path) if cfg.format == "auto" else readers.canonical_format(cfg.format)
    if fmt not in readers.KNOWN_FORMATS:
        raise DataError(f"unknown data format {cfg.format!r}")
    fp, memos = _fingerprint(path, fmt, cfg.min_len, storage.expand_setting(cfg.cache_dir, "data.cache_dir"), cfg)
    cache = _cache_dir(cfg, fp)
    data = _load_cache(cache, fp) if use_cache and storage.exists(cache) else None
    if data is None:
        if fmt == readers.INTERACTIONS:  # streamed in batches: never a whole file in memory
            data = interactions.build(cfg, path, fp)
        else:
            data = build_sequences(readers.read(path, fmt), cfg.min_len, fp)
        if write_cache:
            _save_cache(data, cache)
    if write_cache:  # only after success: a failed read leaves nothing on disk
        _write_memos(memos)
    return data


def cache_path(cfg: DataConfig) -> str:
    """Directory where :func:`load_sequences` keeps the preprocessed data of ``cfg``."""
    path = resolve_data_path(cfg)
    fmt = readers.detect_format(path) if cfg.format == "auto" else readers.canonical_format(cfg.format)
    memo_dir = storage.expand_setting(cfg.cache_dir, "data.cache_dir")
    return _cache_dir(cfg, fingerprint(path, fmt, cfg.min_len, memo_dir, cfg))


# ----------------------------------------------------------------------------- splits


@dataclass
class Split:
    """One split as jagged examples: ``E`` sequences in ``values/timestamps [T]`` + ``offsets [E+1]``.

    Training splits (``targets is None``) hold whole sequences; position i predicts item i+1.
    Evaluation splits hold the history of each example and one ``targets [E]`` item each.
    ``user_index [E]`` indexes :class:`SequenceData` users.
    """

    values: np.ndarray
    timestamps: np.ndarray
    offsets: np.ndarray
    user_index: np.ndarray
    targets: Optional[np.ndarray] = None
    target_timestamps: Optional[np.ndarray] = None

    @property
    def num_examples(self) -> int:
        return int(self.offsets.size - 1)


def _slice_jagged(data: SequenceData, starts: np.ndarray, ends: np.ndarray, users: np.ndarray) -> Split:
    lengths = ends - starts
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # Vectorised gather of [starts[e], ends[e]) for every example e.
    index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    return Split(data.item_values[index], data.timestamps[index], offsets, users.astype(np.int64))


_HOLDOUT = {"loo": {"train": 2, "valid": 2, "test": 1}, "gr": {"train": 1, "test": 1}}
"""Items held out at the end of each user's sequence, per protocol and split (the split's
examples end there; an evaluation split's target is the first held-out item)."""


def training_item_counts(data: SequenceData, protocol: str) -> np.ndarray:
    """``[N + 1]`` interactions per item in the training split (every user's sequence without
    its held-out items, not cut to ``max_len``); row 0, the padding item, counts 0."""
    lengths = np.maximum(np.diff(data.offsets) - _HOLDOUT[protocol]["train"], 0)
    keep = np.arange(data.item_values.size) - np.repeat(data.offsets[:-1], np.diff(data.offsets)) \
        < np.repeat(lengths, np.diff(data.offsets))
    return np.bincount(data.item_values[keep], minlength=data.num_items + 1)


def make_split(data: SequenceData, split: str, protocol: str, max_len: int) -> Split:
    """Builds ``train``, ``valid`` or ``test`` examples.

    ``loo``: train = all but the last two items, valid target = second to last, test target =
    last. ``gr`` (generative-recommenders): train = all but the last item, test target = last,
    no validation. Histories keep the most recent ``max_len`` items; training sequences keep
    ``max_len + 1`` so that each has up to ``max_len`` supervised positions.
    """
    holdout = _HOLDOUT[protocol]
    if split not in holdout:
        raise DataError(f"protocol {protocol!r} has no {split!r} split (splits: {', '.join(holdout)})")
    starts, ends = data.offsets[:-1], data.offsets[1:] - holdout[split]
    users = np.arange(data.num_users)
    if split == "train":
        keep = ends - starts >= 2  # at least one (input, next item) pair
        ends, users = ends[keep], users[keep]
        starts = np.maximum(starts[keep], ends - (max_len + 1))
        return _slice_jagged(data, starts, ends, users)
    keep = ends - starts >= 1
    ends, users = ends[keep], users[keep]
    out = _slice_jagged(data, np.maximum(starts[keep], ends - max_len), ends, users)
    out.targets = data.item_values[ends]
    out.target_timestamps = data.timestamps[ends]
    return out
