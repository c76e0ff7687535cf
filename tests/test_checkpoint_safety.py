"""Checkpoints from an untrusted or damaged run directory: refused in one line, never executed.

The DCP ``.metadata`` file is a pickle. These tests craft run directories the way an attacker
or an accident would (a payload pickle with its hashes rewritten, a cut-short shard, a shard
edited in place, a disk that fills up mid-save) and check the real load and save paths.
"""

import hashlib
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from sidvid_rec.cli import main
from sidvid_rec.errors import ArtifactError
from sidvid_rec.train import checkpoint as ckpt
from sidvid_rec.process_group import init_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["train.device=cpu", "data.max_len=20", "model.dim=16", "model.dqk=16", "model.dv=16", "model.num_blocks=1",
        "train.batch_size=128", "loss.num_negatives=32", "eval.batch_size=610"]


# ----------------------------------------------------------------------------- helpers


def _record(name: str = "epoch-1", **extra) -> ckpt.CheckpointRecord:
    return ckpt.CheckpointRecord(name=name, fingerprint="f", epoch=1, batch=0, step=1, world_size=1,
                                 sharding="auto", **extra)


def _state(fill: float = 0.0):
    return {"model": {"w": torch.full((64, 8), fill), "i": torch.zeros(5, dtype=torch.int64)}}


@pytest.fixture
def saved(tmp_path):
    """A one-rank checkpoint (epoch-1 + best) of known values; returns its record path."""
    ctx = init_distributed("cpu")
    state = {"model": {"w": torch.arange(512.0).reshape(64, 8), "i": torch.arange(5)}}
    return ckpt.save_checkpoint(str(tmp_path / "run"), state, _record(), ctx, is_best=True)


def _data_dir(record_path: str) -> str:
    return ckpt.data_path(record_path, ckpt.read_record(record_path))


def _rewrite_records(directory: str, edit) -> None:
    """Rewrites every record of ``directory`` as a hand-editing attacker would (``edit(payload)``)."""
    for name in os.listdir(directory):
        if name.endswith(".pt"):
            path = os.path.join(directory, name)
            payload = torch.load(path, weights_only=True)
            edit(payload)
            torch.save(payload, path)


def _rehash(directory: str) -> None:
    """Recomputes every record's manifest from the files now on disk (the manifest is unsigned)."""
    def edit(payload):
        data = os.path.join(directory, payload["data"])
        payload["files"] = {n: hashlib.sha256(open(os.path.join(data, n), "rb").read()).hexdigest()
                            for n in os.listdir(data)}
    _rewrite_records(directory, edit)


def _make_legacy(directory: str) -> None:
    """Turns the records into what sidvid-rec wrote before the manifest (version 2)."""
    def edit(payload):
        payload["version"] = 2
        payload.pop("files", None)
        payload.pop("data_fingerprint", None)
    _rewrite_records(directory, edit)


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Open:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _dotted(command: str) -> bytes:
    """Protocol 4 resolves dotted names: ``torch.serialization`` + ``os.system`` is os.system."""
    def short(text: str) -> bytes:
        raw = text.encode()
        return b"\x8c" + bytes([len(raw)]) + raw
    return b"\x80\x04" + short("torch.serialization") + short("os.system") + b"\x93" + short(command) + b"\x85R."


PAYLOADS = {
    "os.system": lambda marker: pickle.dumps(_System(f"touch {marker}")),
    "builtins.open": lambda marker: pickle.dumps(_Open(marker)),
    "dotted-name": lambda marker: _dotted(f"touch {marker}"),
}


def _load(which: str, path: str):
    if which == "load_checkpoint":
        return ckpt.load_checkpoint(path, _state())
    return ckpt.read_full_tensors(path, "model.")


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and text
    return text


# ----------------------------------------------------------------------------- code execution


@pytest.mark.parametrize("which", ["load_checkpoint", "read_full_tensors"])
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_crafted_metadata_with_rewritten_hashes_runs_no_code(saved, tmp_path, which, payload):
    """An attacker replaces ``.metadata`` with a code-running pickle and fixes the manifest too:
    the restricted unpickler refuses it; the payload never runs."""
    marker = tmp_path / "pwned"
    with open(os.path.join(_data_dir(saved), ".metadata"), "wb") as f:
        f.write(PAYLOADS[payload](str(marker)))
    _rehash(os.path.dirname(saved))
    with pytest.raises(ArtifactError) as err:
        _load(which, saved)
    assert "refusing to load" in _one_line(err.value)
    assert not marker.exists()


def test_crafted_metadata_is_refused_by_the_manifest_first(saved, tmp_path):
    marker = tmp_path / "pwned"
    with open(os.path.join(_data_dir(saved), ".metadata"), "wb") as f:
        f.write(PAYLOADS["os.system"](str(marker)))
    with pytest.raises(ArtifactError, match=r"\.metadata of its data differs from the sha256") as err:
        ckpt.load_checkpoint(saved, _state())
    _one_line(err.value)
    assert not marker.exists()


def test_crafted_run_dir_runs_no_code_in_evaluate_export_or_resume(tmp_path, capsys):
    """The three commands that read someone else's run directory, end to end."""
    run, cache, marker = tmp_path / "run", str(tmp_path / "cache"), tmp_path / "pwned"
    assert main(["train", "--run-dir", str(run), f"data.cache_dir={cache}", *TINY, "train.epochs=1",
                 "train.max_steps=2"]) == 0
    directory = ckpt.checkpoint_dir(str(run))
    with open(os.path.join(_data_dir(ckpt.best_checkpoint(str(run))), ".metadata"), "wb") as f:
        f.write(PAYLOADS["os.system"](str(marker)))
    _rehash(directory)
    commands = [["evaluate", str(run)], ["export", str(run), "--out", str(tmp_path / "export")],
                ["train", "--run-dir", str(run), f"data.cache_dir={cache}", *TINY, "train.epochs=2",
                 "train.resume=true"]]
    for argv in commands:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "refusing to load posix.system" in err and len(err.splitlines()) == 1, (argv, err)
        assert not marker.exists(), argv
    assert not (tmp_path / "export").exists()


def test_state_with_a_non_tensor_leaf_is_neither_saved_nor_loaded(saved, tmp_path):
    """DCP reads a non-tensor entry back with torch.load(weights_only=False): never ask it to."""
    ctx = init_distributed("cpu")
    with pytest.raises(TypeError, match="model.lr"):
        ckpt.save_checkpoint(str(tmp_path / "other"), {"model": {"w": torch.ones(2), "lr": 0.1}}, _record(), ctx)
    assert not (tmp_path / "other").exists()
    with pytest.raises(TypeError, match="model.lr"):
        ckpt.load_checkpoint(saved, {"model": {"w": torch.zeros(64, 8), "lr": 0.1}})


# ----------------------------------------------------------------------------- damaged data


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("which", ["load_checkpoint", "read_full_tensors"])
@pytest.mark.parametrize("damage, message", [(_truncate, "differs from the sha256"),
                                             (_flip_byte, "differs from the sha256"),
                                             (os.remove, r"missing \['__0_0.distcp'\]")])
def test_damaged_shard_is_refused_before_loading(saved, which, damage, message):
    damage(os.path.join(_data_dir(saved), "__0_0.distcp"))
    with pytest.raises(ArtifactError, match=message) as err:
        _load(which, saved)
    _one_line(err.value)


def test_extra_file_in_the_data_directory_is_refused(saved):
    with open(os.path.join(_data_dir(saved), "__1_0.distcp"), "wb") as f:
        f.write(b"planted")
    with pytest.raises(ArtifactError, match=r"unexpected \['__1_0.distcp'\]"):
        ckpt.load_checkpoint(saved, _state())


def test_record_cannot_point_outside_its_directory(saved, tmp_path):
    _rewrite_records(os.path.dirname(saved), lambda payload: payload.update(data="../../elsewhere.dcp"))
    with pytest.raises(ArtifactError, match="bad data directory name"):
        ckpt.load_checkpoint(saved, _state())


# ----------------------------------------------------------------------------- checkpoints without a manifest


def test_checkpoint_without_manifest_is_refused_unless_opted_in(saved, monkeypatch):
    _make_legacy(os.path.dirname(saved))
    monkeypatch.delenv(ckpt.ALLOW_UNVERIFIED_ENV, raising=False)
    with pytest.raises(ArtifactError, match=f"train again, or set {ckpt.ALLOW_UNVERIFIED_ENV}=1") as err:
        ckpt.load_checkpoint(saved, _state())
    _one_line(err.value)
    monkeypatch.setenv(ckpt.ALLOW_UNVERIFIED_ENV, "1")
    state = _state()
    ckpt.load_checkpoint(saved, state)
    assert torch.equal(state["model"]["w"], torch.arange(512.0).reshape(64, 8))


def test_unverified_checkpoint_still_runs_no_code(saved, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    _make_legacy(os.path.dirname(saved))
    monkeypatch.setenv(ckpt.ALLOW_UNVERIFIED_ENV, "1")
    with open(os.path.join(_data_dir(saved), ".metadata"), "wb") as f:
        f.write(PAYLOADS["os.system"](str(marker)))
    with pytest.raises(ArtifactError, match="refusing to load posix.system"):
        ckpt.read_full_tensors(saved)
    assert not marker.exists()


@pytest.mark.parametrize("which", ["load_checkpoint", "read_full_tensors"])
def test_truncated_shard_of_unverified_checkpoint_is_one_line(saved, monkeypatch, which):
    """Without a manifest DCP meets the cut-short file itself: its error becomes one line."""
    _make_legacy(os.path.dirname(saved))
    monkeypatch.setenv(ckpt.ALLOW_UNVERIFIED_ENV, "1")
    _truncate(os.path.join(_data_dir(saved), "__0_0.distcp"))
    with pytest.raises(ArtifactError, match="cannot load its data") as err:
        _load(which, saved)
    _one_line(err.value)


# ----------------------------------------------------------------------------- data fingerprint


def test_checkpoint_of_changed_data_is_refused(tmp_path):
    ctx = init_distributed("cpu")
    state = {"model": {"w": torch.ones(64, 8), "i": torch.arange(5)}}
    path = ckpt.save_checkpoint(str(tmp_path / "run"), state, _record(data_fingerprint="aaaa"), ctx)
    for load in (lambda fp: ckpt.load_checkpoint(path, _state(), "f", expected_data_fingerprint=fp),
                 lambda fp: ckpt.read_full_tensors(path, "model.", "f", expected_data_fingerprint=fp),
                 lambda fp: ckpt.read_record(path, "f", expected_data_fingerprint=fp)):
        with pytest.raises(ArtifactError, match="data changed since training.*aaaa, now bbbb") as err:
            load("bbbb")
        _one_line(err.value)
        load("aaaa")
        load(None)  # a caller that does not know the data checks nothing


def test_record_without_data_fingerprint_is_accepted(saved):
    """Records written before the data fingerprint (or without one) load whatever the data."""
    assert ckpt.read_record(saved).data_fingerprint == ""
    ckpt.load_checkpoint(saved, _state(), "f", expected_data_fingerprint="bbbb")


# ----------------------------------------------------------------------------- failed saves


_FULL_DISK = """
import resource, signal, sys, torch
from sidvid_rec.errors import ArtifactError
from sidvid_rec.train import checkpoint as ckpt
from sidvid_rec.process_group import init_distributed
ctx = init_distributed("cpu")
def record(name):
    return ckpt.CheckpointRecord(name=name, fingerprint="f", epoch=1, batch=0, step=1, world_size=1, sharding="auto")
ckpt.save_checkpoint(sys.argv[1], {"model": {"w": torch.ones(10)}}, record("epoch-1"), ctx, is_best=True)
# A real write error from the kernel: past RLIMIT_FSIZE write(2) fails with EFBIG (SIGXFSZ
# ignored), as it fails with ENOSPC on a full disk -- halfway through the shard file.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    ckpt.save_checkpoint(sys.argv[1], {"model": {"w": torch.ones(1_000_000)}}, record("epoch-2"), ctx, is_best=True)
    print("SAVED")
except ArtifactError as e:
    print("ERROR", e)
"""


def _leftovers(directory: str):
    return sorted(n for n in os.listdir(directory) if n.startswith(".") or ".tmp" in n)


def test_write_error_mid_shard_leaves_nothing_and_is_one_line(tmp_path):
    script = tmp_path / "full_disk.py"
    script.write_text(textwrap.dedent(_FULL_DISK))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), str(run)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and out and out[-1].startswith("ERROR cannot write checkpoint epoch-2"), \
        proc.stdout[-2000:] + proc.stderr[-3000:]
    directory = ckpt.checkpoint_dir(str(run))
    assert _leftovers(directory) == []
    names = sorted(os.listdir(directory))
    assert names == sorted(["best.pt", "epoch-1.pt", ckpt.read_record(os.path.join(directory, "epoch-1.pt")).data])
    state = {"model": {"w": torch.zeros(10)}}
    assert ckpt.load_checkpoint(ckpt.best_checkpoint(str(run)), state).name == ckpt.BEST
    assert torch.equal(state["model"]["w"], torch.ones(10))


def test_failed_commit_removes_its_data(saved):
    """The record cannot be renamed into place (a directory is in the way: a real OSError, even
    as root): the data already moved into place is removed again, no temporary is left."""
    directory = os.path.dirname(saved)
    os.makedirs(os.path.join(directory, "epoch-2.pt", "in-the-way"))
    before = sorted(os.listdir(directory))
    with pytest.raises(ArtifactError, match="cannot write checkpoint epoch-2") as err:
        ckpt.save_checkpoint(os.path.dirname(directory), _state(2.0), _record("epoch-2"), init_distributed("cpu"))
    _one_line(err.value)
    assert sorted(os.listdir(directory)) == before


def test_unwritable_checkpoint_directory_is_one_line(tmp_path):
    """``checkpoints`` is a file, so no directory can be made in it (root ignores permission bits)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a directory")
    with pytest.raises(ArtifactError, match="cannot write checkpoint epoch-1") as err:
        ckpt.save_checkpoint(str(run), _state(), _record(), init_distributed("cpu"))
    _one_line(err.value)
    assert sorted(os.listdir(run)) == ["checkpoints"]


def test_next_save_removes_stale_temporaries_of_a_killed_save(saved):
    directory = os.path.dirname(saved)
    stale = [".step-3.deadbeef.dcp.tmp", ".epoch-1.pt.tmp-0123abcd", "step-9.cafebabe.dcp"]
    os.makedirs(os.path.join(directory, stale[0]))
    open(os.path.join(directory, stale[0], "__0_0.distcp"), "wb").close()
    open(os.path.join(directory, stale[1]), "wb").close()
    os.makedirs(os.path.join(directory, stale[2]))
    ckpt.save_checkpoint(os.path.dirname(directory), _state(3.0), _record("epoch-2"), init_distributed("cpu"))
    assert not set(stale) & set(os.listdir(directory))
    assert _leftovers(directory) == []
