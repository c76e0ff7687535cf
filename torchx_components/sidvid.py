"""TorchX components of sidvid_rec: one function per job, each returning a ``specs.AppDef``.

Every component runs a ``sidvid-rec`` subcommand (``python -m sidvid_rec.cli``); the
trailing arguments after ``--`` pass through to it. ``train``, ``evaluate`` and
``pipeline`` are distributed (``torchx.components.dist.ddp``: torchrun, gloo on CPU, nccl on
GPU, ``-j NODESxPROCS``); ``embed``, ``sids`` and ``export`` run one process.

Examples::

    torchx run -s local_cwd torchx_components/sidvid.py:train -j 1x2 -- --run-dir runs/x train.epochs=1
    torchx run -s local_cwd torchx_components/sidvid.py:pipeline -- --config configs/ml-latest-small/demo.yaml --run-dir runs/demo
    torchx run --dryrun -s slurm torchx_components/sidvid.py:train -j 2x8 --gpu 8 -- --run-dir /shared/runs/x
    torchx run --dryrun -s kubernetes -cfg queue=default --workspace "" torchx_components/sidvid.py:train -- --run-dir /data/x

No ``from __future__ import annotations`` here: TorchX reads the annotations at run time.
"""

from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist, utils

DEFAULT_IMAGE = "sidvid-rec:latest"
"""Container image for kubernetes (local_cwd and slurm run the current directory instead)."""
MODULE = "sidvid_rec.cli"


def _distributed(command: List[str], args: List[str], name: str, j: str, image: str, cpu: int, gpu: int,
                 memMB: int, h: Optional[str], env: Optional[Dict[str, str]], max_retries: int, rdzv_port: int,
                 mounts: Optional[List[str]]) -> specs.AppDef:
    app = dist.ddp(*command, *args, m=MODULE, name=name, j=j, image=image, cpu=cpu, gpu=gpu, memMB=memMB, h=h,
                   env=env, max_retries=max_retries, rdzv_port=rdzv_port, mounts=mounts)
    app.roles[0].name = f"sidvid-{command[0]}"  # the job's role (log and pod names), not the module's "cli"
    return app


def train(
    *args: str,
    j: str = "1x2",
    image: str = DEFAULT_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    name: str = "/sidvid-train",
) -> specs.AppDef:
    """Sharded training: the TorchRec tables split over all ranks by DistributedModelParallel,
    the HSTU dense part data-parallel (runs `sidvid-rec train ARGS` under torchrun).

    Add train.resume=true to continue from the run directory's last checkpoint (with
    max_retries, a restarted job then resumes instead of starting over).

    Args:
        args: arguments of `sidvid-rec train`, e.g. --run-dir runs/x --config ml-1m/hstu train.epochs=3
        j: {nnodes}x{nproc_per_node}; on GPU hosts nproc_per_node must not exceed the GPUs
        image: container image (kubernetes); local_cwd and slurm run the current directory
        cpu: CPUs per node
        gpu: GPUs per node (0 = CPU training with gloo)
        memMB: memory per node in MB
        h: a registered named resource (takes precedence over cpu, gpu and memMB)
        env: environment variables of the job, e.g. OMP_NUM_THREADS=2
        max_retries: scheduler retries of a failed job
        rdzv_port: rendezvous port on the first node (multi-node only)
        mounts: mounts, e.g. type=bind,src=/data,dst=/data
        name: job name ({experiment}/{run})

    Returns:
        specs.AppDef: the job
    """
    return _distributed(["train"], list(args), name, j, image, cpu, gpu, memMB, h, env, max_retries, rdzv_port,
                        mounts)


def evaluate(
    *args: str,
    j: str = "1x2",
    image: str = DEFAULT_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    name: str = "/sidvid-evaluate",
) -> specs.AppDef:
    """Full-ranking evaluation of a run's best checkpoint on sharded tables; metrics are reduced
    over ranks, so any number of ranks gives the one-process numbers (`sidvid-rec evaluate ARGS`).

    Args:
        args: arguments of `sidvid-rec evaluate`, e.g. runs/x --split test
        j: {nnodes}x{nproc_per_node}
        image: container image (kubernetes); local_cwd and slurm run the current directory
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        h: a registered named resource (takes precedence over cpu, gpu and memMB)
        env: environment variables of the job
        max_retries: scheduler retries of a failed job
        rdzv_port: rendezvous port on the first node (multi-node only)
        mounts: mounts, e.g. type=bind,src=/data,dst=/data
        name: job name ({experiment}/{run})

    Returns:
        specs.AppDef: the job
    """
    return _distributed(["evaluate"], list(args), name, j, image, cpu, gpu, memMB, h, env, max_retries,
                        rdzv_port, mounts)


def pipeline(
    *args: str,
    j: str = "1x1",
    image: str = DEFAULT_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    name: str = "/sidvid-pipeline",
) -> specs.AppDef:
    """The whole pipeline, embed -> sids -> train -> evaluate -> export, skipping current steps
    (`sidvid-rec pipeline ARGS`); with several ranks training and evaluation are sharded and the
    other steps run on rank 0.

    Args:
        args: arguments of `sidvid-rec pipeline`, e.g. --config configs/ml-latest-small/demo.yaml --run-dir runs/demo
        j: {nnodes}x{nproc_per_node}
        image: container image (kubernetes); local_cwd and slurm run the current directory
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        h: a registered named resource (takes precedence over cpu, gpu and memMB)
        env: environment variables of the job
        max_retries: scheduler retries of a failed job (a restarted pipeline skips finished steps)
        rdzv_port: rendezvous port on the first node (multi-node only)
        mounts: mounts, e.g. type=bind,src=/data,dst=/data
        name: job name ({experiment}/{run})

    Returns:
        specs.AppDef: the job
    """
    return _distributed(["pipeline"], list(args), name, j, image, cpu, gpu, memMB, h, env, max_retries,
                        rdzv_port, mounts)


def _single(command: List[str], args: List[str], name: str, image: str, cpu: int, gpu: int, memMB: int,
            h: Optional[str]) -> specs.AppDef:
    app = utils.python(*command, *args, m=MODULE, image=image, name=name, cpu=cpu, gpu=gpu, memMB=memMB, h=h)
    app.roles[0].name = f"sidvid-{command[0]}"
    return app


def embed(
    *args: str,
    image: str = DEFAULT_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    name: str = "sidvid-embed",
) -> specs.AppDef:
    """Embeds every item's text with the configured encoder, cached (`sidvid-rec embed ARGS`).

    Args:
        args: arguments of `sidvid-rec embed`, e.g. --out runs/x/embeddings sids.encoder=minilm
        image: container image (kubernetes); local_cwd and slurm run the current directory
        cpu: CPUs
        gpu: GPUs (the encoder runs on CUDA when one is visible)
        memMB: memory in MB
        h: a registered named resource (takes precedence over cpu, gpu and memMB)
        name: job name

    Returns:
        specs.AppDef: the job
    """
    return _single(["embed"], list(args), name, image, cpu, gpu, memMB, h)


def sids(
    *args: str,
    image: str = DEFAULT_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    name: str = "sidvid-sids",
) -> specs.AppDef:
    """Builds semantic IDs by balanced residual k-means over the item embeddings
    (`sidvid-rec sids build ARGS`).

    Args:
        args: arguments of `sidvid-rec sids build`, e.g. --out runs/x/sids --embeddings runs/x/embeddings
        image: container image (kubernetes); local_cwd and slurm run the current directory
        cpu: CPUs
        gpu: GPUs
        memMB: memory in MB
        h: a registered named resource (takes precedence over cpu, gpu and memMB)
        name: job name

    Returns:
        specs.AppDef: the job
    """
    return _single(["sids", "build"], list(args), name, image, cpu, gpu, memMB, h)


def export(
    *args: str,
    image: str = DEFAULT_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    name: str = "sidvid-export",
) -> specs.AppDef:
    """Exports a run for retrieval: tables gathered from the checkpoint's shards, dense weights,
    FAISS index, SID artifacts and a checksummed manifest (`sidvid-rec export ARGS`).

    Args:
        args: arguments of `sidvid-rec export`, e.g. runs/x --out runs/x/export
        image: container image (kubernetes); local_cwd and slurm run the current directory
        cpu: CPUs
        gpu: GPUs
        memMB: memory in MB
        h: a registered named resource (takes precedence over cpu, gpu and memMB)
        name: job name

    Returns:
        specs.AppDef: the job
    """
    return _single(["export"], list(args), name, image, cpu, gpu, memMB, h)
