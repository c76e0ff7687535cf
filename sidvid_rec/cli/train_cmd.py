"""``sidvid-rec train [--config F] --run-dir DIR [section.key=value ...]``."""

import argparse
import json
import os

from sidvid_rec.cli.common import add_config_args, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a model into a run directory")
    parser.add_argument("--run-dir", required=True, help="run directory (config, checkpoints, metrics, TensorBoard)")
    add_config_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sidvid_rec.train.trainer import run_training  # here: `sidvid-rec --help` must not load torch

    cfg = config_from_args(args)
    results = run_training(cfg, args.run_dir)
    # Under torchrun every rank returns the same (reduced) metrics: print them once.
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(results))
    return 0
