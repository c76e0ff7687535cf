"""``sidvid-rec data stats|prepare``: inspect a data set and write its preprocessed cache."""

import argparse
import json

from sidvid_rec.cli.common import add_config_args, config_from_args
from sidvid_rec.data.sequences import cache_path, load_sequences


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="inspect and preprocess data sets")
    commands = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    stats = commands.add_parser("stats", help="print users, items, interactions and length stats as JSON")
    stats.add_argument("path", nargs="?", default=None, help="data directory (default: data.path of the config)")
    stats.add_argument("--format", default=None, help="data format (default: data.format, i.e. auto-detect)")
    add_config_args(stats)
    stats.set_defaults(func=run_stats)

    prepare = commands.add_parser("prepare", help="read the data set and write its preprocessed cache")
    prepare.add_argument("path", nargs="?", default=None, help="data directory (default: data.path of the config)")
    prepare.add_argument("--format", default=None, help="data format (default: auto-detect)")
    add_config_args(prepare)
    prepare.set_defaults(func=run_prepare)


def _data_config(args: argparse.Namespace):
    overrides = list(args.overrides)
    if args.path is not None and "=" in args.path:  # argparse gives the first override to `path`
        overrides.insert(0, args.path)
        args.path = None
    if args.path is not None:
        overrides.append(f"data.path={args.path}")
    if args.format is not None:
        overrides.append(f"data.format={args.format}")
    args.overrides = overrides
    return config_from_args(args).data


def run_stats(args: argparse.Namespace) -> int:
    data = load_sequences(_data_config(args), write_cache=False)
    print(json.dumps(data.stats()))
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    cfg = _data_config(args)
    data = load_sequences(cfg, use_cache=False)
    print(json.dumps({"cache": cache_path(cfg), **data.stats()}))
    return 0
