"""``sidvid-rec recommend EXPORT --users FILE|all --k K --out F.parquet|F.jsonl``.

Top-K for every user (``all``) or the users of ``FILE`` (raw user ids, one per line; an unknown
id is a one-line error), from each user's whole history in the data set the run was trained on
(``data.key=value`` overrides, e.g. ``data.path=``). One row per user: ``user_id``, ``item_ids``
(raw ids, best first, as ``retrieve`` prints them), ``scores``. Batched (``--batch-size``),
resumable (parts of ``--chunk-users`` users under ``.<out>.parts/``; a rerun skips finished
parts), the output written atomically. COBRA exports take ``--decoder``. Prints a JSON summary.
See :mod:`sidvid_rec.export.recommend`.
"""

import argparse
import json
from typing import get_args

from sidvid_rec.types import DecoderKind


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("recommend", help="top-K for every user of the run's data set, to a "
                                                     ".parquet or .jsonl file")
    parser.add_argument("export_dir", help="directory written by `sidvid-rec export`")
    parser.add_argument("--users", default="all",
                        help="`all` (default) or a text file of raw user ids, one per line (unknown ids: error)")
    parser.add_argument("--k", type=int, default=10, help="items per user (default 10)")
    parser.add_argument("--out", required=True, help="output file: .parquet or .jsonl")
    parser.add_argument("--batch-size", type=int, default=256, help="users encoded per batch (default 256)")
    parser.add_argument("--chunk-users", type=int, default=10_000,
                        help="users per resumable part (default 10000)")
    parser.add_argument("--decoder", choices=get_args(DecoderKind), default=None,
                        help="COBRA decoder (default: the run's eval.decoder)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("overrides", nargs="*", metavar="data.key=value",
                        help="data.* overrides of the run's recorded data config (e.g. data.path=...)")
    parser.set_defaults(func=run_recommend)


def run_recommend(args: argparse.Namespace) -> int:
    from sidvid_rec import storage
    from sidvid_rec.artifacts import check_new_file
    from sidvid_rec.export.recommend import make_job, output_kind  # here: `sidvid-rec --help` must not load torch

    output_kind(args.out)  # a bad extension is refused before anything is loaded
    check_new_file(storage.expand(args.out), args.overwrite)
    job = make_job(args.export_dir, args.users, args.k, args.out, args.batch_size, args.chunk_users,
                   args.decoder, args.overrides, progress=not args.no_progress)
    print(json.dumps(job.run()))
    return 0
