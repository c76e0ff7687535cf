"""``data.format: interactions``: your own Parquet/CSV tables, streamed in batches.

The result must equal the in-memory builder (``build_sequences``) on the same rows, and a
built-in data set converted with ``data convert`` must give the native reader's sequences.
"""

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from sidvid_rec.cli import main
from sidvid_rec.config import DataConfig
from sidvid_rec.data import interactions, load_sequences
from sidvid_rec.data.readers import RawInteractions
from sidvid_rec.data.sequences import build_sequences

ARRAYS = ("item_values", "timestamps", "ratings", "offsets", "user_raw_ids", "item_raw_ids")


def _same(a, b):
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert a.item_text == b.item_text and a.item_title == b.item_title
    assert a.dropped_users == b.dropped_users and a.timestamps_are_positions == b.timestamps_are_positions


def _synthetic(seed=0, users=30, rows=400):
    """Rows in random order with time ties, exact duplicate rows and users below min_len."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, rows) * 1000 + 7
    i = rng.choice(np.array([5, 9, 2**40, 13, 77, 3, 1 << 62]), rows)
    t = rng.integers(0, 20, rows)  # many ties: file order must break them
    r = rng.integers(1, 6, rows).astype(np.float32)
    dup = rng.integers(0, rows, 40)
    u, i, t, r = (np.concatenate([x, x[dup]]) for x in (u, i, t, r))
    return u.astype(np.int64), i.astype(np.int64), t.astype(np.int64), r


def _items_table():
    ids = [5, 9, 2**40, 13, 77, 3, 1 << 62, 999]
    return pa.table({"item_id": ids, "title": [f"T{k}" for k in range(8)],
                     "genres": [["Drama", "Comedy"], [], None, ["X"], ["Y"], ["Z"], ["W"], ["V"]]})


def _write(table, path):
    if str(path).endswith(".parquet"):
        pq.write_table(table, str(path), row_group_size=37)
    else:
        pacsv.write_csv(table, str(path))


@pytest.mark.parametrize("ext", [".parquet", ".csv"])
def test_streamed_build_equals_the_in_memory_builder(tmp_path, ext):
    u, i, t, r = _synthetic()
    table = pa.table({"user_id": u, "item_id": i, "timestamp": t, "rating": r})
    items = tmp_path / f"items{ext}"
    _write(table, tmp_path / f"all{ext}")
    if ext == ".csv":  # CSV has no list columns: genres as text
        pacsv.write_csv(pa.table({"item_id": _items_table()["item_id"], "title": _items_table()["title"],
                                  "genres": ["Drama, Comedy", "", None, "X", "Y", "Z", "W", "V"]}), str(items))
    else:
        pq.write_table(_items_table(), str(items))
    cfg = DataConfig(path=str(tmp_path / f"all{ext}"), format="interactions", min_len=12, items_path=str(items),
                     read_batch_rows=50, cache_dir=str(tmp_path / "cache"))
    got = interactions.build(cfg, cfg.path, "fp", chunk_rows=40)
    texts = {5: "T0. Genres: Drama, Comedy", 9: "T1", 2**40: "T2", 13: "T3. Genres: X", 77: "T4. Genres: Y",
             3: "T5. Genres: Z", 1 << 62: "T6. Genres: W", 999: "T7. Genres: V"}
    titles = {k: v.split(".")[0] for k, v in texts.items()}
    expected = build_sequences(RawInteractions(u, i, t, r, titles, texts, False, "interactions"), 12, "fp")
    _same(got, expected)
    assert expected.dropped_users > 0 and got.item_values.size > 300
    # A directory of files reads as one table in name order; the cache round-trips it.
    parts = tmp_path / "dir"
    parts.mkdir()
    for k, (lo, hi) in enumerate([(0, 100), (100, 101), (101, len(u))]):
        _write(table.slice(lo, hi - lo), parts / f"part-{k}{ext}")
    for use_cache in (False, True):
        loaded = load_sequences(dataclasses.replace(cfg, path=str(parts)), use_cache=use_cache)
        _same(loaded, expected)
        assert loaded.format == "interactions"
    # Without a rating column every rating is 1; without an item table the text is "item <id>".
    _write(table.drop_columns(["rating"]), tmp_path / f"norating{ext}")
    plain = load_sequences(dataclasses.replace(cfg, path=str(tmp_path / f"norating{ext}"), items_path=""))
    assert np.all(plain.ratings == 1) and plain.item_text[1] == f"item {plain.item_raw_ids[1]}"
    assert np.array_equal(plain.item_values, expected.item_values)


def test_custom_columns_and_parquet_timestamps(tmp_path):
    u, i, t, _ = _synthetic(seed=1)
    when = pa.array((t * 1000 + 1_600_000_000_000).tolist(), type=pa.timestamp("ms"))
    pq.write_table(pa.table({"uid": u, "sku": i, "at": when}), str(tmp_path / "x.parquet"))
    pq.write_table(_items_table().rename_columns(["sku", "name", "genres"]), str(tmp_path / "items.parquet"))
    cfg = DataConfig(path=str(tmp_path / "x.parquet"), format="auto", user_col="uid", item_col="sku", time_col="at",
                     items_path=str(tmp_path / "items.parquet"), text_cols=["name"], min_len=3,
                     cache_dir=str(tmp_path / "cache"))
    got = load_sequences(cfg)
    assert got.format == "interactions"
    assert got.timestamps.min() >= 1_600_000_000 and got.item_text[1:3] == ["T5", "T0"]  # raw ids 3, 5
    # Changing a column setting is another cache entry (the fingerprint covers it).
    other = load_sequences(dataclasses.replace(cfg, text_cols=["name", "genres"]))
    assert other.fingerprint != got.fingerprint and other.item_text[2] == "T0. Genres: Drama, Comedy"


def test_convert_round_trip_gives_the_native_sequences(ml100k_path, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    native = load_sequences(DataConfig(path=ml100k_path, cache_dir=cache, min_len=30))
    for ext in (".parquet", ".csv"):
        out = tmp_path / f"ml{ext}"
        capsys.readouterr()
        assert main(["data", "convert", ml100k_path, "--out", str(out)]) == 0
        summary = __import__("json").loads(capsys.readouterr().out)
        assert summary["rows"] == 100_000 and summary["items"] == str(tmp_path / f"ml.items{ext}")
        cfg = DataConfig(path=str(out), format="interactions", items_path=summary["items"], text_cols=["text"],
                         cache_dir=cache, min_len=30, read_batch_rows=7_000)
        _same(load_sequences(cfg), native)


def _malformed(tmp_path, name, table=None, text=None):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    else:
        _write(table, path)
    return str(path)


GOOD = "user_id,item_id,timestamp\n1,10,100\n1,11,101\n1,12,102\n"
CASES = {
    "missing column (csv)": ("a.csv", "user_id,item,timestamp\n1,10,100\n", "no column 'item_id' (data.item_col"),
    "missing column (parquet)": ("a.parquet", pa.table({"user_id": [1], "timestamp": [1]}), "no column 'item_id'"),
    "null id (csv)": ("a.csv", GOOD + ",13,103\n", "null user_id in data row 4"),
    "null id (parquet)": ("a.parquet", pa.table({"user_id": [1, None], "item_id": [1, 2], "timestamp": [1, 2]}),
                          "null user_id in data row 2"),
    "non-numeric timestamp (csv)": ("a.csv", GOOD + "1,13,yesterday\n",
                                    "non-numeric timestamp 'yesterday' in data row 4"),
    "non-numeric timestamp (parquet)": ("a.parquet", pa.table({"user_id": [1], "item_id": [1], "timestamp": ["x"]}),
                                        "non-numeric timestamp 'x' in data row 1"),
    "decimal id": ("a.csv", GOOD + "1,13.5,103\n", "item_id '13.5' in data row 4 is not an integer"),
    "id out of int64 (csv)": ("a.csv", GOOD + "9223372036854775808,13,103\n", "is out of the int64 range"),
    "id out of int64 (parquet)": ("a.parquet", pa.table({"user_id": pa.array([2**63], pa.uint64()), "item_id": [1],
                                                         "timestamp": [1]}), "is out of the int64 range"),
    "boolean ids": ("a.parquet", pa.table({"user_id": [True], "item_id": [1], "timestamp": [1]}),
                    "column user_id holds bool values, expected integers"),
    "not parquet": ("a.parquet", "this is not parquet", "not a readable Parquet file"),
    "ragged csv": ("a.csv", GOOD + "1,13,103,7\n", "Expected 3 columns, got 4"),
    "wrong extension": ("a.txt", GOOD, "not a directory nor a .parquet/.csv file"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_input_is_one_line_exit_2(tmp_path, capsys, case):
    name, content, message = CASES[case]
    path = _malformed(tmp_path, name, **({"text": content} if isinstance(content, str) else {"table": content}))
    capsys.readouterr()
    rc = main(["data", "prepare", path, f"data.cache_dir={tmp_path / 'cache'}", "data.min_len=3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "cache" / "sequences").exists() or not list((tmp_path / "cache" / "sequences").iterdir())


def test_item_table_errors_and_duplicates(tmp_path, capsys):
    data = _malformed(tmp_path, "d.csv", text=GOOD + GOOD.split("\n", 1)[1])  # duplicate rows are kept, as every reader keeps them
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    capsys.readouterr()
    assert main(["data", "stats", data, cache, "data.min_len=3", "data.format=interactions"]) == 0
    assert __import__("json").loads(capsys.readouterr().out)["interactions"] == 6

    def error(items, *extra):
        capsys.readouterr()
        assert main(["data", "prepare", data, cache, "data.min_len=3", f"data.items_path={items}", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    items = _malformed(tmp_path, "i.csv", text="item_id,title,genres\n10,A,x\n11,B,y\n")
    assert "1 rated items have no item text (first: 12)" in error(items)
    assert "no column 'genres' (data.text_cols" in error(_malformed(tmp_path, "j.csv", text="item_id,title\n10,A\n"))
    assert "does not exist" in error(str(tmp_path / "nope.parquet"))
    # Repeated item rows: the last wins (as in the MovieLens/Amazon item files).
    items = _malformed(tmp_path, "k.csv", text='item_id,title,genres\n10,A,x\n11,B,y\n12,C,"z, w"\n10,A2,\n')
    capsys.readouterr()
    got = load_sequences(DataConfig(path=data, items_path=items, min_len=3, cache_dir=str(tmp_path / "cache")))
    assert got.item_text == ["", "A2", "B. Genres: y", "C. Genres: z, w"] and got.item_title[1] == "A2"


def test_item_table_inside_the_data_directory_is_not_read_as_interactions(tmp_path):
    u, i, t, r = _synthetic(seed=2)
    pq.write_table(pa.table({"user_id": u, "item_id": i, "timestamp": t}), str(tmp_path / "a.parquet"))
    pq.write_table(_items_table(), str(tmp_path / "items.parquet"))
    cfg = DataConfig(path=str(tmp_path), items_path=str(tmp_path / "items.parquet"), min_len=3,
                     cache_dir=str(tmp_path / "cache"))
    got = load_sequences(cfg)
    assert got.format == "interactions" and got.item_values.size == u.size


def test_bench_byod_runs_at_a_tiny_size(tmp_path):
    import os
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from benchmarks.bench_byod import generate, run_prepare

    path, items = str(tmp_path / "x.parquet"), str(tmp_path / "items.parquet")
    assert generate(path, items, users=300, per_user=8, items=50)["rows"] == 2400
    result = run_prepare(path, items, str(tmp_path / "cache"))
    assert result["stats"]["users"] == 300 and result["stats"]["interactions"] == 2400
    assert 0 < result["peak_rss_gib"] < 2
