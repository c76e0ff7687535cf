"""Where a run directory keeps its evaluation results.

Two files, with different owners:

* ``RUN_DIR/metrics.json`` is the training-time record (``{"valid": ..., "test": ...,
  "best_epoch": N}`` of the best checkpoint under the run's own settings). Training writes it;
  ``evaluate`` only fills a split it lacks, and only under the run's own settings, so a
  re-evaluation with another decoder never replaces what training measured.
* ``RUN_DIR/evaluations.json`` holds every evaluation, keyed by the settings that decide its
  figures: ``{KEY: {"settings": {...}, "valid": {...}, "test": {...}}}``. ``KEY`` reads
  ``<decoder>-<digest>`` for COBRA runs and ``full-<digest>`` for full-ranking modes.

No torch here: the pipeline's start-up path reads these files.
"""

import hashlib
import json
import os
from typing import Any, Dict, Optional

from sidvid_rec import storage
from sidvid_rec.config import Config
from sidvid_rec.errors import ArtifactError
from sidvid_rec.types import decodes

METRICS_FILE = "metrics.json"
EVALUATIONS_FILE = "evaluations.json"

# Fields that cannot change a figure: how many users are scored at once, where FAISS runs.
_NEUTRAL = {"eval": ("batch_size",), "retrieval": ("use_gpu",)}


def evaluation_settings(cfg: Config) -> Dict[str, Any]:
    """The settings that decide an evaluation's figures: ``eval.*`` (all of it for COBRA, only
    ``ks`` and ``filter_history`` otherwise) and, for COBRA, ``retrieval.*``."""
    evaluation = {k: v for k, v in vars(cfg.eval).items() if k not in _NEUTRAL["eval"]}
    if not decodes(cfg.model.mode):
        return {"eval": {"ks": evaluation["ks"], "filter_history": evaluation["filter_history"]}}
    retrieval = {k: v for k, v in vars(cfg.retrieval).items() if k not in _NEUTRAL["retrieval"]}
    return {"eval": evaluation, "retrieval": retrieval}


def settings_key(cfg: Config) -> str:
    """A stable name of :func:`evaluation_settings`: ``beam-3f2a9c01de``, ``full-0b1c...``."""
    settings = evaluation_settings(cfg)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    label = cfg.eval.decoder if decodes(cfg.model.mode) else "full"
    return f"{label}-{digest}"


def record_evaluation(run_dir: str, run_cfg: Config, cfg: Config, split: str, metrics: Dict[str, float]) -> str:
    """Stores ``metrics`` of ``split`` measured under ``cfg`` (the run's ``run_cfg`` with any
    eval/retrieval overrides) and returns its key. ``metrics.json`` gains the split only when
    it lacks it and ``cfg`` evaluates exactly as the run does."""
    key = settings_key(cfg)
    path = os.path.join(run_dir, EVALUATIONS_FILE)
    records = _read_mapping(path)
    entry = records.get(key) if isinstance(records.get(key), dict) else {}
    records[key] = {**entry, "settings": evaluation_settings(cfg), split: metrics}
    storage.write_json(path, records)
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    recorded = _read_mapping(metrics_path)
    if key == settings_key(run_cfg) and split not in recorded:
        storage.write_json(metrics_path, {**recorded, split: metrics})
    return key


def lookup(run_dir: str, cfg: Config, split: str) -> Optional[Dict[str, float]]:
    """The metrics of ``split`` under ``cfg``'s settings, or None when never measured."""
    entry = _read_mapping(os.path.join(run_dir, EVALUATIONS_FILE)).get(settings_key(cfg))
    return entry.get(split) if isinstance(entry, dict) else None


def _read_mapping(path: str) -> Dict[str, Any]:
    """A JSON object file's contents; {} when absent. A damaged file is an error
    (:func:`storage.read_json` raises it as one line), never silently overwritten."""
    if not storage.exists(path):
        return {}
    value = storage.read_json(path)
    if not isinstance(value, dict):
        raise ArtifactError(f"{path} is not a JSON object; move it away to record evaluations")
    return value
