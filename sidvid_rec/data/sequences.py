"""User sequences stored jagged (values + offsets), id remapping, splits and the on-disk cache.

Legend: U users, N items (ids 1..N, 0 = padding), T interactions in all, E examples of a split.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from sidvid_rec import storage
from sidvid_rec.config import DataConfig
from sidvid_rec.data import readers
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
        user_raw_ids=user_raw_ids.astype(np.int64),
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


def fingerprint(path: str, fmt: str, min_len: int) -> str:
    """sha256 over the format, ``min_len`` and the bytes of the files the format reads."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{fmt}|{min_len}".encode())
    for f in readers.input_files(path, fmt):
        if not storage.exists(f):
            raise DataError(f"{fmt} data needs {os.path.basename(f)}, missing in {path}")
        digest.update(storage.sha256_file(f).encode())
    return digest.hexdigest()[:16]


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


def _load_cache(directory: str) -> Optional[SequenceData]:
    try:
        with storage.open_file(os.path.join(directory, "sequences.npz"), "rb") as f:
            arrays = dict(np.load(f, allow_pickle=False))
        with storage.open_file(os.path.join(directory, "items.json"), "r") as f:
            meta = json.load(f)
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache is rebuilt, never trusted
    if meta.get("version") != CACHE_VERSION:
        return None
    meta.pop("version")
    return SequenceData(**arrays, **meta)


def load_sequences(cfg: DataConfig, use_cache: bool = True, write_cache: bool = True) -> SequenceData:
    """Reads (or loads from the cache) the configured data set as jagged user sequences."""
    path = resolve_data_path(cfg)
    fmt = readers.detect_format(path) if cfg.format == "auto" else readers.canonical_format(cfg.format)
    if fmt not in readers.FORMAT_FILES:
        raise DataError(f"unknown data format {cfg.format!r}")
    fp = fingerprint(path, fmt, cfg.min_len)
    cache = _cache_dir(cfg, fp)
    if use_cache and storage.exists(cache):
        cached = _load_cache(cache)
        if cached is not None:
            return cached
    data = build_sequences(readers.read(path, fmt), cfg.min_len, fp)
    if write_cache:
        _save_cache(data, cache)
    return data


def cache_path(cfg: DataConfig) -> str:
    """Directory where :func:`load_sequences` keeps the preprocessed data of ``cfg``."""
    path = resolve_data_path(cfg)
    fmt = readers.detect_format(path) if cfg.format == "auto" else readers.canonical_format(cfg.format)
    return _cache_dir(cfg, fingerprint(path, fmt, cfg.min_len))


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


def make_split(data: SequenceData, split: str, protocol: str, max_len: int) -> Split:
    """Builds ``train``, ``valid`` or ``test`` examples.

    ``loo``: train = all but the last two items, valid target = second to last, test target =
    last. ``gr`` (generative-recommenders): train = all but the last item, test target = last,
    no validation. Histories keep the most recent ``max_len`` items; training sequences keep
    ``max_len + 1`` so that each has up to ``max_len`` supervised positions.
    """
    holdout = {"loo": {"train": 2, "valid": 2, "test": 1}, "gr": {"train": 1, "test": 1}}[protocol]
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
