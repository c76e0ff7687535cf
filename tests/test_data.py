import json
import os

import numpy as np
import pytest

from sidvid_rec.cli import main
from sidvid_rec.config import DataConfig
from sidvid_rec.data import load_sequences, make_split
from sidvid_rec.data.batches import BatchIterator, collate
from sidvid_rec.errors import DataError


def _stats(capsys, *argv):
    assert main(["data", "stats", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_embedded_default_stats(capsys, cache_dir):
    stats = _stats(capsys, f"data.cache_dir={cache_dir}")
    assert (stats["users"], stats["items"], stats["interactions"]) == (610, 9724, 100836)
    assert stats["min_len"] == 20 and stats["max_len"] == 2698 and stats["dropped_users"] == 0


def test_ml100k_stats(capsys, ml100k_path, cache_dir):
    stats = _stats(capsys, ml100k_path, f"data.cache_dir={cache_dir}")
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100000)


def test_beauty_stats(capsys, beauty_path, cache_dir):
    stats = _stats(capsys, beauty_path, "--format", "amazon", f"data.cache_dir={cache_dir}")
    assert (stats["users"], stats["items"], stats["interactions"]) == (22363, 12101, 198502)
    assert stats["timestamps"] == "positions" and stats["median_len"] == 6


def test_sequences_are_time_ordered_and_remapped(ml100k_path, cache_dir):
    data = load_sequences(DataConfig(path=ml100k_path, cache_dir=cache_dir))
    assert data.item_values.min() == 1 and data.item_values.max() == data.num_items
    for u in range(0, data.num_users, 97):
        ts = data.timestamps[data.offsets[u] : data.offsets[u + 1]]
        assert np.all(np.diff(ts) >= 0)
    # ML-100k ids are already 1..1682: the mapping is the identity.
    assert np.array_equal(data.item_raw_ids[1:], np.arange(1, 1683))
    assert data.item_text[1].startswith("Toy Story (1995). Genres: Animation")


def test_cache_is_written_atomically_and_reused(cache_dir):
    cfg = DataConfig(cache_dir=cache_dir)
    first = load_sequences(cfg)
    entries = os.listdir(os.path.join(cache_dir, "sequences"))
    assert entries == [first.fingerprint]  # no temporary leftovers
    second = load_sequences(cfg)
    assert np.array_equal(first.item_values, second.item_values) and first.item_text == second.item_text


def test_min_len_drops_and_counts_users(cache_dir):
    data = load_sequences(DataConfig(cache_dir=cache_dir, min_len=100))
    assert data.dropped_users > 0 and data.lengths.min() >= 100
    assert data.num_users + data.dropped_users == 610


@pytest.mark.parametrize("protocol", ["loo", "gr"])
def test_splits(protocol, cache_dir):
    data = load_sequences(DataConfig(cache_dir=cache_dir))
    u = 3
    seq = data.item_values[data.offsets[u] : data.offsets[u + 1]]
    test = make_split(data, "test", protocol, max_len=10)
    assert test.targets[u] == seq[-1]
    assert np.array_equal(test.values[test.offsets[u] : test.offsets[u + 1]], seq[-11:-1])
    train = make_split(data, "train", protocol, max_len=10)
    holdout = 2 if protocol == "loo" else 1
    assert np.array_equal(train.values[train.offsets[u] : train.offsets[u + 1]], seq[: -holdout][-11:])
    if protocol == "loo":
        valid = make_split(data, "valid", protocol, max_len=10)
        assert valid.targets[u] == seq[-2]
    else:
        with pytest.raises(DataError):
            make_split(data, "valid", protocol, max_len=10)


def test_batches_are_jagged_and_deterministic(cache_dir):
    data = load_sequences(DataConfig(cache_dir=cache_dir))
    train = make_split(data, "train", "loo", max_len=50)
    it = BatchIterator(train, batch_size=32, shuffle=True, seed=7)
    it.set_epoch(1)
    a = next(iter(it))
    it.set_epoch(1)
    b = next(iter(it))
    assert a.features.keys() == ["item_id", "timestamp", "target_id", "target_timestamp"]
    assert np.array_equal(a.features.values().numpy(), b.features.values().numpy())
    items, targets = a.jagged("item_id"), a.jagged("target_id")
    assert items.values().numel() == int(items.lengths().sum()) <= 32 * 50  # no padding
    assert (items.lengths() == targets.lengths()).all()
    # Position i's target is the next item of the same sequence.
    first = items.to_dense()[0]
    assert np.array_equal(targets.to_dense()[0][:-1].numpy(), first[1:].numpy())


def test_ranks_split_global_batches(cache_dir):
    data = load_sequences(DataConfig(cache_dir=cache_dir))
    valid = make_split(data, "valid", "loo", max_len=20)
    single = [b.user_index for b in BatchIterator(valid, 64, shuffle=True, seed=1)]
    ranks = [list(BatchIterator(valid, 64, shuffle=True, seed=1, rank=r, world_size=3)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1
    for step, whole in enumerate(single):
        parts = np.concatenate([r[step].user_index.numpy()[r[step].weights.numpy() > 0] for r in ranks])
        assert np.array_equal(parts, whole.numpy())


def test_empty_batch_rejected(cache_dir):
    data = load_sequences(DataConfig(cache_dir=cache_dir))
    with pytest.raises(ValueError):
        collate(make_split(data, "test", "loo", 5), np.array([], dtype=np.int64), np.array([]))


def _write(directory, files):
    os.makedirs(directory, exist_ok=True)
    for name, content in files.items():
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(os.path.join(directory, name), mode) as f:
            f.write(content)
    return str(directory)


MOVIES = "movieId,title,genres\n1,Toy Story (1995),Animation|Comedy\n"


@pytest.mark.parametrize(
    "files, message",
    [
        ({"notes.txt": "garbage"}, "cannot detect the data format"),
        ({"ratings.csv": "", "movies.csv": MOVIES}, "is empty"),
        ({"ratings.csv": "u,i,r,t\n1;1;5;3\n", "movies.csv": MOVIES}, "wrong separator"),
        ({"ratings.csv": "u,i,r,t\n1,abc,5,3\n", "movies.csv": MOVIES}, "non-numeric item"),
        ({"ratings.csv": b"u,i,r,t\n1,1,5,3\n\xff\xfe,1,1,1\n", "movies.csv": MOVIES}, "not valid utf-8"),
        ({"ratings.csv": "u,i,r,t\n" + "1,2,5,3\n" * 6, "movies.csv": MOVIES}, "no item text"),
    ],
)
def test_bad_input_one_line_error_nothing_written(tmp_path, capsys, files, message):
    path = _write(tmp_path / "data", files)
    cache = tmp_path / "cache"
    assert main(["data", "prepare", path, f"data.cache_dir={cache}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not cache.exists()


def test_missing_path_and_unknown_format(capsys, tmp_path):
    assert main(["data", "stats", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["data", "stats", "--format", "csv"]) == 2
    assert "is not one of" in capsys.readouterr().err
