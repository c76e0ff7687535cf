"""A real Slurm run: `torchx run -s slurm torchx_components/sidvid.py:train -j 1x2` on the one-node
cluster of scripts/slurm-local.sh (started here when it is not up, and then stopped again;
skipped when Slurm cannot run on this machine: not root, no apt-get)."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "slurm-local.sh")
SLURM_DIR = os.environ.get("SIDVID_SLURM_DIR", "/tmp/sidvid-slurm")
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE")

pytestmark = pytest.mark.slurm


def _env():
    """The test's own interpreter and worktree for the job: its bin directory first on PATH (the job
    runs `torchrun` from PATH), PYTHONPATH at this checkout, the local cluster's slurm.conf."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin")
    pythonpath = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PATH=path, PYTHONPATH=pythonpath, OMP_NUM_THREADS="1",
                SLURM_CONF=os.path.join(SLURM_DIR, "slurm.conf"), SIDVID_SLURM_DIR=SLURM_DIR)


@pytest.fixture(scope="module")
def cluster():
    env = _env()
    if subprocess.run(["bash", SCRIPT, "status"], env=env, capture_output=True).returncode == 0:
        yield env  # started by someone else (.ci/run): theirs to stop
        return
    proc = subprocess.run(["bash", SCRIPT, "start"], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    try:
        yield env
    finally:
        subprocess.run(["bash", SCRIPT, "stop"], env=env, capture_output=True, timeout=120)


def _job(job_id, env):
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def test_torchx_trains_on_two_processes_under_slurm(cluster, tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    with open(torchrun) as f:  # the job's torchrun (first on PATH) runs this interpreter
        head = f.read(1000)
    interpreter = head.splitlines()[0][2:].strip()
    if interpreter == "/bin/sh":  # pip's form for long paths: #!/bin/sh, then an exec line naming python
        interpreter = re.search(r"exec' '([^']+)'", head).group(1)
    assert os.path.samefile(interpreter, sys.executable), (interpreter, sys.executable)
    run, cache = tmp_path / "run", tmp_path / "cache"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torchx.cli.main", "run", "-s", "slurm", "--workspace", "",
         os.path.join(REPO, "torchx_components", "sidvid.py") + ":train", "-j", "1x2", "--memMB", "4096",
         "--env", f"PYTHONPATH={REPO},OMP_NUM_THREADS=1",
         "--", "--run-dir", str(run), f"data.cache_dir={cache}", "data.max_len=20", "model.dim=8", "model.dqk=8",
         "model.dv=8", "model.num_blocks=1", "loss.num_negatives=16", "train.epochs=1", "train.max_steps=2",
         "eval.batch_size=610", "eval.ks=[10]"],
        cwd=tmp_path, env=cluster, capture_output=True, text=True, timeout=300)  # the job's logs land in tmp_path
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    handle = re.search(r"slurm://[^/\s]*/(\d+)", proc.stdout + proc.stderr)
    assert handle, proc.stdout + proc.stderr
    job_id = handle.group(1)

    deadline = time.monotonic() + 600
    job = _job(job_id, cluster)
    while job.get("JobState") not in FINISHED and time.monotonic() < deadline:
        time.sleep(2)
        job = _job(job_id, cluster)
    squeue = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=cluster, capture_output=True, text=True)
    logs = "".join(p.read_text()[-1500:] for p in sorted(tmp_path.glob(f"slurm-{job_id}*")))
    assert job.get("JobState") == "COMPLETED" and job.get("ExitCode") == "0:0", (job, logs)
    assert squeue.stdout.strip() == "", squeue.stdout
    assert job.get("NumNodes") == "1" and job.get("NumCPUs") == "2", job
    # Accounting (slurmdbd) answers for the job: what `torchx status` reads.
    status = subprocess.run([sys.executable, "-m", "torchx.cli.main", "status", f"slurm://torchx/{job_id}"],
                            cwd=tmp_path, env=cluster, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "State: SUCCEEDED" in status.stdout, status.stdout + status.stderr[-2000:]
    sacct = subprocess.run(["sacct", "-n", "-X", "--parsable2", "-j", job_id, "-o", "JobName,State,ExitCode"],
                           env=cluster, capture_output=True, text=True).stdout.split()
    assert sacct == ["sidvid-train-0|COMPLETED|0:0"], sacct
    print(f"slurm job {job_id}: {time.monotonic() - started:.1f} s from submit to COMPLETED")

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["valid"]["count"] == 610
    from sidvid_rec.train.checkpoint import best_checkpoint, read_record

    assert read_record(best_checkpoint(str(run))).world_size == 2  # two ranks under torchrun inside the job
