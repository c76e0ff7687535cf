"""Readers for MovieLens and Amazon (P5 form), all file access through iopath.

Every reader returns :class:`RawInteractions`: one row per interaction with the raw user
and item ids, a timestamp and a rating, plus the text of every item. Format detection
looks at the file names in the directory. Malformed input raises a one-line
:class:`~sidvid_rec.errors.DataError` naming the file and, where known, the line.
"""

import html
import io as _stdio
import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pandas as pd

from sidvid_rec import storage
from sidvid_rec.errors import DataError

# Files that identify each format, checked in this order.
FORMAT_FILES: Dict[str, Tuple[str, ...]] = {
    "ml-100k": ("u.data", "u.item"),
    "ml-1m": ("ratings.dat", "movies.dat"),
    "ml-latest": ("ratings.csv", "movies.csv"),
    "amazon": ("sequential.txt", "items.jsonl"),
}
FORMAT_ALIASES = {"ml-20m": "ml-latest", "ml-10m": "ml-1m"}
INTERACTIONS = "interactions"
"""Your own table(s) of (user, item, time): read by :mod:`sidvid_rec.data.interactions`."""
INTERACTIONS_SUFFIXES = (".parquet", ".csv")
KNOWN_FORMATS = (*FORMAT_FILES, INTERACTIONS)
"""Every canonical format a data cache may hold."""
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)


@dataclass
class RawInteractions:
    """Interactions as read from disk, before filtering and id remapping.

    ``users``, ``items``, ``timestamps``, ``ratings`` are aligned arrays of length I (one per
    interaction, file order). ``item_text``/``item_title`` map a raw item id to its text.
    """

    users: np.ndarray  # int64 [I]
    items: np.ndarray  # int64 [I]
    timestamps: np.ndarray  # int64 [I]
    ratings: np.ndarray  # float32 [I]
    item_title: Dict[int, str]
    item_text: Dict[int, str]
    timestamps_are_positions: bool
    format: str


def detect_format(path: str) -> str:
    """Returns the format whose identifying files are all present in ``path``."""
    if not storage.exists(path):
        raise DataError(f"data path does not exist: {path}")
    if not storage.isdir(path):
        if path.lower().endswith(INTERACTIONS_SUFFIXES):
            return INTERACTIONS
        raise DataError(f"data path is not a directory nor a .parquet/.csv file: {path}")
    names = set(storage.ls(path))
    for fmt, files in FORMAT_FILES.items():
        if all(f in names for f in files):
            return fmt
    if any(n.lower().endswith(INTERACTIONS_SUFFIXES) and not n.startswith(".") for n in names):
        return INTERACTIONS
    known = "; ".join(f"{fmt}: {', '.join(files)}" for fmt, files in FORMAT_FILES.items())
    raise DataError(f"cannot detect the data format of {path}: expected one of [{known}; "
                    f"{INTERACTIONS}: .parquet/.csv files]")


def canonical_format(fmt: str) -> str:
    return FORMAT_ALIASES.get(fmt, fmt)


def input_files(path: str, fmt: str) -> List[str]:
    """The files a format reads (used for the cache fingerprint)."""
    return [os.path.join(path, f) for f in FORMAT_FILES[canonical_format(fmt)]]


def check_input_files(path: str, fmt: str) -> List[str]:
    """:func:`input_files`, each checked to exist and to be a file (the one place both the
    reader and the cache fingerprint validate them, so neither meets a directory)."""
    files = input_files(path, fmt)
    for f in files:
        if not storage.exists(f):
            raise DataError(f"{fmt} data needs {os.path.basename(f)}, missing in {path}")
        if storage.isdir(f):
            raise DataError(f"{f} is a directory; {fmt} data needs it to be a file")
    return files


def read(path: str, fmt: str = "auto") -> RawInteractions:
    """Reads a data directory of format ``fmt`` (``auto`` detects it)."""
    fmt = detect_format(path) if fmt == "auto" else canonical_format(fmt)
    if fmt not in _READERS:
        raise DataError(f"unknown data format {fmt!r} (known: auto, {', '.join(FORMAT_FILES)}, ml-20m)")
    check_input_files(path, fmt)
    raw = _READERS[fmt](path)
    _check_items_have_text(raw, path)
    return raw


# ----------------------------------------------------------------------------- helpers


def _read_text(path: str, encoding: str) -> str:
    try:
        with storage.open_file(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}")
    if not data.strip():
        raise DataError(f"{path} is empty")
    # No text format holds NUL bytes; latin-1 would decode binary garbage without complaint.
    if b"\x00" in data:
        line = data[: data.index(b"\x00")].count(b"\n") + 1
        raise DataError(f"{path}: NUL byte at line {line} (a binary file, not {encoding} text)")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: bytes at line {line} are not valid {encoding}")


def _read_table(path: str, sep: str, names: List[str], encoding: str, header: bool) -> pd.DataFrame:
    """Parses a delimited file with a fixed column count; every field kept as a string."""
    text = _read_text(path, encoding)
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) <= int(header):
        raise DataError(f"{path} has no data rows")
    first = lines[int(header)]
    if first.count(sep) < len(names) - 1:
        raise DataError(
            f"{path}: expected {len(names)} fields separated by {sep!r}, found {first.count(sep) + 1} "
            f"in line {first[:60]!r} (wrong separator or format?)"
        )
    engine = "python" if len(sep) > 1 else "c"
    try:
        return pd.read_csv(
            _stdio.StringIO(text), sep=re.escape(sep) if len(sep) > 1 else sep, names=names,
            header=0 if header else None, dtype=str, engine=engine, keep_default_na=False,
            quotechar='"' if sep == "," else "\x00",
        )
    except (pd.errors.ParserError, ValueError) as e:
        raise DataError(f"{path}: cannot parse ({str(e).splitlines()[0]})")


INT64_MAX = int(np.iinfo(np.int64).max)
_NON_NUMERIC = "{path}: non-numeric {column} {value} in data row {row}"
_OUT_OF_RANGE = "{path}: {column} {value} in data row {row} is out of the int64 range"


def _first_bad(df: pd.DataFrame, column: str, path: str, bad: np.ndarray, message: str, row0: int = 0) -> None:
    """Raises a DataError naming the first row where ``bad [rows]`` is set, if any (``row0``: rows
    before ``df`` in its file, for readers that parse a file in batches)."""
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(message.format(path=path, column=column, value=repr(df[column].iloc[row]), row=row0 + row + 1))


def _to_int(df: pd.DataFrame, column: str, path: str, row0: int = 0) -> np.ndarray:
    """``df[column]`` as int64 ``[rows]``; a value that is not an integer within int64 is refused.

    pandas gives int64 when every value fits, uint64 for values past int64 and float64 for
    decimals, exponents and values past uint64: each is checked here, before the cast wraps it.
    """
    values = pd.to_numeric(df[column], errors="coerce")
    _first_bad(df, column, path, values.isna().to_numpy(), _NON_NUMERIC, row0)
    array = values.to_numpy()
    if array.dtype.kind == "u":
        _first_bad(df, column, path, array > INT64_MAX, _OUT_OF_RANGE, row0)
    elif array.dtype.kind == "f":
        _first_bad(df, column, path, ~(np.abs(array) < 2.0**63), _OUT_OF_RANGE, row0)
        _first_bad(df, column, path, array != np.round(array),
                   "{path}: {column} {value} in data row {row} is not an integer", row0)
        # A float holds integers exactly only below 2**53; larger ones would be silently rounded.
        _first_bad(df, column, path, np.abs(array) >= 2.0**53,
                   "{path}: {column} {value} in data row {row} is too large to read exactly in a column with decimals", row0)
    return array.astype(np.int64)


def _to_float(df: pd.DataFrame, column: str, path: str, row0: int = 0) -> np.ndarray:
    values = pd.to_numeric(df[column], errors="coerce")
    _first_bad(df, column, path, values.isna().to_numpy(), _NON_NUMERIC, row0)
    with np.errstate(over="ignore"):  # overflow to inf is reported just below
        array = values.to_numpy().astype(np.float32)
    _first_bad(df, column, path, ~np.isfinite(array),
               "{path}: {column} {value} in data row {row} is not a finite number", row0)
    return array


def _interactions(df: pd.DataFrame, path: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (_to_int(df, "user", path), _to_int(df, "item", path),
            _to_int(df, "timestamp", path), _to_float(df, "rating", path))




def _movie_text(title: str, genres: List[str]) -> str:
    """``Title (1995). Genres: Animation, Comedy`` — title carries the year in MovieLens."""
    genres = [g for g in genres if g and g != "(no genres listed)"]
    return f"{title}. Genres: {', '.join(genres)}" if genres else title


def _check_items_have_text(raw: RawInteractions, path: str) -> None:
    missing = np.setdiff1d(np.unique(raw.items), np.fromiter(raw.item_text.keys(), dtype=np.int64))
    if missing.size:
        raise DataError(
            f"{path}: {missing.size} rated items have no item text (first: {int(missing[0])}); "
            "the item file does not match the ratings"
        )


# ----------------------------------------------------------------------------- formats


def _read_ml100k(path: str) -> RawInteractions:
    ratings_path, items_path = input_files(path, "ml-100k")
    df = _read_table(ratings_path, "\t", ["user", "item", "rating", "timestamp"], "latin-1", header=False)
    users, items, timestamps, ratings = _interactions(df, ratings_path)
    item_df = _read_table(items_path, "|", ["item", "title", "release", "video", "url", *ML100K_GENRES],
                          "latin-1", header=False)
    item_ids = _to_int(item_df, "item", items_path)
    flags = item_df[list(ML100K_GENRES)].to_numpy() == "1"
    titles = item_df["title"].tolist()
    text = {int(i): _movie_text(t, [g for g, on in zip(ML100K_GENRES, row) if on])
            for i, t, row in zip(item_ids, titles, flags)}
    return RawInteractions(users, items, timestamps, ratings, dict(zip(item_ids.tolist(), titles)), text,
                           False, "ml-100k")


def _read_ml1m(path: str) -> RawInteractions:
    ratings_path, items_path = input_files(path, "ml-1m")
    df = _read_table(ratings_path, "::", ["user", "item", "rating", "timestamp"], "latin-1", header=False)
    users, items, timestamps, ratings = _interactions(df, ratings_path)
    return _with_movie_file(users, items, timestamps, ratings, items_path, "::", "latin-1", False, "ml-1m")


def _read_ml_latest(path: str) -> RawInteractions:
    ratings_path, items_path = input_files(path, "ml-latest")
    df = _read_table(ratings_path, ",", ["user", "item", "rating", "timestamp"], "utf-8", header=True)
    users, items, timestamps, ratings = _interactions(df, ratings_path)
    return _with_movie_file(users, items, timestamps, ratings, items_path, ",", "utf-8", True, "ml-latest")


def _with_movie_file(users, items, timestamps, ratings, items_path, sep, encoding, header, fmt) -> RawInteractions:
    movie_df = _read_table(items_path, sep, ["item", "title", "genres"], encoding, header=header)
    item_ids = _to_int(movie_df, "item", items_path).tolist()
    titles = movie_df["title"].tolist()
    text = {i: _movie_text(t, g.split("|")) for i, t, g in zip(item_ids, titles, movie_df["genres"].tolist())}
    return RawInteractions(users, items, timestamps, ratings, dict(zip(item_ids, titles)), text, False, fmt)


def _read_amazon(path: str) -> RawInteractions:
    """P5 form: ``sequential.txt`` lines ``user item item ...`` (oldest first), no timestamps.

    Timestamps are the positions 0, 1, 2, ... within each user's sequence (the P5 data has none),
    so HSTU's time bias sees a constant step of 1; ratings are 1.0 (implicit feedback).
    """
    seq_path, items_path = input_files(path, "amazon")
    users, items, positions = _read_amazon_sequences(seq_path)
    titles, item_text = _read_amazon_items(items_path)
    return RawInteractions(users, items, positions, np.ones(users.size, dtype=np.float32), titles, item_text,
                           True, "amazon")


def _read_amazon_sequences(seq_path: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``users [I]``, ``items [I]``, ``positions [I]`` (int64) of ``sequential.txt``."""
    users, items, positions = [], [], []
    for line_no, line in enumerate(_read_text(seq_path, "utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        # str.isdigit alone admits non-ASCII digits ("²", "١"), which int() rejects or reinterprets.
        bad = next((f for f in fields if not (f.isascii() and f.isdigit())), None)
        if bad is not None:
            raise DataError(f"{seq_path}: non-numeric id {bad[:30]!r} at line {line_no} (expected space-separated ids)")
        big = next((f for f in fields if len(f) > 18 and int(f) > INT64_MAX), None)
        if big is not None:
            raise DataError(f"{seq_path}: id {big[:30]!r} at line {line_no} is out of the int64 range")
        if len(fields) < 2:
            raise DataError(f"{seq_path}: line {line_no} has a user but no items")
        n = len(fields) - 1
        users.append(np.full(n, int(fields[0]), dtype=np.int64))
        items.append(np.asarray(fields[1:], dtype=np.int64))
        positions.append(np.arange(n, dtype=np.int64))
    return np.concatenate(users), np.concatenate(items), np.concatenate(positions)


def _read_amazon_items(items_path: str) -> Tuple[Dict[int, str], Dict[int, str]]:
    """``items.jsonl``: one JSON object per line -> (raw id -> title, raw id -> item text)."""
    titles: Dict[int, str] = {}
    item_text: Dict[int, str] = {}
    for line_no, line in enumerate(_read_text(items_path, "utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            obj = None
        item_id = _amazon_item_id(obj)
        if item_id is None:
            raise DataError(f"{items_path}: line {line_no} is not a JSON object with an integer item_id")
        if not -INT64_MAX <= item_id <= INT64_MAX:
            raise DataError(f"{items_path}: item_id {item_id} at line {line_no} is out of the int64 range")
        problem = _amazon_field_problem(obj)
        if problem:
            raise DataError(f"{items_path}: line {line_no}: {problem}")
        titles[item_id] = obj.get("title") or ""
        item_text[item_id] = _amazon_text(obj)
    return titles, item_text


def _amazon_item_id(obj: object) -> Optional[int]:
    """The integer ``item_id`` of a parsed line (a JSON integer or a string of ASCII digits)."""
    if not isinstance(obj, dict):
        return None
    value = obj.get("item_id")
    if isinstance(value, int) and not isinstance(value, bool):  # JSON true is not an id
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value)
    return None


def _json_type(value: object) -> str:
    """The JSON name of a parsed value, for messages."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number"}
    return names.get(type(value), "null")


def _amazon_field_problem(obj: Dict) -> Optional[str]:
    """Why the text fields of an item object have the wrong JSON types (``None`` when they are fine).

    ``title``/``brand``: string or null; ``categories``: array of arrays of strings (category paths).
    """
    for key in ("title", "brand"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            return f"{key} is {_json_type(obj[key])}, expected a string"
    categories = obj.get("categories")
    if categories is None:
        return None
    if not isinstance(categories, list):
        return f"categories is {_json_type(categories)}, expected an array of category paths"
    for p in categories:
        if not isinstance(p, list) or not all(isinstance(c, str) for c in p):
            return f"categories holds {_json_type(p)} {json.dumps(p)[:40]}, expected an array of strings"
    return None


def _amazon_text(obj: Dict) -> str:
    """``Title. Brand: X. Categories: Beauty > Makeup > Nails`` (HTML entities unescaped)."""

    parts = []
    if obj.get("title"):
        parts.append(html.unescape(obj["title"]))
    if obj.get("brand"):
        parts.append(f"Brand: {html.unescape(obj['brand'])}")
    paths = [" > ".join(p) for p in obj.get("categories") or [] if p]
    if paths:
        parts.append(f"Categories: {'; '.join(paths)}")
    return ". ".join(parts)


_READERS: Dict[str, Callable[[str], RawInteractions]] = {
    "ml-100k": _read_ml100k,
    "ml-1m": _read_ml1m,
    "ml-latest": _read_ml_latest,
    "amazon": _read_amazon,
}
