"""Sharded training on 2 gloo ranks (torchrun) against 1 process, distributed checkpoints, crashes.

Parity setting: ``model.dropout=0`` and ``loss.shared_negatives=true`` make the 1-process run
deterministic given the seed and make every rank draw the same negatives; the trainer scales
each rank's loss to its share of the global-batch mean. 2 ranks then train the same model as
1 process (same global batch, same seed), so validation metrics agree to ``TOL`` (float
summation order is the only difference; measured: identical to 6 decimals).

Four torchrun launches (~20-40 s each on 2 busy cores): one worker script that runs several
CLI jobs in one process group, the SIGKILL + resume pair, and the column-wise / 2 -> 1 rank
resume launch (marked slow).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import safetensors.torch
import torch

from sidvid_rec.cli import main
from sidvid_rec.errors import ConfigError
from sidvid_rec.train import checkpoint as ckpt

TOL = 1e-4
"""Largest allowed difference of any validation metric between 1 and 2 ranks."""
PARITY = ["train.device=cpu", "data.max_len=20", "model.dim=16", "model.dqk=16", "model.dv=16", "model.num_blocks=1",
          "model.dropout=0", "loss.shared_negatives=true", "loss.num_negatives=32", "train.batch_size=64",
          "eval.batch_size=256", "train.epochs=2", "train.seed=7"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)


def _assert_close(a, b, tol=TOL):
    for key, value in a.items():
        assert b[key] == pytest.approx(value, abs=tol), key


def _torchrun_cmd(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return cmd, dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def _torchrun(args, timeout=400):
    cmd, env = _torchrun_cmd(args)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _descendants(pid):
    """Child processes, recursively (torchrun starts each worker in its own session)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return []
    return children + [d for c in children for d in _descendants(c)]


def _kill_job(proc):
    """SIGKILL the launcher and every worker at once, like a machine going down."""
    victims = _descendants(proc.pid) + [proc.pid]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One process, 2 epochs: the reference run (and its cache directory)."""
    root = tmp_path_factory.mktemp("dist")
    cache = str(root / "cache")
    run = root / "one"
    assert main(["train", "--run-dir", str(run), f"data.cache_dir={cache}", *PARITY]) == 0
    return {"root": root, "cache": cache, "run": run, "metrics": _metrics(run)}


_WORKER = """
import json, os, sys
from sidvid_rec.cli import main
root, cache, one, resumed = sys.argv[1:5]
parity = json.loads(sys.argv[5])
rank = int(os.environ["RANK"])
out = {}
for sharding in ("row_wise", "table_wise"):
    out[sharding] = main(["train", "--run-dir", os.path.join(root, sharding), f"data.cache_dir={cache}", *parity,
                          f"train.sharding={sharding}"])
out["evaluate"] = main(["evaluate", one, "--split", "valid"])

# The row-wise model's tables gathered from the 2 ranks' shards (the export test's reference).
import torch
from sidvid_rec.data import load_sequences
from sidvid_rec.train.distributed import build_sharded_model
from sidvid_rec.train import checkpoint as ckpt
from sidvid_rec.process_group import init_distributed
from sidvid_rec.train.distributed import gather_state_dict
from sidvid_rec.config import load_run_config
cfg = load_run_config(os.path.join(root, "row_wise"))
model = build_sharded_model(cfg, load_sequences(cfg.data), init_distributed("cpu"))
ckpt.load_model_weights(ckpt.best_checkpoint(os.path.join(root, "row_wise")), model)
state = gather_state_dict(model.state_dict())
if rank == 0:
    torch.save(state["embeddings.ebc.embedding_bags.item_id.weight"], os.path.join(root, "row_wise_table.pt"))
out["resume"] = main(["train", "--run-dir", resumed, f"data.cache_dir={cache}", *parity, "train.resume=true",
                      "train.sharding=row_wise"])
out["bad_world"] = main(["train", "--run-dir", os.path.join(root, "bad"), f"data.cache_dir={cache}", *parity,
                         "train.batch_size=1"])
with open(os.path.join(root, f"worker-{rank}.json"), "w") as f:
    json.dump(out, f)
"""


def test_two_ranks_match_one_rank(baseline):
    """Row-wise and table-wise on 2 ranks, 2-rank evaluation and 1 -> 2 rank resume, in one launch."""
    root, one = baseline["root"], baseline["run"]
    # A copy of the 1-process run stopped after epoch 1 (its epoch-2 record removed) resumes on 2 ranks.
    resumed = root / "resumed"
    shutil.copytree(one, resumed)
    os.remove(resumed / "checkpoints" / "epoch-2.pt")
    worker = root / "worker.py"
    worker.write_text(textwrap.dedent(_WORKER))
    proc = _torchrun([str(worker), str(root), baseline["cache"], str(one), str(resumed), json.dumps(PARITY)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((root / f"worker-{r}.json").read_text()) for r in (0, 1)]
    assert all(r == {"row_wise": 0, "table_wise": 0, "evaluate": 0, "resume": 0, "bad_world": 2} for r in results)

    expected = baseline["metrics"]
    for sharding in ("row_wise", "table_wise"):
        got = _metrics(root / sharding)
        assert got["best_epoch"] == expected["best_epoch"]
        for split in ("valid", "test"):
            _assert_close(expected[split], got[split])
        losses = [json.loads((root / sharding / "history.json").read_text())[i]["loss"] for i in (0, 1)]
        one_losses = [json.loads((one / "history.json").read_text())[i]["loss"] for i in (0, 1)]
        assert losses == pytest.approx(one_losses, abs=1e-4)
    # The export of the 2-rank run holds exactly the tables gathered from its shards (cut to dim).
    assert main(["export", str(root / "row_wise"), "--out", str(root / "export")]) == 0
    exported = safetensors.torch.load_file(str(root / "export" / "tables.safetensors"))["item_id"]
    assert torch.equal(exported, torch.load(root / "row_wise_table.pt")[:, :16])
    # Evaluating the 1-process checkpoint on 2 ranks gives the 1-process numbers.
    _assert_close(expected["valid"], _metrics(one)["valid"])
    # Resumed on 2 ranks from the 1-process epoch-1 checkpoint: epoch 1 is the loaded one, and
    # epoch 2 (trained on 2 ranks with re-seeded negatives) lands close to the 1-process epoch 2.
    history = json.loads((resumed / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0] == json.loads((one / "history.json").read_text())[0]
    assert abs(history[1]["loss"] - json.loads((one / "history.json").read_text())[1]["loss"]) < 0.1
    # A world size the job cannot run on: one line per rank, before any work.
    assert "smaller than the world size 2" in proc.stdout + proc.stderr


def test_world_size_that_does_not_fit_the_plan(baseline):
    from sidvid_rec.config import load_config
    from sidvid_rec.data import load_sequences
    from sidvid_rec.models.build import build_model as build_module
    from sidvid_rec.train.planner import check_world_size

    cfg = load_config(None, [f"data.cache_dir={baseline['cache']}", *PARITY])
    module = build_module(cfg, load_sequences(cfg.data), table_device="meta")  # table width 16
    check_world_size(module, "column_wise", 4, 64)
    with pytest.raises(ConfigError, match="3 ranks do not divide 16") as err:
        check_world_size(module, "column_wise", 3, 64)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="smaller than the world size"):
        check_world_size(module, "table_wise", 8, 4)


def _records_are_complete(run_dir):
    directory = ckpt.checkpoint_dir(str(run_dir))
    names = [n for n in os.listdir(directory) if n.endswith(".pt")]
    for name in names:
        record = ckpt.read_record(os.path.join(directory, name))
        assert os.path.isfile(os.path.join(directory, record.data, ".metadata")), name
    return names


def test_sigkill_mid_epoch_resumes_and_finishes(baseline):
    """A 2-rank job killed with SIGKILL mid-epoch resumes from its last checkpoint; the end
    result equals the uninterrupted 1-process run (RNG streams restored on the same world size)."""
    run = baseline["root"] / "killed"
    args = ["-m", "sidvid_rec.cli", "train", "--run-dir", str(run), f"data.cache_dir={baseline['cache']}", *PARITY,
            "train.sharding=row_wise", "train.checkpoint_every=1"]
    cmd, env = _torchrun_cmd(args)
    log = open(baseline["root"] / "killed.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    directory = ckpt.checkpoint_dir(str(run))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(directory) and any(n.startswith("step-") and n.endswith(".pt") and int(n[5:-3]) >= 4
                                            for n in os.listdir(directory)):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before it could be killed:\n" + (baseline["root"] / "killed.log").read_text()[-2000:]
    _kill_job(proc)
    log.close()
    names = _records_are_complete(run)  # whatever was committed is whole
    latest = ckpt.read_record(ckpt.latest_checkpoint(str(run)))
    assert latest.name.startswith("step-") and 0 < latest.batch < 10, (names, latest)

    again = _torchrun(args + ["train.resume=true"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {os.path.join(directory, latest.name + '.pt')}" in again.stdout + again.stderr
    got = _metrics(run)
    for split in ("valid", "test"):
        _assert_close(baseline["metrics"][split], got[split])
    _records_are_complete(run)
    assert not [n for n in os.listdir(directory) if n.startswith(".")]  # temporaries collected


_WRITER = """
import os, sys, torch
from sidvid_rec.train import checkpoint as ckpt
from sidvid_rec.process_group import init_distributed
ctx = init_distributed("cpu")
run_dir = sys.argv[1]
for step in range(1, 10_000):
    state = {"model": {"w": torch.full((2_000_000,), float(step))}}  # 8 MB: a write takes a while
    record = ckpt.CheckpointRecord(name=f"step-{step}", fingerprint="f", epoch=0, batch=step, step=step,
                                   world_size=1, sharding="auto")
    ckpt.save_checkpoint(run_dir, state, record, ctx)
"""


def test_killed_writer_never_leaves_half_a_checkpoint(tmp_path):
    """SIGKILL a process that writes checkpoints back to back: every committed record loads whole."""
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(_WRITER))
    run = tmp_path / "run"
    directory = ckpt.checkpoint_dir(str(run))
    proc = subprocess.Popen([sys.executable, str(script), str(run)], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.isdir(directory) and len(os.listdir(directory)) >= 5):
        time.sleep(0.01)
    time.sleep(0.07)  # land somewhere inside a save (the writer saves back to back)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    names = _records_are_complete(run)
    assert names
    for name in names:
        state = {"model": {"w": torch.zeros(2_000_000)}}
        record = ckpt.load_checkpoint(os.path.join(directory, name), state)
        assert torch.equal(state["model"]["w"], torch.full((2_000_000,), float(record.step)))
    # The next save's garbage collection removes whatever a killed writer left behind.
    ckpt.collect_garbage(directory)
    leftovers = [n for n in os.listdir(directory) if n.startswith(".") or
                 (n.endswith(".dcp") and not any(ckpt.read_record(os.path.join(directory, r)).data == n
                                                 for r in os.listdir(directory) if r.endswith(".pt")))]
    assert leftovers == []


def test_checkpoint_of_another_config_is_refused(baseline, capsys):
    """Resuming a run directory with another model config: one line, nothing loaded."""
    run = baseline["root"] / "other"
    shutil.copytree(baseline["run"], run)
    capsys.readouterr()
    rc = main(["train", "--run-dir", str(run), f"data.cache_dir={baseline['cache']}", *PARITY, "model.dim=8",
               "model.dqk=8", "model.dv=8", "train.resume=true", "train.epochs=3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "another model/data config" in err
    assert _metrics(run) == baseline["metrics"]  # untouched


_RESHARD_WORKER = """
import json, os, sys
import torch
from sidvid_rec.cli import main
from sidvid_rec.config import load_run_config
from sidvid_rec.data import load_sequences
from sidvid_rec.process_group import init_distributed
from sidvid_rec.train import checkpoint as ckpt
from sidvid_rec.train.distributed import build_sharded_model, gather_state_dict
root, cache = sys.argv[1:3]
parity = json.loads(sys.argv[3])
rank = int(os.environ["RANK"])
out = {}
for sharding in ("column_wise", "row_wise"):
    out[sharding] = main(["train", "--run-dir", os.path.join(root, sharding), f"data.cache_dir={cache}", *parity,
                          "train.epochs=1", f"train.sharding={sharding}"])
# The column-wise model's tables gathered from both ranks' column shards (what an export must hold).
cfg = load_run_config(os.path.join(root, "column_wise"))
model = build_sharded_model(cfg, load_sequences(cfg.data), init_distributed("cpu"))
ckpt.load_model_weights(ckpt.best_checkpoint(os.path.join(root, "column_wise")), model)
state = gather_state_dict(model.state_dict())
if rank == 0:
    torch.save(state["embeddings.ebc.embedding_bags.item_id.weight"], os.path.join(root, "column_wise_table.pt"))
with open(os.path.join(root, f"reshard-{rank}.json"), "w") as f:
    json.dump(out, f)
"""


@pytest.mark.slow
def test_two_rank_runs_resume_on_one_rank_and_column_wise_exports(tmp_path, capsys):
    """One 2-rank launch trains a column-wise and a row-wise run for 1 epoch. Then, in this
    process (1 rank): the row-wise run resumes (DCP reshards 2 -> 1) and finishes epoch 2;
    the column-wise run exports (tables gathered from the column shards) and retrieves; resuming
    it on 1 rank is refused in one line (its table optimizer state depends on the world size)."""
    cache = str(tmp_path / "cache")
    worker = tmp_path / "reshard.py"
    worker.write_text(textwrap.dedent(_RESHARD_WORKER))
    proc = _torchrun([str(worker), str(tmp_path), cache, json.dumps(PARITY)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(json.loads((tmp_path / f"reshard-{r}.json").read_text()) == {"column_wise": 0, "row_wise": 0}
               for r in (0, 1))

    # 2 -> 1 rank resume of the row-wise run: epoch 1 is the 2-rank one, epoch 2 is trained here.
    row = tmp_path / "row_wise"
    two_rank_history = json.loads((row / "history.json").read_text())
    assert [h["epoch"] for h in two_rank_history] == [1]
    capsys.readouterr()
    assert main(["train", "--run-dir", str(row), f"data.cache_dir={cache}", *PARITY, "train.sharding=row_wise",
                 "train.epochs=2", "train.resume=true"]) == 0
    captured = capsys.readouterr()
    assert "2 -> 1 ranks, random streams re-seeded" in captured.out + captured.err
    history = json.loads((row / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and history[0] == two_rank_history[0]
    # it continued from the 2-rank weights and step count (a fresh start would be back near epoch 1's loss)
    assert history[1]["step"] == 2 * history[0]["step"] and history[1]["loss"] < 0.5 * history[0]["loss"]
    record = ckpt.read_record(ckpt.latest_checkpoint(str(row)))
    assert (record.epoch, record.world_size) == (2, 1)
    metrics = _metrics(row)
    for split in ("valid", "test"):
        assert metrics[split]["count"] == 610 and 0.0 < metrics[split]["hr@10"] <= 1.0

    # The column-wise 2-rank run: export = the gathered column shards (cut to dim), retrieve works.
    col, out = tmp_path / "column_wise", tmp_path / "export"
    assert _metrics(col)["valid"]["count"] == 610
    assert main(["export", str(col), "--out", str(out)]) == 0
    exported = safetensors.torch.load_file(str(out / "tables.safetensors"))["item_id"]
    assert torch.equal(exported, torch.load(tmp_path / "column_wise_table.pt")[:, :16])
    from sidvid_rec.export.serving import load_export

    export = load_export(str(out))
    history_ids = list(range(1, 21))
    got = export.retrieve(history_ids, k=10, raw_ids=False)
    assert len(got.ids) == 10 and len(set(got.ids.tolist())) == 10
    assert all(1 <= i <= export.num_items and i not in history_ids for i in got.ids.tolist())
    scores = [it["score"] for it in got.items]
    assert scores == sorted(scores, reverse=True)

    # Column-wise table optimizer state written on 2 ranks does not fit 1: one clear line, exit 2.
    capsys.readouterr()
    rc = main(["train", "--run-dir", str(col), f"data.cache_dir={cache}", *PARITY, "train.sharding=column_wise",
               "train.epochs=2", "train.resume=true"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "column-wise" in err and "2 rank(s)" in err and "this job has 1 rank(s)" in err, err
