"""``sidvid-rec pipeline [--config F] --run-dir DIR [--force STEP]... [section.key=value ...]``.

Runs embed -> sids -> train -> evaluate -> export on one config, each step through its own
subcommand, and skips a step whose artifact is current. Artifacts live in the run directory::

    DIR/embeddings/     sidvid-rec embed       (modes that use semantic IDs)
    DIR/sids/           sidvid-rec sids build  (the run's sids.dir is set to it)
    DIR/                sidvid-rec train       (config.yaml, checkpoints/, metrics.json)
    DIR/evaluations.json sidvid-rec evaluate   (the test split, keyed by eval settings)
    DIR/export/         sidvid-rec export
    DIR/pipeline.json   what each step was run on: a hash of its inputs

"Current" means: the step's artifact exists and the hash of its inputs (the config fields it
reads and the upstream artifact it consumes) equals the one recorded when it last finished.
A training run that was interrupted with the same inputs is resumed, not restarted.

Under ``torchrun`` / TorchX with several ranks, training and evaluation run on every rank;
embed, sids and export run on rank 0 while the others wait.
"""

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from sidvid_rec import storage
from sidvid_rec.cli.common import add_config_args, config_from_args
from sidvid_rec.config import Config
from sidvid_rec.errors import ArtifactError
from sidvid_rec.eval.records import EVALUATIONS_FILE, lookup

STEPS = ("embed", "sids", "train", "evaluate", "export")
STAMPS = "pipeline.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pipeline", help="embed -> sids -> train -> evaluate -> export, skipping current steps",
        description="Runs the whole pipeline on one config into --run-dir; a step whose artifact is current is skipped.")
    parser.add_argument("--run-dir", required=True, help="run directory (every artifact goes inside it)")
    parser.add_argument("--force", action="append", choices=STEPS, default=[], metavar="STEP",
                        help=f"run this step even when current ({', '.join(STEPS)}); repeatable")
    add_config_args(parser)
    parser.set_defaults(func=run)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _without(section: Any, *names: str) -> Dict[str, Any]:
    return {k: v for k, v in vars(section).items() if k not in names}


class Plan:
    """Paths, step inputs and the recorded stamps of one pipeline run."""

    def __init__(self, cfg: Config, run_dir: str) -> None:
        self.cfg = cfg
        self.run_dir = storage.expand(run_dir)
        self.embeddings = os.path.join(self.run_dir, "embeddings")
        self.sids = os.path.join(self.run_dir, "sids")
        self.export = os.path.join(self.run_dir, "export")
        path = os.path.join(self.run_dir, STAMPS)
        self.stamps: Dict[str, Dict[str, Any]] = storage.read_json_object(path) if storage.exists(path) else {}
        if not all(isinstance(stamp, dict) for stamp in self.stamps.values()):
            raise ArtifactError(f"{path}: every step's stamp must be a JSON object")

    @property
    def uses_sids(self) -> bool:
        return self.cfg.model.mode != "id"

    def _manifest_digest(self, path: str) -> Optional[str]:
        return storage.sha256_file(path) if storage.exists(path) else None

    def inputs(self, step: str) -> str:
        """Hash of what ``step`` reads (config fields + upstream artifacts)."""
        c = self.cfg
        data = _without(c.data, "cache_dir")
        encoder = {k: getattr(c.sids, k) for k in ("encoder", "pooling", "max_tokens", "tfidf_dim", "seed")}
        if step == "embed":
            return _digest({"data": data, "encoder": encoder})
        if step == "sids":
            params = _without(c.sids, "dir", "embed_cache_dir", "text_device", "text_batch_size", "threads")
            return _digest({"embeddings": self._manifest_digest(os.path.join(self.embeddings, "manifest.json")),
                            "params": params})
        if step == "train":
            sids = self._manifest_digest(os.path.join(self.sids, "manifest.json")) if self.uses_sids else None
            return _digest({"data": data, "model": vars(c.model), "loss": vars(c.loss), "sids": sids,
                            "train": _without(c.train, "resume", "device")})
        best = os.path.join(self.run_dir, "checkpoints", "best.pt")
        trained = {"train": self.stamps.get("train", {}).get("inputs"), "best": self._manifest_digest(best)}
        if step == "evaluate":
            return _digest({**trained, "eval": vars(c.eval)})
        # A COBRA export also records the run's decoder and its settings (retrieve's defaults).
        decoding = {"decoding": _without(c.eval, "ks", "batch_size")} if c.model.mode == "cobra" else {}
        return _digest({**trained, "retrieval": vars(c.retrieval), "filter_history": c.eval.filter_history, **decoding})

    def artifact_ok(self, step: str) -> bool:
        paths = {
            "embed": os.path.join(self.embeddings, "manifest.json"),
            "sids": os.path.join(self.sids, "manifest.json"),
            "train": os.path.join(self.run_dir, "checkpoints", "best.pt"),
            "evaluate": os.path.join(self.run_dir, EVALUATIONS_FILE),
            "export": os.path.join(self.export, "manifest.json"),
        }
        return storage.exists(paths[step])

    def is_current(self, step: str) -> bool:
        stamp = self.stamps.get(step, {})
        return bool(stamp.get("done")) and stamp.get("inputs") == self.inputs(step) and self.artifact_ok(step)

    def record(self, step: str, inputs: str, done: bool) -> None:
        self.stamps[step] = {"inputs": inputs, "done": done}
        storage.write_json(os.path.join(self.run_dir, STAMPS), self.stamps)


def _config_args(args: argparse.Namespace, plan: Plan) -> List[str]:
    out = ["--config", args.config] if args.config else []
    return out + list(args.overrides) + ([f"sids.dir={plan.sids}"] if plan.uses_sids else [])


def _section_overrides(cfg: Config, sections: Sequence[str]) -> List[str]:
    """Every field of ``sections`` as ``section.key=value`` (JSON is valid YAML for the values)."""
    return [f"{name}.{key}={json.dumps(value)}" for name in sections for key, value in vars(getattr(cfg, name)).items()]


def _commands(args: argparse.Namespace, plan: Plan, resume: bool) -> Dict[str, List[str]]:
    config = _config_args(args, plan)
    # evaluate and export read the run's saved config; pass this config's eval/retrieval settings.
    late = _section_overrides(plan.cfg, ("eval", "retrieval"))
    return {
        "embed": ["embed", "--out", plan.embeddings, "--no-progress", *config],
        "sids": ["sids", "build", "--out", plan.sids, "--embeddings", plan.embeddings, "--no-progress", *config],
        "train": ["train", "--run-dir", plan.run_dir, *config, f"train.resume={'true' if resume else 'false'}"],
        "evaluate": ["evaluate", plan.run_dir, "--split", "test", *late],
        "export": ["export", plan.run_dir, "--out", plan.export, *late],
    }


def _log(message: str, is_main: bool) -> None:
    if is_main:
        print(f"[pipeline] {message}", file=sys.stderr, flush=True)


def _on_all_ranks(step: str) -> bool:
    return step in ("train", "evaluate")


def _shared(value: Any, ctx: Any) -> Any:
    """Rank 0's ``value`` on every rank (decisions must agree across ranks)."""
    if ctx is None or ctx.world_size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _run_step(step: str, argv: List[str], main: Callable[[List[str]], int], ctx: Any) -> int:
    is_main = ctx is None or ctx.is_main
    rc = main(argv) if (_on_all_ranks(step) or is_main) else 0
    if ctx is not None and ctx.world_size > 1:
        # here: `sidvid-rec --help` must not load torch. The reduced tensor lives on the
        # context's collective device (the rank's GPU under nccl, which reduces no CPU tensor).
        from sidvid_rec.process_group import all_reduce_max_int

        rc = all_reduce_max_int(rc, ctx)
    return rc


def run(args: argparse.Namespace) -> int:
    from sidvid_rec.cli import main  # here: sidvid_rec.cli imports this module at start-up

    cfg = config_from_args(args)  # validates the config before anything runs
    ctx = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from sidvid_rec.process_group import init_distributed  # here: `sidvid-rec --help` must not load torch

        ctx = init_distributed(cfg.train.device)
    is_main = ctx is None or ctx.is_main
    plan = Plan(cfg, args.run_dir)
    if is_main:
        storage.mkdirs(plan.run_dir)
    summary: Dict[str, str] = {}
    for step in STEPS:
        plan = Plan(cfg, args.run_dir)  # re-read the stamps the previous step wrote
        if step in ("embed", "sids") and not plan.uses_sids:
            summary[step] = "not needed (model.mode=id)"
            continue
        current = _shared(plan.is_current(step) and step not in args.force, ctx)
        if current:
            summary[step] = "skipped (current)"
            _log(f"{step}: current, skipped", is_main)
            continue
        inputs = plan.inputs(step)
        started = plan.stamps.get(step, {})
        resume = _shared(step == "train" and started.get("inputs") == inputs and not started.get("done"), ctx)
        _log(f"{step}: running{' (resuming)' if resume else ''}", is_main)
        if is_main:
            plan.record(step, inputs, done=False)
        start = time.time()
        rc = _run_step(step, _commands(args, plan, resume)[step], main, ctx)
        if rc != 0:
            _log(f"{step}: failed (exit code {rc}); later steps not run", is_main)
            return rc
        if is_main:
            plan.record(step, inputs, done=True)
        _log(f"{step}: done in {time.time() - start:.1f} s", is_main)
        summary[step] = "ran"
    if is_main:
        metrics = lookup(plan.run_dir, cfg, "test")
        popular = _most_popular(cfg)
        _log(f"test: {_headline(metrics)} (most popular, the same evaluation: {_headline(popular)})", True)
        print(json.dumps({"run_dir": plan.run_dir, "steps": summary, "test": metrics, "export": plan.export,
                          "most_popular": popular}))
    return 0


def _most_popular(cfg: Any) -> Dict[str, float]:
    """The most-popular baseline's test metrics, printed beside the model's so that a newcomer
    can tell a good figure from a bad one."""
    from sidvid_rec.data import load_sequences
    from sidvid_rec.eval.popularity import evaluate_most_popular

    return evaluate_most_popular(load_sequences(cfg.data), "test", cfg.data.protocol, cfg.data.max_len,
                                 cfg.eval.ks, cfg.eval.filter_history, cfg.eval.batch_size)


def _headline(metrics: Optional[Dict[str, float]]) -> str:
    if not metrics:
        return "not evaluated"
    return " ".join(f"{key.upper()} {metrics[key]:.4f}" for key in ("hr@10", "ndcg@10") if key in metrics)
