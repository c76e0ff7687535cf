"""``sidvid-rec data stats|prepare|convert|baseline``: inspect a data set, write its preprocessed
cache, write a built-in data set (MovieLens, Amazon) as an ``interactions`` table plus its item
table, or measure the most-popular baseline.

``data baseline [PATH] [--split valid|test]``: every user gets the items the training split
holds most often (:mod:`sidvid_rec.eval.popularity`), ranked by the same full-ranking
evaluation as a trained model (``data.protocol``, ``data.max_len``, ``eval.ks``,
``eval.filter_history``). Prints ``{"baseline": "most_popular", "split": ..., "metrics": {...}}``.

``data convert [PATH] [--format F] --out FILE.parquet|FILE.csv [--items-out FILE]``: the
interactions (``data.user_col``, ``data.item_col``, ``data.time_col``, ``rating``) in the
reader's row order, and the items (``data.item_col``, ``title``, ``text``; default
``<FILE stem>.items.<ext>``), each written atomically. Prints a JSON summary with the overrides
that read the result back (``data.format=interactions data.path=... data.items_path=...
data.text_cols=[text]``).
"""

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

    convert = commands.add_parser("convert", help="write a built-in data set as an interactions table "
                                                  "(Parquet or CSV) plus an item table")
    convert.add_argument("path", nargs="?", default=None, help="data directory (default: data.path of the config)")
    convert.add_argument("--format", default=None, help="data format (default: auto-detect)")
    convert.add_argument("--out", required=True, help="interactions file to write: .parquet or .csv")
    convert.add_argument("--overwrite", action="store_true", help="replace existing output files")
    convert.add_argument("--items-out", default=None,
                         help="item table to write (default: <out stem>.items.<out extension>)")
    add_config_args(convert)
    convert.set_defaults(func=run_convert)

    baseline = commands.add_parser("baseline", help="full-ranking metrics of the most-popular baseline as JSON")
    baseline.add_argument("path", nargs="?", default=None, help="data directory (default: data.path of the config)")
    baseline.add_argument("--format", default=None, help="data format (default: auto-detect)")
    baseline.add_argument("--split", choices=["valid", "test"], default="test")
    add_config_args(baseline)
    baseline.set_defaults(func=run_baseline)


def _data_config(args: argparse.Namespace):
    return _config(args).data


def _config(args: argparse.Namespace):
    overrides = list(args.overrides)
    if args.path is not None and "=" in args.path:  # argparse gives the first override to `path`
        overrides.insert(0, args.path)
        args.path = None
    if args.path is not None:
        overrides.append(f"data.path={args.path}")
    if args.format is not None:
        overrides.append(f"data.format={args.format}")
    args.overrides = overrides
    return config_from_args(args)


def run_stats(args: argparse.Namespace) -> int:
    data = load_sequences(_data_config(args), write_cache=False)
    print(json.dumps(data.stats()))
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    cfg = _data_config(args)
    data = load_sequences(cfg, use_cache=False)
    print(json.dumps({"cache": cache_path(cfg), **data.stats()}))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    import os

    from sidvid_rec import storage
    from sidvid_rec.artifacts import check_new_file
    from sidvid_rec.data import interactions, readers
    from sidvid_rec.data.sequences import resolve_data_path
    from sidvid_rec.errors import DataError

    cfg = _data_config(args)
    out = storage.expand(args.out)
    if not out.lower().endswith(readers.INTERACTIONS_SUFFIXES):
        raise DataError(f"--out {args.out}: the output must end in .parquet or .csv")
    stem, ext = os.path.splitext(out)
    items_out = storage.expand(args.items_out) if args.items_out else f"{stem}.items{ext}"
    for target in (out, items_out):
        check_new_file(target, args.overwrite)
    path = resolve_data_path(cfg)
    fmt = readers.detect_format(path) if cfg.format == "auto" else readers.canonical_format(cfg.format)
    if fmt == readers.INTERACTIONS:
        raise DataError(f"{path} is already in the interactions format; convert reads a built-in format "
                        f"({', '.join(readers.FORMAT_FILES)})")
    print(json.dumps(interactions.write_tables(readers.read(path, fmt), out, items_out, cfg)))
    return 0


def run_baseline(args: argparse.Namespace) -> int:
    from sidvid_rec.errors import ConfigError
    from sidvid_rec.eval.popularity import evaluate_most_popular  # here: `data stats` must not load torch

    cfg = _config(args)
    if args.split == "valid" and cfg.data.protocol == "gr":
        raise ConfigError("protocol gr has no validation split; use --split test")
    metrics = evaluate_most_popular(load_sequences(cfg.data), args.split, cfg.data.protocol, cfg.data.max_len,
                                    cfg.eval.ks, cfg.eval.filter_history, cfg.eval.batch_size)
    print(json.dumps({"baseline": "most_popular", "split": args.split, "metrics": metrics}))
    return 0
