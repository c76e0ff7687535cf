"""``sidvid-rec evaluate RUN_DIR [--split valid|test] [--decoder ...] [section.key=value ...]``.

Evaluates the run's best checkpoint with full ranking, records the result in
``RUN_DIR/evaluations.json`` under the key of its decoder and settings (see
:mod:`sidvid_rec.eval.records`; the training-time ``metrics.json`` is kept, and gains the
split only when it lacks it under the run's own settings) and prints the metrics as one JSON
object on the last line of stdout.
"""

import argparse
import json
from typing import get_args

from sidvid_rec.types import DecoderKind


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="full-ranking evaluation of a run's best checkpoint")
    parser.add_argument("run_dir", help="run directory written by `sidvid-rec train`")
    parser.add_argument("--split", choices=["valid", "test"], default="test")
    parser.add_argument("--decoder", choices=get_args(DecoderKind), default=None,
                        help="COBRA decoder (default: eval.decoder of the run's config)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="eval.* / retrieval.* overrides")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: `sidvid-rec --help` must not load torch/torchrec.
    from sidvid_rec.config import load_run_config
    from sidvid_rec.data import load_sequences, make_split
    from sidvid_rec.errors import ConfigError
    from sidvid_rec.eval.evaluate import evaluate_model
    from sidvid_rec.eval.records import record_evaluation
    from sidvid_rec.process_group import init_distributed
    from sidvid_rec.train import checkpoint as ckpt
    from sidvid_rec.train.distributed import build_sharded_model

    overrides = list(args.overrides) + ([f"eval.decoder={args.decoder}"] if args.decoder else [])
    cfg = load_run_config(args.run_dir, overrides, command="evaluate")
    run_cfg = load_run_config(args.run_dir, command="evaluate")
    if args.split == "valid" and cfg.data.protocol == "gr":
        raise ConfigError("protocol gr has no validation split; use --split test")
    best = ckpt.best_checkpoint(args.run_dir)
    ctx = init_distributed(cfg.train.device)
    data = load_sequences(cfg.data)
    model = build_sharded_model(cfg, data, ctx)
    ckpt.load_model_weights(best, model, ckpt.model_fingerprint(cfg, data.num_items), data.fingerprint)
    metrics = evaluate_model(model, make_split(data, args.split, cfg.data.protocol, cfg.data.max_len), cfg, ctx)
    if ctx.is_main:
        record_evaluation(args.run_dir, run_cfg, cfg, args.split, metrics)
        print(json.dumps(metrics))
    return 0
