"""Robustness of the writers in ``sidvid_rec.storage`` and of the CLI's error reporting.

Temporaries left by a SIGKILLed writer are removed by the next write of the same target;
OS errors of a write (a file where a directory should be, a read-only or full disk) are one
stderr line with the target untouched; argparse errors are one line too.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from sidvid_rec import storage as io
from sidvid_rec.errors import ArtifactError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Starts a write of argv[2] with atomic_dir (argv[1] == "dir") or atomic_open ("file"),
# prints the temporary's path once it exists, then sleeps until it is killed.
_WRITER = textwrap.dedent("""
    import os, sys, time
    from sidvid_rec import storage as io
    kind, target = sys.argv[1], sys.argv[2]
    if kind == "dir":
        with io.atomic_dir(target) as tmp:
            with open(os.path.join(tmp, "part"), "w") as f:
                f.write("half-written")
            print(tmp, flush=True)
            time.sleep(600)
    else:
        with io.atomic_open(target, "w") as f:
            f.write("half-written")
            f.flush()
            print(f.name, flush=True)
            time.sleep(600)
""")


def _start_writer(kind: str, target: str) -> "tuple[subprocess.Popen, str]":
    """A child process in the middle of writing ``target``, and its temporary's path."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, kind, target], stdout=subprocess.PIPE, text=True)
    tmp = proc.stdout.readline().strip()
    assert tmp and os.path.exists(tmp), f"the writer did not start (exit code {proc.poll()})"
    return proc, tmp


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)  # reaped: its PID is gone, as after a real crash
    proc.stdout.close()


def _write(kind: str, target: str, text: str) -> None:
    if kind == "dir":
        with io.atomic_dir(target) as tmp:
            with open(os.path.join(tmp, "part"), "w") as f:
                f.write(text)
    else:
        with io.atomic_open(target, "w") as f:
            f.write(text)


def _read(kind: str, target: str) -> str:
    with open(os.path.join(target, "part") if kind == "dir" else target) as f:
        return f.read()


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_temporary_of_a_sigkilled_writer_is_removed_by_the_next_write(tmp_path, kind):
    target = str(tmp_path / "artifact")
    _write(kind, target, "previous")
    proc, tmp = _start_writer(kind, target)
    _kill(proc)
    assert os.path.exists(tmp) and _read(kind, target) == "previous"  # the crash left litter only

    _write(kind, target, "new")
    assert os.listdir(tmp_path) == ["artifact"]
    assert _read(kind, target) == "new"


def test_temporary_of_a_live_writer_is_kept(tmp_path):
    target = str(tmp_path / "artifact")
    proc, tmp = _start_writer("dir", target)
    try:
        _write("dir", target, "new")
        assert os.path.isdir(tmp)  # still being written by a live process
        assert _read("dir", target) == "new"
    finally:
        _kill(proc)


def test_moved_aside_artifact_of_a_writer_killed_between_renames_is_put_back(tmp_path):
    target = str(tmp_path / "artifact")
    # A genuine temporary name of a process that has exited, as a crashed writer leaves it.
    named = subprocess.run([sys.executable, "-c", "from sidvid_rec import storage as io; import sys; "
                            "print(io._temp_sibling(sys.argv[1]))", target],
                           capture_output=True, text=True, check=True)
    tmp = named.stdout.strip()
    for path, text in ((tmp, "new, never renamed"), (tmp + ".old", "previous")):
        os.makedirs(path)
        with open(os.path.join(path, "part"), "w") as f:
            f.write(text)

    with pytest.raises(RuntimeError, match="the write fails"):  # even a failing write recovers it
        with io.atomic_dir(target):
            raise RuntimeError("the write fails")
    assert os.listdir(tmp_path) == ["artifact"]
    assert _read("dir", target) == "previous"


def test_only_this_targets_stale_temporaries_are_removed(tmp_path):
    target = str(tmp_path / "artifact")
    two_days_ago = time.time() - 2 * 24 * 3600
    old_legacy = tmp_path / ".artifact.tmp-0123abcd"  # name of earlier versions: no PID, age decides
    fresh_legacy = tmp_path / ".artifact.tmp-4567cdef"
    other_target = tmp_path / ".artifact2.tmp-89abcdef"
    foreign = tmp_path / ".artifact.tmp-notours"
    for path in (old_legacy, fresh_legacy, other_target, foreign):
        path.write_text("x")
    for path in (old_legacy, other_target, foreign):
        os.utime(path, (two_days_ago, two_days_ago))

    _write("file", target, "new")
    assert sorted(os.listdir(tmp_path)) == sorted(["artifact", fresh_legacy.name, other_target.name, foreign.name])


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_target_under_a_regular_file_is_an_artifact_error(tmp_path, kind):
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("keep me")
    target = str(blocker / "sub" / "artifact")
    with pytest.raises(ArtifactError, match=re.escape(f"cannot write {target}: {blocker} is not a directory")):
        _write(kind, target, "new")
    assert blocker.read_text() == "keep me" and os.listdir(tmp_path) == ["somefile.txt"]


def _cli(args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidvid_rec", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def _assert_one_line_error(proc: subprocess.CompletedProcess, prefix: str = "sidvid-rec") -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(prefix) and ": error: " in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("args", [
    ["data", "prepare", "data.cache_dir={blocker}/sub"],
    ["pipeline", "--run-dir", "{blocker}/sub/run"],
])
def test_cli_output_under_a_regular_file_is_one_line(tmp_path, args):
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("keep me")
    line = _assert_one_line_error(_cli([a.format(blocker=blocker) for a in args], cwd=str(tmp_path)))
    assert f"{blocker} is not a directory" in line
    assert blocker.read_text() == "keep me" and os.listdir(tmp_path) == ["somefile.txt"]


def test_empty_cache_dir_is_refused_not_the_working_directory(tmp_path):
    line = _assert_one_line_error(_cli(["data", "prepare", "data.cache_dir="], cwd=str(tmp_path)))
    assert "data.cache_dir is empty" in line
    assert os.listdir(tmp_path) == []  # previously: ./sequences/<fingerprint>/ in the working directory


def test_cli_reports_an_unexpected_os_error_as_one_line(tmp_path):
    (tmp_path / "export" / "manifest.json").mkdir(parents=True)  # a directory where a file is read
    line = _assert_one_line_error(_cli(["retrieve", str(tmp_path / "export"), "--history", "1"]),
                                  "sidvid-rec retrieve")
    assert "Is a directory" in line


@pytest.mark.parametrize("args,prefix", [
    ([], "sidvid-rec"),
    (["bogus"], "sidvid-rec"),
    (["data"], "sidvid-rec data"),
    (["data", "stats", "--bogus"], "sidvid-rec"),
    (["sids", "build"], "sidvid-rec sids build"),
    (["pipeline"], "sidvid-rec pipeline"),
    (["pipeline", "--run-dir", "r", "--force", "nope"], "sidvid-rec pipeline"),
    (["retrieve", "d", "--history", "1", "--k", "x"], "sidvid-rec retrieve"),
])
def test_argparse_errors_are_one_line(args, prefix):
    proc = _cli(args)
    _assert_one_line_error(proc, prefix)
    assert "usage:" not in proc.stderr and proc.stdout == ""


def test_help_is_still_the_full_usage():
    proc = _cli(["pipeline", "--help"])
    assert proc.returncode == 0 and proc.stdout.startswith("usage: sidvid-rec pipeline")
    assert len(proc.stdout.splitlines()) > 5


# ----------------------------------------------------------------------------- real full and read-only disks

# Runs argv[3:] (a JSON command) against a 64 KiB tmpfs mounted at argv[1] in a private mount
# namespace; argv[2] is a JSON {relative path: text} written first; remounts read-only when
# asked. Prints {rc, stderr, files: {relative path: text}} of the mount afterwards.
_IN_TMPFS = textwrap.dedent("""
    import json, os, subprocess, sys
    mnt, setup, readonly, cmd = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "ro", json.loads(sys.argv[4])
    for rel, text in setup.items():
        os.makedirs(os.path.dirname(os.path.join(mnt, rel)), exist_ok=True)
        with open(os.path.join(mnt, rel), "w") as f:
            f.write(text)
    if readonly:
        subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=mnt)
    files = {}
    for root, dirs, names in os.walk(mnt):
        for name in dirs + names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, mnt)] = None if os.path.isdir(path) else open(path, errors="replace").read()
    print(json.dumps({"rc": proc.returncode, "stderr": proc.stderr, "files": files}))
""")


def _in_tmpfs(tmp_path, setup, readonly, cmd):
    """Result of ``cmd`` on a real 64 KiB tmpfs (skips where mount namespaces are not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    wrapper = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0" && exec "$@"', str(mnt)]
    probe = subprocess.run(wrapper + ["true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private namespace here: {probe.stderr.strip()}")
    proc = subprocess.run(wrapper + [sys.executable, "-c", _IN_TMPFS, str(mnt), json.dumps(setup),
                                     "ro" if readonly else "rw", json.dumps(cmd)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _fingerprinted_cache(tmp_path) -> str:
    """``sequences/<fingerprint>`` of the embedded data set, relative to its cache dir."""
    done = _cli(["data", "stats", f"data.cache_dir={tmp_path / 'probe'}"])
    assert done.returncode == 0, done.stderr
    return os.path.join("sequences", json.loads(done.stdout)["fingerprint"])


@pytest.mark.parametrize("readonly,reason", [(False, "No space left on device"), (True, "Read-only file system")])
def test_full_or_read_only_disk_is_one_line_and_keeps_the_target(tmp_path, readonly, reason):
    target = os.path.join("cache", _fingerprinted_cache(tmp_path))
    marker = os.path.join(target, "previous.txt")
    prepare = [sys.executable, "-m", "sidvid_rec", "data", "prepare", "data.cache_dir=cache"]
    result = _in_tmpfs(tmp_path, {marker: "previous"}, readonly, prepare)  # the cache is ~3 MB: ENOSPC
    proc = subprocess.CompletedProcess(prepare, result["rc"], "", result["stderr"])
    line = _assert_one_line_error(proc, "sidvid-rec data")
    assert f"cannot write {target}" in line.replace(str(tmp_path / "mnt") + "/", "") and line.endswith(reason)
    assert result["files"] == {"cache": None, "cache/sequences": None, target: None, marker: "previous"}


def test_full_disk_in_atomic_open_is_an_artifact_error(tmp_path):
    # write_json's bytes exceed the tmpfs: the error comes from the write or the final flush.
    script = ("from sidvid_rec import storage as io\nfrom sidvid_rec.errors import ArtifactError\n"
              "try:\n    io.write_json('out.json', {'x': 'y' * 200000})\n"
              "except ArtifactError as e:\n    raise SystemExit(f'ArtifactError: {e}')\n")
    result = _in_tmpfs(tmp_path, {"out.json": "{}"}, False, [sys.executable, "-c", script])
    assert result["rc"] == 1
    assert result["stderr"].strip().endswith("out.json: No space left on device"), result["stderr"]
    assert result["stderr"].startswith("ArtifactError: cannot write ")
    assert result["files"] == {"out.json": "{}"}


_TRAIN_TINY = ["data.max_len=20", "model.dim=16", "model.dqk=8", "model.dv=8", "model.num_blocks=1",
               "loss.num_negatives=16", "train.batch_size=128", "train.epochs=1", "train.max_steps=1",
               "eval.batch_size=610", "train.device=cpu"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run (and its cache) outside any tmpfs, for exports into a full disk."""
    root = tmp_path_factory.mktemp("enospc")
    done = _cli(["train", "--run-dir", str(root / "run"), f"data.cache_dir={root / 'cache'}", *_TRAIN_TINY])
    assert done.returncode == 0, done.stderr
    return root


@pytest.mark.parametrize("command", ["train", "export", "embed"])
def test_full_disk_during_train_export_embed_is_one_line_and_leaves_no_temporary(tmp_path, trained_run, command):
    """Each writes more than the 64 KiB tmpfs holds: one stderr line, exit 2, and nothing of the
    half-written output left behind (no ``.dcp.tmp``, no ``.NAME.tmp-*``)."""
    cache = f"data.cache_dir={trained_run / 'cache'}"
    argv = {
        "train": ["train", "--run-dir", "out", cache, *_TRAIN_TINY],
        "export": ["export", str(trained_run / "run"), "--out", "out"],
        "embed": ["embed", "--out", "out", "--no-progress", cache, "sids.encoder=tfidf", "sids.tfidf_dim=64",
                  f"sids.embed_cache_dir={tmp_path / 'emb-cache'}"],
    }[command]
    result = _in_tmpfs(tmp_path, {"keep.txt": "kept"}, False, [sys.executable, "-m", "sidvid_rec", *argv])
    # train's progress bar shares stderr (a bar is not an error line): drop its frames.
    kept = [ln for ln in result["stderr"].splitlines() if ln.strip() and "%|" not in ln]
    proc = subprocess.CompletedProcess(argv, result["rc"], "", "\n".join(kept) + "\n")
    line = _assert_one_line_error(proc, f"sidvid-rec {command}")
    assert "No space left on device" in line or "is the disk full" in line, line
    leftovers = [p for p in result["files"] if ".tmp" in p]
    assert not leftovers, leftovers
    # train's run directory keeps what it wrote whole (config.yaml); export/embed leave nothing
    assert set(result["files"]) - {"out", "out/config.yaml", "out/tb"} <= {"keep.txt"} or command == "train"
    if command != "train":
        assert set(result["files"]) == {"keep.txt"}, result["files"]
