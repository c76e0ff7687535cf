"""Checkpoints that survive a crash: written to a temporary file and renamed into place.

A checkpoint holds the model, the optimizers, the position in training (epoch, step, batch
within the epoch), the early-stopping state, every RNG state and a fingerprint of the
config fields that shape the model, so that resuming with another model is refused.
Files are plain tensors and primitives, loaded with ``torch.load(weights_only=True)``.
"""

import hashlib
import json
import os
import re
from typing import Any, Dict, List, Optional

import torch

from sidvid_rec import io
from sidvid_rec.config import Config
from sidvid_rec.errors import ArtifactError

_NAME = re.compile(r"^epoch-(\d+)\.pt$")


def model_fingerprint(cfg: Config, num_items: int) -> str:
    """Hash of everything that decides parameter shapes and meaning."""
    shape = {"model": cfg.model.__dict__, "num_items": num_items, "max_len": cfg.data.max_len,
             "data_path": cfg.data.path, "format": cfg.data.format}
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> List[str]:
    """Checkpoint paths of a run, oldest epoch first."""
    directory = checkpoint_dir(run_dir)
    if not io.exists(directory):
        return []
    names = [n for n in io.ls(directory) if _NAME.match(n)]
    names.sort(key=lambda n: int(_NAME.match(n).group(1)))
    return [os.path.join(directory, n) for n in names]


def save_checkpoint(run_dir: str, name: str, state: Dict[str, Any], keep: int = 2) -> str:
    """Writes ``checkpoints/<name>`` atomically; keeps the newest ``keep`` epoch checkpoints."""
    path = os.path.join(checkpoint_dir(run_dir), name)
    with io.atomic_open(path, "wb") as f:
        torch.save(state, f)
    if _NAME.match(name):
        for old in list_checkpoints(run_dir)[:-keep]:
            io.path_manager.rm(old)
    return path


def load_checkpoint(path: str, expected_fingerprint: Optional[str] = None) -> Dict[str, Any]:
    if not io.exists(path):
        raise ArtifactError(f"checkpoint not found: {path}")
    try:
        with io.open_file(path, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file: one message)
        raise ArtifactError(f"cannot read checkpoint {path}: {type(e).__name__}")
    if expected_fingerprint is not None and state.get("fingerprint") != expected_fingerprint:
        raise ArtifactError(
            f"checkpoint {path} was written for another model/data config "
            f"(fingerprint {state.get('fingerprint')} != {expected_fingerprint})"
        )
    return state


def latest_checkpoint(run_dir: str) -> Optional[str]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def best_checkpoint(run_dir: str) -> str:
    path = os.path.join(checkpoint_dir(run_dir), "best.pt")
    if not io.exists(path):
        raise ArtifactError(f"run directory {run_dir} has no checkpoint (expected {path}); train first")
    return path
