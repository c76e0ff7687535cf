"""The ``interactions`` format: your own Parquet/CSV table(s), read in batches, built into sequences.

``data.path`` is a ``.parquet`` or ``.csv`` file, or a directory of them (read in name order, as
one table), with the columns ``data.user_col``, ``data.item_col``, ``data.time_col`` (default
``user_id``, ``item_id``, ``timestamp``) and optionally ``data.rating_col`` (``rating``; every
rating is 1 when the column is absent). Ids are integers (any int64; CSV fields are parsed as
the other readers parse them), times integer seconds or a Parquet timestamp/date. Optional
``data.items_path`` (a file or directory of the same kinds) holds ``data.item_col`` plus the
``data.text_cols`` that form each item's text (``Title. Genres: Comedy, Drama``: the first
column's value, then ``Col: value`` for each further non-empty one; a list column is joined with
``, ``); its ``title`` column, else the first text column, is the item's title.

Cleaning rules are the other readers': a missing column, a null or non-integer id or time,
an id outside int64, a non-finite rating, an item with interactions but no row in the item
table is a one-line :class:`~sidvid_rec.errors.DataError` naming the file and data row.
Duplicate interaction rows are kept, as every reader keeps them (a repeated (user, item, time)
is a repeated event of the sequence); a repeated item row in the item table: the last one wins,
as in the MovieLens/Amazon item files.

Memory: nothing is loaded whole. :func:`build` makes two passes over the files in batches of
``data.read_batch_rows`` rows (Parquet: one row group's needed columns at a time, cut into
batches; CSV: streamed blocks). Pass 1 reads the user column only and counts each user's rows,
which gives the kept users (``data.min_len``) and every sequence's offsets. Pass 2 reads the
other columns and scatters each row straight into its user's slot of the output arrays (file
order within a user); each user's slot is then sorted by time (stable) in chunks, and the raw
item ids are replaced by 1..N in place. The peak is the output (``T`` x 20 bytes: item, time
and rating arrays) plus per-batch and per-user (``U`` x 24 bytes) working arrays. The result
equals :func:`~sidvid_rec.data.sequences.build_sequences` of the same rows (tested against the
MovieLens reader through ``data convert``).
"""

import os
from typing import Dict, Iterator, List, Tuple

import numpy as np
import pandas as pd

from sidvid_rec import storage
from sidvid_rec.config import DataConfig
from sidvid_rec.data import readers
from sidvid_rec.errors import DataError

SORT_CHUNK_ROWS = 1_000_000
"""Rows of output sorted by time at once (bounds the sort's working memory)."""


def _pa():
    """pyarrow modules, imported on first use (``sidvid-rec --help`` must stay light)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    return pa, pacsv, pq


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()
_M_MMAP_THRESHOLD = -3


def _map_large_allocations() -> None:
    """Pins glibc's mmap threshold at 128 KiB, so every batch-sized array is its own mapping,
    given back to the OS when freed. By default glibc raises the threshold after the first
    large free, and later batch arrays come from the heap, which fragments: the reader's RSS
    then grows with the file (measured: +1 GiB at 50M rows)."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


def release_memory() -> None:
    """Hands freed memory back to the OS (Arrow's pool, glibc's heap)."""
    pa, _, _ = _pa()
    pa.default_memory_pool().release_unused()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


# ----------------------------------------------------------------------------- files


def input_files(path: str, what: str = "data.path") -> List[str]:
    """The ``.parquet``/``.csv`` files of ``path`` (a file, or a directory read in name order)."""
    if not storage.exists(path):
        raise DataError(f"{what} does not exist: {path}")
    if storage.isdir(path):
        names = sorted(n for n in storage.ls(path)
                       if n.lower().endswith(readers.INTERACTIONS_SUFFIXES) and not n.startswith("."))
        files = [os.path.join(path, n) for n in names if not storage.isdir(os.path.join(path, n))]
        if not files:
            raise DataError(f"{what} {path} holds no .parquet or .csv file")
        return files
    if not path.lower().endswith(readers.INTERACTIONS_SUFFIXES):
        raise DataError(f"{what} {path}: the interactions format reads .parquet or .csv files")
    return [path]


def source_files(cfg: DataConfig, path: str) -> Tuple[List[str], List[str]]:
    """(interaction files, item-table files) of ``cfg`` (the item list is empty without ``items_path``)."""
    items = input_files(storage.expand(cfg.items_path), "data.items_path") if cfg.items_path else []
    files = [f for f in input_files(path) if f not in items]  # an item table inside the data directory
    if not files:
        raise DataError(f"data.path {path} holds no interaction file besides the item table")
    return files, items


def fingerprint_extra(cfg: DataConfig, num_interaction_files: int) -> str:
    """What besides the files' bytes shapes the sequences (column choices, which files are which)."""
    return (f"|{num_interaction_files}|{cfg.user_col}|{cfg.item_col}|{cfg.time_col}|{cfg.rating_col}|"
            f"{bool(cfg.items_path)}|{','.join(cfg.text_cols)}")


def _is_parquet(path: str) -> bool:
    return path.lower().endswith(".parquet")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _column_names(path: str) -> List[str]:
    pa, pacsv, pq = _pa()
    try:
        with storage.open_file(path, "rb") as f:
            if _is_parquet(path):
                return list(pq.ParquetFile(f).schema_arrow.names)
            return list(pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 20, use_threads=False)).schema.names)
    except (pa.ArrowException, OSError, ValueError) as e:
        kind = "Parquet" if _is_parquet(path) else "CSV"
        raise DataError(f"{path}: not a readable {kind} file ({_first_line(e)})")


def _batches(path: str, columns: Dict[str, str], batch_rows: int, optional: Tuple[str, ...] = (),
             newlines_in_values: bool = False) -> Iterator[Tuple[int, Dict[str, object]]]:
    """``(rows before the batch, {column: pyarrow array})`` per batch of ``path``.

    ``columns`` maps each needed column to the config key naming it (for the error message);
    ``optional`` columns are read when present. CSV fields are read as strings (parsed by the
    callers with the other readers' rules); an empty CSV field is null.
    """
    pa, pacsv, pq = _pa()
    names = _column_names(path)
    for column, key in columns.items():
        if column not in names:
            shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
            raise DataError(f"{path}: no column {column!r} ({key}; the file has: {shown})")
    wanted = list(columns) + [c for c in optional if c in names and c not in columns]
    row = 0
    try:
        with storage.open_file(path, "rb") as f:
            if _is_parquet(path):
                stream = _parquet_batches(pq.ParquetFile(f), wanted, batch_rows)
            else:
                stream = pacsv.open_csv(
                    f, read_options=pacsv.ReadOptions(block_size=int(min(max(batch_rows * 40, 1 << 16), 1 << 30)),
                                                      use_threads=False),
                    parse_options=pacsv.ParseOptions(newlines_in_values=newlines_in_values),
                    convert_options=pacsv.ConvertOptions(include_columns=wanted, strings_can_be_null=True,
                                                         column_types={c: pa.string() for c in wanted}))
            for batch in stream:
                if batch.num_rows:
                    yield row, {c: batch.column(c) for c in wanted}
                row += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read past data row {row} ({_first_line(e)})")


def _parquet_batches(parquet, columns: List[str], batch_rows: int):
    """The record batches of ``columns``, one row group at a time (``ParquetFile.iter_batches``
    keeps memory of every row group it has read: +1 GiB over a 540 MB file, measured).

    Every read runs on the calling thread (``use_threads=False``): a read handed to Arrow's pool
    can leave a worker alive into interpreter shutdown, which then aborts the finished process
    ("terminate called without an active exception", apache/arrow#34314; seen once in CI)."""
    for group in range(parquet.num_row_groups):
        table = parquet.read_row_group(group, columns=columns, use_threads=False)
        yield from table.to_batches(max_chunksize=batch_rows)
        del table


def _ints(array, path: str, column: str, row0: int, times: bool = False) -> np.ndarray:
    """``array`` (one batch of a column) as int64, checked like the text readers check ids."""
    pa, _, _ = _pa()
    kind = array.type
    if array.null_count:
        first = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{path}: null {column} in data row {row0 + first + 1}")
    if times and (pa.types.is_timestamp(kind) or pa.types.is_date(kind)):
        if pa.types.is_date32(kind):
            return array.cast(pa.int32()).to_numpy().astype(np.int64) * 86400
        if pa.types.is_date64(kind):
            return array.cast(pa.int64()).to_numpy() // 1000
        per_second = {"s": 1, "ms": 1000, "us": 1_000_000, "ns": 1_000_000_000}[kind.unit]
        return array.cast(pa.int64()).to_numpy() // per_second
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        values = array.to_numpy()
        if values.dtype == np.int64:
            return values
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        values = array.to_numpy(zero_copy_only=False)
    else:
        raise DataError(f"{path}: column {column} holds {kind} values, expected integers")
    return readers._to_int(pd.DataFrame({column: values}, copy=False), column, path, row0)


def _floats(array, path: str, column: str, row0: int) -> np.ndarray:
    pa, _, _ = _pa()
    kind = array.type
    if array.null_count:
        first = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{path}: null {column} in data row {row0 + first + 1}")
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_string(kind)
            or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {column} holds {kind} values, expected numbers")
    values = array.to_numpy(zero_copy_only=False)
    return readers._to_float(pd.DataFrame({column: values}, copy=False), column, path, row0)


# ----------------------------------------------------------------------------- item table


def _texts(array) -> List[str]:
    """A text column's values as strings (null -> ``""``, a list joined with ``, ``)."""
    pa, _, _ = _pa()
    values = array.to_pylist()
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        return [", ".join(str(v) for v in x if v is not None) if x else "" for x in values]
    return ["" if v is None else str(v) for v in values]


def _label(column: str) -> str:
    name = column.replace("_", " ")
    return name[:1].upper() + name[1:]


def item_text(values: List[str], columns: List[str]) -> str:
    """``<first>. <Col2>: <v2>. ...``, empty values skipped (the MovieLens/Amazon text layout)."""
    parts = [values[0]] if values and values[0] else []
    parts += [f"{_label(c)}: {v}" for c, v in zip(columns[1:], values[1:]) if v]
    return ". ".join(parts)


def read_items(files: List[str], cfg: DataConfig) -> Tuple[Dict[int, str], Dict[int, str]]:
    """(raw item id -> title, raw item id -> text) of the item table."""
    if not cfg.text_cols:
        raise DataError("data.text_cols is empty: name the item-table columns that form an item's text")
    titles: Dict[int, str] = {}
    texts: Dict[int, str] = {}
    columns = {cfg.item_col: "data.item_col", **{c: "data.text_cols" for c in cfg.text_cols}}
    for path in files:
        title_col = "title" if "title" in _column_names(path) else cfg.text_cols[0]
        for row0, batch in _batches(path, columns, cfg.read_batch_rows, optional=(title_col,),
                                    newlines_in_values=True):
            ids = _ints(batch[cfg.item_col], path, cfg.item_col, row0).tolist()
            values = [_texts(batch[c]) for c in cfg.text_cols]
            title_values = _texts(batch[title_col])
            for j, item in enumerate(ids):  # a repeated item: the last row wins
                titles[item] = title_values[j]
                texts[item] = item_text([v[j] for v in values], cfg.text_cols)
    if not texts:
        raise DataError(f"data.items_path {cfg.items_path} has no data rows")
    return titles, texts


# ----------------------------------------------------------------------------- build


class _UniqueIds:
    """The sorted distinct ids of a stream of batches, merged every few batches (bounded memory)."""

    def __init__(self) -> None:
        self.ids = np.empty(0, dtype=np.int64)
        self.counts = np.empty(0, dtype=np.int64)
        self._pending: List[Tuple[np.ndarray, np.ndarray]] = []

    def add(self, values: np.ndarray) -> None:
        self._pending.append(np.unique(values, return_counts=True))
        if len(self._pending) >= 8:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        ids = np.concatenate([self.ids] + [p[0] for p in self._pending])
        counts = np.concatenate([self.counts] + [p[1] for p in self._pending])
        self._pending = []
        self.ids, inverse = np.unique(ids, return_inverse=True)
        self.counts = np.bincount(inverse, weights=counts, minlength=self.ids.size).astype(np.int64)

    def result(self) -> Tuple[np.ndarray, np.ndarray]:
        self._merge()
        return self.ids, self.counts


def _count_users(files: List[str], cfg: DataConfig) -> Tuple[np.ndarray, np.ndarray]:
    """Pass 1: sorted distinct user ids and each one's number of rows."""
    users = _UniqueIds()
    for path in files:
        for row0, batch in _batches(path, {cfg.user_col: "data.user_col"}, cfg.read_batch_rows):
            users.add(_ints(batch[cfg.user_col], path, cfg.user_col, row0))
            del batch
            release_memory()
    return users.result()


def _sort_by_time(offsets: np.ndarray, items: np.ndarray, times: np.ndarray, ratings: np.ndarray,
                  chunk_rows: int) -> None:
    """Sorts each user's slot by time, stable (file order breaks ties), in place, chunk by chunk."""
    num_users = offsets.size - 1
    u0 = 0
    while u0 < num_users:
        u1 = int(np.searchsorted(offsets, offsets[u0] + chunk_rows, side="right")) - 1
        u1 = min(max(u1, u0 + 1), num_users)
        lo, hi = int(offsets[u0]), int(offsets[u1])
        t = times[lo:hi]
        starts = offsets[u0:u1] - lo
        step_down = np.diff(t) < 0
        step_down[starts[1:] - 1] = False  # a user boundary may go back in time
        if step_down.any():
            local = np.repeat(np.arange(u1 - u0), np.diff(offsets[u0:u1 + 1]))
            order = np.lexsort((np.arange(hi - lo), t, local))
            items[lo:hi] = items[lo:hi][order]
            times[lo:hi] = t[order]
            ratings[lo:hi] = ratings[lo:hi][order]
            del local, order
            release_memory()
        u0 = u1


def build(cfg: DataConfig, path: str, fingerprint: str, chunk_rows: int = SORT_CHUNK_ROWS):
    """The :class:`~sidvid_rec.data.sequences.SequenceData` of the interactions at ``path``
    (``chunk_rows``: output rows sorted or remapped at once)."""
    from sidvid_rec.data.sequences import SequenceData  # here: sequences imports this module

    _map_large_allocations()
    files, item_files = source_files(cfg, path)
    titles, texts = read_items(item_files, cfg) if item_files else ({}, {})
    user_ids, counts = _count_users(files, cfg)
    if user_ids.size == 0:
        raise DataError("the data set holds no interactions")
    keep_user = counts >= cfg.min_len  # none kept: pass 2 still checks every row, then refuses
    kept_ids, kept_counts = user_ids[keep_user], counts[keep_user]
    dropped = int((~keep_user).sum())
    del user_ids, counts, keep_user
    offsets = np.concatenate([[0], np.cumsum(kept_counts)]).astype(np.int64)
    total = int(offsets[-1])
    items = np.empty(total, dtype=np.int64)  # raw ids until the remap below
    times = np.empty(total, dtype=np.int64)
    ratings = np.empty(total, dtype=np.float32)
    filled = np.zeros(kept_ids.size, dtype=np.int64)
    all_items, kept_items = _UniqueIds(), _UniqueIds()
    columns = {cfg.user_col: "data.user_col", cfg.item_col: "data.item_col", cfg.time_col: "data.time_col"}
    for file in files:
        for row0, batch in _batches(file, columns, cfg.read_batch_rows, optional=(cfg.rating_col,)):
            u = _ints(batch[cfg.user_col], file, cfg.user_col, row0)
            i = _ints(batch[cfg.item_col], file, cfg.item_col, row0)
            t = _ints(batch[cfg.time_col], file, cfg.time_col, row0, times=True)
            r = (_floats(batch[cfg.rating_col], file, cfg.rating_col, row0) if cfg.rating_col in batch
                 else np.ones(u.size, dtype=np.float32))
            all_items.add(i)
            slot = np.searchsorted(kept_ids, u)
            ok = slot < kept_ids.size
            ok[ok] = kept_ids[slot[ok]] == u[ok]
            slot = slot[ok]
            if slot.size == 0:
                continue
            order = np.argsort(slot, kind="stable")  # rows of one user in file order
            slot = slot[order]
            starts = np.flatnonzero(np.concatenate([[True], slot[1:] != slot[:-1]]))
            sizes = np.diff(np.concatenate([starts, [slot.size]]))
            rank = np.arange(slot.size) - np.repeat(starts, sizes)
            dest = offsets[slot] + filled[slot] + rank
            if dest.size and int((filled[slot[starts]] + sizes > kept_counts[slot[starts]]).sum()):
                raise DataError(f"{file} changed while it was being read; run again")
            kept = i[ok][order]
            items[dest], times[dest], ratings[dest] = kept, t[ok][order], r[ok][order]
            filled[slot[starts]] += sizes
            kept_items.add(kept)
            del batch, u, i, t, r, slot, ok, order, starts, sizes, rank, dest, kept
            release_memory()
    if kept_ids.size == 0:
        raise DataError(f"no user has at least data.min_len={cfg.min_len} interactions")
    if not np.array_equal(filled, kept_counts):
        raise DataError(f"{path} changed while it was being read; run again")
    del filled, kept_counts
    rated = all_items.result()[0]
    if item_files:
        known = np.fromiter(texts.keys(), dtype=np.int64, count=len(texts))
        missing = np.setdiff1d(rated, known)
        if missing.size:
            raise DataError(f"{cfg.items_path}: {missing.size} rated items have no item text (first: "
                            f"{int(missing[0])}); the item table does not match the interactions")
    _sort_by_time(offsets, items, times, ratings, chunk_rows)
    item_raw_ids = kept_items.result()[0]
    for lo in range(0, total, chunk_rows):  # raw ids -> 1..N, in place
        items[lo:lo + chunk_rows] = np.searchsorted(item_raw_ids, items[lo:lo + chunk_rows]) + 1
    raw = item_raw_ids.tolist()
    if item_files:
        item_title = [""] + [titles.get(i, "") for i in raw]
        item_texts = [""] + [texts[i] for i in raw]
    else:
        item_title, item_texts = [""] * (len(raw) + 1), [""] + [f"item {i}" for i in raw]
    return SequenceData(
        item_values=items, timestamps=times, ratings=ratings, offsets=offsets, user_raw_ids=kept_ids,
        item_raw_ids=np.concatenate([[-1], item_raw_ids]).astype(np.int64), item_title=item_title,
        item_text=item_texts, dropped_users=dropped, timestamps_are_positions=False, format=readers.INTERACTIONS,
        fingerprint=fingerprint)


# ----------------------------------------------------------------------------- convert


def write_tables(raw: "readers.RawInteractions", out: str, items_out: str, cfg: DataConfig) -> Dict[str, object]:
    """Writes ``raw`` (any reader's output) as an interactions table at ``out`` and its item table
    (``item_col``, ``title``, ``text``) at ``items_out``; the format follows each name's ending.
    Both are written atomically (temporaries renamed when complete)."""
    pa, pacsv, pq = _pa()
    for target in (out, items_out):
        if not target.lower().endswith(readers.INTERACTIONS_SUFFIXES):
            raise DataError(f"{target}: the output must end in .parquet or .csv")
    if os.path.abspath(out) == os.path.abspath(items_out):
        raise DataError(f"--out and --items-out are the same file: {out}")
    table = pa.table({cfg.user_col: raw.users, cfg.item_col: raw.items, cfg.time_col: raw.timestamps,
                      cfg.rating_col or "rating": raw.ratings})
    ids = sorted(raw.item_text)
    items = pa.table({cfg.item_col: pa.array(ids, type=pa.int64()),
                      "title": pa.array([raw.item_title.get(i, "") for i in ids], type=pa.string()),
                      "text": pa.array([raw.item_text[i] for i in ids], type=pa.string())})

    def write(t, path: str, f) -> None:
        if _is_parquet(path):
            pq.write_table(t, f, row_group_size=1_000_000)
        else:
            pacsv.write_csv(t, pa.PythonFile(f, mode="w"))

    with storage.atomic_open(out, "wb") as f, storage.atomic_open(items_out, "wb") as g:
        write(items, items_out, g)
        write(table, out, f)
    return {"interactions": out, "items": items_out, "rows": table.num_rows, "item_rows": items.num_rows,
            "config": [f"data.format={readers.INTERACTIONS}", f"data.path={out}", f"data.items_path={items_out}",
                       "data.text_cols=[text]"]}
