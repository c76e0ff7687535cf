"""Readers on tiny synthetic files of every format, hostile inputs and a damaged cache.

Nothing here needs ../shared: every data set is written to tmp_path by the test itself.
"""

import glob
import hashlib
import json
import os
import shutil
import time

import numpy as np
import pytest

from sidvid_rec.cli import main
from sidvid_rec.config import DataConfig
from sidvid_rec.data import load_sequences, readers
from sidvid_rec.data.sequences import SequenceData, cache_path, fingerprint


def _write(directory, files) -> str:
    os.makedirs(directory, exist_ok=True)
    for name, content in files.items():
        target = os.path.join(directory, name)
        if content is None:  # a directory where the reader expects a file
            os.makedirs(target)
            continue
        data = content if isinstance(content, bytes) else content.encode("utf-8")
        with open(target, "wb") as f:
            f.write(data)
    return str(directory)


# ----------------------------------------------------------------------------- readers, one per format

ML_LATEST = {
    "ratings.csv": "userId,movieId,rating,timestamp\n7,20,4.5,300\n7,10,3.0,100\n\n3,10,5.0,200\n3,30,0.5,50\n",
    "movies.csv": 'movieId,title,genres\n10,Toy Story (1995),Animation|Comedy\n20,"Heat, The (1995)",Action\n'
                  "30,Brief (2001),(no genres listed)\n",
}


def _assert_raw(raw, users, items, timestamps, ratings):
    assert raw.users.dtype == raw.items.dtype == raw.timestamps.dtype == np.int64 and raw.ratings.dtype == np.float32
    assert raw.users.tolist() == users and raw.items.tolist() == items and raw.timestamps.tolist() == timestamps
    assert raw.ratings.tolist() == ratings


@pytest.mark.parametrize("fmt", ["auto", "ml-latest", "ml-20m"])
def test_ml_latest_reader(tmp_path, fmt):
    raw = readers.read(_write(tmp_path / "d", ML_LATEST), fmt)
    assert raw.format == "ml-latest" and not raw.timestamps_are_positions
    _assert_raw(raw, [7, 7, 3, 3], [20, 10, 10, 30], [300, 100, 200, 50], [4.5, 3.0, 5.0, 0.5])
    assert raw.item_title == {10: "Toy Story (1995)", 20: "Heat, The (1995)", 30: "Brief (2001)"}
    assert raw.item_text == {10: "Toy Story (1995). Genres: Animation, Comedy", 20: "Heat, The (1995). Genres: Action",
                             30: "Brief (2001)"}


@pytest.mark.parametrize("fmt", ["auto", "ml-1m", "ml-10m"])
def test_ml1m_reader_latin1(tmp_path, fmt):
    files = {"ratings.dat": "5::2::4::978300760\n5::1::3::978300000\n9::2::1::1\n",
             "movies.dat": "1::Caf\xe9 (1999)::Drama|Romance\n2::Jumanji (1995)::Adventure\n".encode("latin-1")}
    raw = readers.read(_write(tmp_path / "d", files), fmt)
    assert raw.format == "ml-1m"
    _assert_raw(raw, [5, 5, 9], [2, 1, 2], [978300760, 978300000, 1], [4.0, 3.0, 1.0])
    assert raw.item_text == {1: "Café (1999). Genres: Drama, Romance", 2: "Jumanji (1995). Genres: Adventure"}


def test_ml100k_reader(tmp_path):
    flags = ["0"] * len(readers.ML100K_GENRES)
    comedy = list(flags)
    comedy[readers.ML100K_GENRES.index("Comedy")] = "1"
    items = f"1|Toy Story (1995)|01-Jan-1995||http://x|{'|'.join(comedy)}\n2|Other (1996)|||u|{'|'.join(flags)}\n"
    raw = readers.read(_write(tmp_path / "d", {"u.data": "4\t2\t3\t881250949\n4\t1\t5\t881250000\n", "u.item": items}))
    _assert_raw(raw, [4, 4], [2, 1], [881250949, 881250000], [3.0, 5.0])
    assert raw.item_text == {1: "Toy Story (1995). Genres: Comedy", 2: "Other (1996)"}


def test_amazon_reader(tmp_path):
    items = ('{"item_id": 1, "title": "Nail &amp; Polish", "brand": "OPI", "categories": [["Beauty", "Nails"], []]}\n'
             '{"item_id": "2", "categories": [["Beauty", "Skin"], ["Gifts"]], "brand": null}\n'
             '{"item_id": 3, "title": "Soap"}\n')
    raw = readers.read(_write(tmp_path / "d", {"sequential.txt": "10 1 2 3\n\n11 3 1\n", "items.jsonl": items}))
    assert raw.format == "amazon" and raw.timestamps_are_positions
    _assert_raw(raw, [10, 10, 10, 11, 11], [1, 2, 3, 3, 1], [0, 1, 2, 0, 1], [1.0] * 5)
    assert raw.item_title == {1: "Nail &amp; Polish", 2: "", 3: "Soap"}
    assert raw.item_text == {1: "Nail & Polish. Brand: OPI. Categories: Beauty > Nails",
                             2: "Categories: Beauty > Skin; Gifts", 3: "Soap"}


def test_synthetic_sequences_are_time_ordered_and_remapped(tmp_path):
    data = load_sequences(DataConfig(path=_write(tmp_path / "d", ML_LATEST), cache_dir=str(tmp_path / "c"), min_len=1))
    assert data.user_raw_ids.tolist() == [3, 7] and data.item_raw_ids.tolist() == [-1, 10, 20, 30]
    # User 3: item 30 at t=50, then item 10 at t=200; user 7: item 10 at t=100, then 20 at t=300.
    assert data.item_values.tolist() == [3, 1, 1, 2] and data.timestamps.tolist() == [50, 200, 100, 300]
    assert data.offsets.tolist() == [0, 2, 4] and data.item_text[2] == "Heat, The (1995). Genres: Action"


# ----------------------------------------------------------------------------- hostile inputs

MOVIES = "movieId,title,genres\n1,Toy Story (1995),Animation|Comedy\n2,B (1990),Drama\n"
RATINGS = "userId,movieId,rating,timestamp\n"
DAT_MOVIES = "1::A (1990)::Drama\n"
SEQ = "1 2\n"
ITEM = '{"item_id": 2, "title": "ok"}\n'
GARBAGE = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))


def _csv(rows: str) -> dict:
    return {"ratings.csv": RATINGS + rows, "movies.csv": MOVIES}


def _dat(rows, movies=DAT_MOVIES) -> dict:
    return {"ratings.dat": rows, "movies.dat": movies}


def _amz(items=ITEM, seq=SEQ) -> dict:
    return {"sequential.txt": seq, "items.jsonl": items}


@pytest.mark.parametrize(
    "files, message",
    [
        # a directory where a file is expected
        ({"ratings.csv": None, "movies.csv": MOVIES}, "ratings.csv is a directory"),
        ({"ratings.dat": "1::1::5::3\n", "movies.dat": None}, "movies.dat is a directory"),
        (_amz(None), "items.jsonl is a directory"),
        # non-ASCII digits
        (_csv("\u0661,1,5,3\n"), "non-numeric user"),
        (_dat("1::\uff11::5::3\n"), "non-numeric item"),
        (_amz(seq="1 \u0662\n"), "non-numeric id"),
        (_amz(seq="1 2\u00b2\n"), "non-numeric id"),
        # ids and timestamps beyond int64, non-integers, non-finite values
        (_csv("1e30,1,5,3\n"), "user '1e30' in data row 1 is out of the int64"),
        (_csv("1,99999999999999999999,5,3\n"), "out of the int64 range"),
        (_csv("9223372036854775808,1,5,3\n"), "out of the int64 range"),
        (_csv("1,1,5,3\n1,2,5,inf\n"), "timestamp 'inf' in data row 2"),
        (_csv("1,1,5,3.5\n"), "timestamp '3.5' in data row 1 is not an integer"),
        (_csv("1,1.5,5,3\n1,9007199254740993,5,3\n"), "is not an integer"),
        (_csv("1,1.0,5,3\n1,9007199254740993,5,3\n"), "too large to read exactly"),
        (_dat("1::1::1e40::3\n"), "rating '1e40' in data row 1 is not a finite"),
        (_dat("1::1::nan::3\n"), "non-numeric rating"),
        (_amz(seq="1 99999999999999999999\n"), "out of the int64 range"),
        # Amazon item metadata of the wrong JSON type
        (_amz('{"item_id": 2, "title": 5}\n'), "title is a number"),
        (_amz('{"item_id": 2, "brand": ["x"]}\n'), "brand is an array"),
        (_amz('{"item_id": 2, "categories": "Beauty"}\n'), "categories is a string"),
        (_amz('{"item_id": 2, "categories": ["Beauty"]}\n'), "categories holds a string"),
        (_amz('{"item_id": 2, "categories": [[1]]}\n'), "categories holds an array"),
        (_amz('{"item_id": 2.5}\n'), "line 1 is not a JSON object with an integer item_id"),
        (_amz('{"item_id": true}\n'), "not a JSON object with an integer item_id"),
        (_amz('{"item_id": "\u0662"}\n'), "not a JSON object with an integer item_id"),
        (_amz(ITEM + '{"item_id": 1e30}\n'), "line 2 is not a JSON object"),
        (_amz(ITEM + '{"item_id": 99999999999999999999}\n'), "out of the int64"),
        (_amz('[{"item_id": 2}]\n'), "not a JSON object with an integer item_id"),
        (_amz("[" * 100000 + "\n"), "not a JSON object with an integer item_id"),
        # empty and binary files
        (_dat(""), "ratings.dat is empty"),
        (_amz(seq=" \n\n"), "sequential.txt is empty"),
        (_amz(""), "items.jsonl is empty"),
        (_dat(GARBAGE), "NUL byte"),
        ({"ratings.dat": "1::1::5::3\n", "movies.dat": b"1::A\x00::B\n"}, "movies.dat: NUL byte at line 1"),
        ({"ratings.csv": GARBAGE, "movies.csv": MOVIES}, "ratings.csv"),
        (_amz(seq=GARBAGE), "sequential.txt"),
        (_amz(GARBAGE), "items.jsonl"),
    ],
)
def test_malformed_input_one_line_error_nothing_written(tmp_path, capsys, files, message):
    path = _write(tmp_path / "data", files)
    cache = tmp_path / "cache"
    assert main(["data", "prepare", path, f"data.cache_dir={cache}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not cache.exists()


# ----------------------------------------------------------------------------- the cache


def _same(a: SequenceData, b: SequenceData) -> bool:
    arrays = ["item_values", "timestamps", "ratings", "offsets", "user_raw_ids", "item_raw_ids"]
    return (all(np.array_equal(getattr(a, k), getattr(b, k)) and getattr(a, k).dtype == getattr(b, k).dtype
                for k in arrays)
            and (a.item_title, a.item_text, a.dropped_users, a.timestamps_are_positions, a.format, a.fingerprint)
            == (b.item_title, b.item_text, b.dropped_users, b.timestamps_are_positions, b.format, b.fingerprint))


def _edit_meta(change):
    def damage(entry):
        path = os.path.join(entry, "items.json")
        with open(path) as f:
            meta = json.load(f)
        change(meta)
        with open(path, "w") as f:
            json.dump(meta, f)
    return damage


def _rewrite_npz(change):
    def damage(entry):
        path = os.path.join(entry, "sequences.npz")
        arrays = dict(np.load(path))
        change(arrays)
        np.savez(path, **arrays)
    return damage


def _bytes(name, change):
    def damage(entry):
        path = os.path.join(entry, name)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(change(data))
    return damage


DAMAGES = {
    "npz truncated": _bytes("sequences.npz", lambda b: b[: len(b) // 2]),
    "npz byte flipped": _bytes("sequences.npz", lambda b: b[:300] + bytes([b[300] ^ 0xFF]) + b[301:]),
    "npz garbage": _bytes("sequences.npz", lambda b: GARBAGE),
    "npz empty": _bytes("sequences.npz", lambda b: b""),
    "npz a lone npy": lambda entry: np.save(os.path.join(entry, "sequences.npz.npy"), np.arange(3))
    or os.replace(os.path.join(entry, "sequences.npz.npy"), os.path.join(entry, "sequences.npz")),
    "npz missing array": _rewrite_npz(lambda a: a.pop("offsets")),
    "npz wrong dtype": _rewrite_npz(lambda a: a.update(item_values=a["item_values"].astype(np.float64))),
    "npz ids out of range": _rewrite_npz(lambda a: a.update(item_values=a["item_values"] + 100)),
    "npz offsets inconsistent": _rewrite_npz(lambda a: a.update(offsets=a["offsets"][::-1].copy())),
    "npz removed": lambda entry: os.remove(os.path.join(entry, "sequences.npz")),
    "json not json": _bytes("items.json", lambda b: b"{not json"),
    "json garbage bytes": _bytes("items.json", lambda b: GARBAGE),
    "json truncated": _bytes("items.json", lambda b: b[: len(b) // 2]),
    "json a list": _bytes("items.json", lambda b: b"[1, 2]"),
    "json missing key": _edit_meta(lambda m: m.pop("item_text")),
    "json extra key": _edit_meta(lambda m: m.update(extra=1)),
    "json text a string": _edit_meta(lambda m: m.update(item_text="abc")),
    "json text too short": _edit_meta(lambda m: m.update(item_text=m["item_text"][:-1])),
    "json text of numbers": _edit_meta(lambda m: m.update(item_text=list(range(len(m["item_text"]))))),
    "json count a string": _edit_meta(lambda m: m.update(dropped_users="0")),
    "json flag a string": _edit_meta(lambda m: m.update(timestamps_are_positions="no")),
    "json fingerprint edited": _edit_meta(lambda m: m.update(fingerprint="0" * 16)),
    "json version edited": _edit_meta(lambda m: m.update(version=99)),
    "json a directory": lambda entry: (os.remove(os.path.join(entry, "items.json")),
                                       os.mkdir(os.path.join(entry, "items.json"))),
    "entry a file": lambda entry: (shutil.rmtree(entry), open(entry, "w").close()),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_cache_is_rebuilt(tmp_path, capsys, damage):
    cfg = DataConfig(path=_write(tmp_path / "d", ML_LATEST), cache_dir=str(tmp_path / "c"), min_len=1)
    built = load_sequences(cfg)
    entry = cache_path(cfg)
    assert os.path.isfile(os.path.join(entry, "sequences.npz"))
    capsys.readouterr()
    DAMAGES[damage](entry)
    assert _same(load_sequences(cfg), built)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: rebuilding the damaged data cache")
    # The entry was rebuilt in place: the next load reads it silently.
    assert _same(load_sequences(cfg), built) and capsys.readouterr().err == ""
    assert os.listdir(os.path.dirname(entry)) == [built.fingerprint]


def test_damaged_cache_cli_stats_still_works(tmp_path, capsys):
    ratings = RATINGS + "".join(f"{u},{i},4,{10 * u + i}\n" for u in (1, 2) for i in (1, 2, 1, 2, 1))
    path, cache = _write(tmp_path / "d", {"ratings.csv": ratings, "movies.csv": MOVIES}), str(tmp_path / "c")
    assert main(["data", "prepare", path, f"data.cache_dir={cache}"]) == 0
    entry = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cache"]
    DAMAGES["npz truncated"](entry)
    assert main(["data", "stats", path, f"data.cache_dir={cache}"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["interactions"] == 10 and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- the fingerprint


def test_fingerprint_follows_content_not_path(tmp_path):
    a, b = _write(tmp_path / "a", ML_LATEST), _write(tmp_path / "b", ML_LATEST)
    assert fingerprint(a, "ml-latest", 1) == fingerprint(b, "ml-latest", 1)
    before = fingerprint(a, "ml-latest", 1)
    ratings = os.path.join(a, "ratings.csv")
    _write(tmp_path / "a", {"ratings.csv": ML_LATEST["ratings.csv"].replace("4.5", "2.5")})  # same size
    assert fingerprint(a, "ml-latest", 1) != before and os.path.getsize(ratings) == len(ML_LATEST["ratings.csv"])


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_memoised_digest_is_the_full_hash_and_sees_in_place_edits(tmp_path):
    path = _write(tmp_path / "d", ML_LATEST)
    ratings = os.path.join(path, "ratings.csv")
    old = time.time() - 3600
    for name in ML_LATEST:
        os.utime(os.path.join(path, name), (old, old))
    time.sleep(2.1)  # past the "racy" window: files changed (ctime) within 2 s of hashing are not memoised
    cfg = DataConfig(path=path, cache_dir=str(tmp_path / "c"), min_len=1)
    first = load_sequences(cfg)
    memos = sorted(glob.glob(str(tmp_path / "c" / "file-hashes" / "*.json")))
    assert len(memos) == 2
    memoised = []
    for memo in memos:
        with open(memo) as f:
            memoised.append(json.load(f)["sha256"])
    assert sorted(memoised) == sorted(_sha256(os.path.join(path, name)) for name in ML_LATEST)
    # The memo changes the cost, not the value.
    assert first.fingerprint == fingerprint(path, "ml-latest", 1) == fingerprint(path, "ml-latest", 1, cfg.cache_dir)
    with open(memos[0], "w") as f:  # a damaged memo is only a re-hash
        f.write("{")
    assert load_sequences(cfg).fingerprint == first.fingerprint
    # Same size, mtime set back: the ctime still tells the file changed.
    with open(ratings, "w") as f:
        f.write(ML_LATEST["ratings.csv"].replace("4.5", "2.5"))
    os.utime(ratings, (old, old))
    second = load_sequences(cfg)
    assert second.fingerprint != first.fingerprint
    assert second.fingerprint == fingerprint(path, "ml-latest", 1)
    assert 2.5 in second.ratings.tolist() and 4.5 not in second.ratings.tolist()


def test_integral_decimals_and_padded_fields_still_read(tmp_path):
    # Inputs that parsed before the int64 checks keep parsing: "3.0", "1e3" and " 5" are integers.
    files = {"ratings.csv": RATINGS + "1e3,1.0,4, 5\n1e3,2,4,3.0\n", "movies.csv": MOVIES}
    raw = readers.read(_write(tmp_path / "d", files))
    _assert_raw(raw, [1000, 1000], [1, 2], [5, 3], [4.0, 4.0])
