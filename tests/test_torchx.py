"""TorchX components: CLI-parseable definitions, slurm/kubernetes dry runs, a local 2-process run."""

import importlib.util
import json
import os
import subprocess
import sys

from torchx.components.component_test_base import ComponentTestCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPONENTS = os.path.join(REPO, "torchx_components", "sidvid.py")
JOBS = ("embed", "sids", "train", "evaluate", "export", "pipeline")


def _load_components():
    spec = importlib.util.spec_from_file_location("sidvid_components", COMPONENTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


components = _load_components()


class TestComponentDefinitions(ComponentTestCase):
    def test_every_job_parses_as_a_torchx_component(self) -> None:
        for job in JOBS:
            self.validate(components, job)  # what `torchx run file.py:job --help` does


def test_trailing_arguments_pass_through_to_the_cli():
    app = components.train("--run-dir", "/runs/x", "train.epochs=1", j="2x4")
    role = app.roles[0]
    assert role.name == "sidvid-train" and role.num_replicas == 2
    command = role.args[-1]
    assert "--nnodes 2 --nproc_per_node 4" in command
    assert command.endswith("-m sidvid_rec.cli train --run-dir /runs/x train.epochs=1")
    export = components.export("/runs/x", "--out", "/runs/x/export")
    assert export.roles[0].args[-4:] == ["export", "/runs/x", "--out", "/runs/x/export"]
    assert components.sids("--out", "d").roles[0].args[-4:] == ["sids", "build", "--out", "d"]


def test_slurm_and_kubernetes_dry_runs_render():
    from torchx.runner import get_runner

    runner = get_runner()
    app = components.train("--run-dir", "/shared/runs/x", "train.epochs=1", j="2x2", gpu=0)
    slurm = runner.dryrun(app, "slurm", cfg={"time": "1:00:00"}).request.materialize()
    assert slurm.startswith("#!/bin/bash") and "#SBATCH --job-name=sidvid-train-0" in slurm
    assert "--time=1:00:00" in slurm and "--nnodes 2 --nproc_per_node 2" in slurm
    assert "-m sidvid_rec.cli train --run-dir /shared/runs/x train.epochs=1" in slurm

    job = runner.dryrun(app, "kubernetes", cfg={"queue": "default"}).request.resource
    assert job["kind"] == "Job" and job["apiVersion"].startswith("batch.volcano.sh/")
    assert job["spec"]["queue"] == "default" and len(job["spec"]["tasks"]) == 2
    container = job["spec"]["tasks"][0]["template"].spec.containers[0]  # kubernetes client V1Pod
    assert container.image == components.DEFAULT_IMAGE
    assert container.command[:2] == ["bash", "-c"] and "sidvid_rec.cli train" in container.command[2]


def _torchx(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "torchx.cli.main", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_kubernetes_dry_run_from_the_command_line():
    proc = _torchx("run", "--dryrun", "-s", "kubernetes", "-cfg", "queue=default", "--workspace", "",
                   "torchx_components/sidvid.py:train", "-j", "1x2", "--", "--run-dir", "/data/x", "train.epochs=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "schedulerName: volcano" in proc.stdout and "--nproc_per_node 2" in proc.stdout


def test_local_cwd_trains_on_two_processes(tmp_path):
    run = tmp_path / "run"
    proc = _torchx("run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}",
                   "torchx_components/sidvid.py:train", "-j", "1x2", "--", "--run-dir", str(run),
                   f"data.cache_dir={tmp_path / 'cache'}", "data.max_len=20", "model.dim=8", "model.dqk=8",
                   "model.dv=8", "model.num_blocks=1", "loss.num_negatives=16", "train.epochs=1",
                   "train.max_steps=2", "eval.batch_size=610", "eval.ks=[10]")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["valid"]["count"] == 610
    from sidvid_rec.train.checkpoint import best_checkpoint, read_record

    assert read_record(best_checkpoint(str(run))).world_size == 2
