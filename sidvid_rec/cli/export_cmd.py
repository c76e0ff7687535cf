"""``sidvid-rec export`` and ``sidvid-rec retrieve``.

* ``export RUN_DIR --out DIR [--checkpoint best|latest|RECORD] [retrieval.key=value ...]``: the run's tables gathered
  from their shards (safetensors), dense weights, item vectors, a FAISS index, the SID
  artifacts (modes that use them), item titles and raw ids, and a manifest with the sha256
  of every file. Prints a JSON summary.
* ``retrieve DIR --history ID,ID,... [--k 10] [--timestamps T,T,...] [--query-time T]
  [--internal-ids] [--decoder direct|neighbor|soft|beam]``: loads only the export (verified
  against its manifest; no training code, no pickle) and prints one JSON object
  ``{"items": [{"item_id", "title", "score"}, ...]}``, best first. ``--history`` takes the
  data set's own item ids (e.g. MovieLens ``movieId``), oldest first, and ``item_id`` in the
  output is the same kind of id; ``--internal-ids`` switches both to the contiguous ids 1..N.
  A COBRA export decodes with ``--decoder`` (default: the run's ``eval.decoder``, with the
  decoder settings recorded at export); other modes take no decoder.
"""

import argparse
import json
from typing import List, Optional, get_args

from sidvid_rec.types import DecoderKind
from sidvid_rec.errors import DataError


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser("export", help="export a run's tables, weights and FAISS index for retrieval")
    export.add_argument("run_dir", help="run directory written by `sidvid-rec train`")
    export.add_argument("--out", required=True, help="export directory (replaced atomically)")
    export.add_argument("--checkpoint", default="best",
                        help="best (default), latest, or the path of a checkpoint record (checkpoints/*.pt)")
    export.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="retrieval.* (FAISS index kind ...) and eval.* (eval.filter_history; COBRA: "
                             "eval.decoder and the decoder settings retrieve uses) overrides")
    export.set_defaults(func=run_export)

    retrieve = subparsers.add_parser("retrieve", help="top-K items for a history, from an export directory")
    retrieve.add_argument("export_dir", help="directory written by `sidvid-rec export`")
    retrieve.add_argument("--history", required=True,
                          help="comma-separated item ids, oldest first (the data set's raw ids, e.g. movieId)")
    retrieve.add_argument("--k", type=int, default=10, help="items to return (default 10)")
    retrieve.add_argument("--timestamps", default=None,
                          help="comma-separated unix times of the history items (feeds the time bias)")
    retrieve.add_argument("--query-time", type=int, default=None,
                          help="time of the recommendation (default: the last history item's time)")
    retrieve.add_argument("--internal-ids", action="store_true",
                          help="--history and the output use internal ids 1..N instead of raw ids")
    retrieve.add_argument("--decoder", choices=get_args(DecoderKind), default=None,
                          help="COBRA decoder (default: the run's eval.decoder); modes id/sid/sid_id take none "
                               "(their top-K is exact inner product)")
    retrieve.set_defaults(func=run_retrieve)


def run_export(args: argparse.Namespace) -> int:
    from sidvid_rec.export.writer import export_run  # here: `sidvid-rec --help` must not load torch

    print(json.dumps(export_run(args.run_dir, args.out, args.checkpoint, args.overrides)))
    return 0


def _int_list(text: Optional[str], what: str) -> Optional[List[int]]:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise DataError(f"{what} must be comma-separated integers, got {text!r}")


def run_retrieve(args: argparse.Namespace) -> int:
    from sidvid_rec.export.serving import load_export  # here: `sidvid-rec --help` must not load torch

    history = [t.strip() for t in args.history.split(",") if t.strip()]
    if args.internal_ids:
        history = _int_list(args.history, "--history")
    timestamps = _int_list(args.timestamps, "--timestamps")
    model = load_export(args.export_dir)
    result = model.retrieve(history, k=args.k, timestamps=timestamps, query_time=args.query_time,
                            raw_ids=not args.internal_ids, decoder=args.decoder)
    items = result.items
    if args.internal_ids:
        items = [dict(item, item_id=int(i)) for item, i in zip(items, result.ids)]
    print(json.dumps({"items": items}, ensure_ascii=False))
    return 0
