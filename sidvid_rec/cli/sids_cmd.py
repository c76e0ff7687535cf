"""``sidvid-rec sids build|report|compare``: semantic IDs from item text embeddings.

* ``sids build [--config F] --out DIR [--embeddings FILE] [section.key=value ...]``
* ``sids report DIR [--json] [--embeddings FILE]``
* ``sids compare A B [--json]``
"""

import argparse
import json
import os
from typing import Any, Dict, Optional, Tuple, Union

from sidvid_rec import storage
from sidvid_rec.cli.common import add_config_args, config_from_args
from sidvid_rec.config import Config, RqParams, RqVaeParams, SidsConfig, narrow
from sidvid_rec.data import SequenceData, load_sequences
from sidvid_rec.errors import UserError
from sidvid_rec.semantic_ids import (SidArtifacts, SizeBounds, build_semantic_ids, load_sid_artifacts,
                                     render_compare, render_markdown, sid_report, write_semantic_ids)
from sidvid_rec.semantic_ids.artifacts import FORMAT, REPORT_JSON, write_report_files
from sidvid_rec.semantic_ids.kmeans import faiss_threads
from sidvid_rec.semantic_ids.rqvae import check_rqvae_inputs, load_rqvae_model
from sidvid_rec.text import embed_dataset, load_embeddings
from sidvid_rec.artifacts import check_replaceable
from sidvid_rec.text.store import array_sha256


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sids", help="build, report and compare semantic IDs")
    commands = parser.add_subparsers(dest="sids_command", metavar="ACTION", required=True)

    build = commands.add_parser("build", help="embed item texts and quantize them into semantic IDs",
                                description="Balanced residual k-means (sids.method=rqkmeans) or an RQ-VAE "
                                            "(sids.method=rqvae) over the item text embeddings.")
    build.add_argument("--out", required=True, help="artifact directory (replaced atomically)")
    build.add_argument("--embeddings", default=None, help="reuse an `sidvid-rec embed` output instead of embedding")
    build.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_config_args(build)
    build.set_defaults(func=run_build)

    report = commands.add_parser("report", help="print the quality report of a build (and write report.md/png)")
    report.add_argument("dir", help="artifact directory of `sids build`")
    report.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    report.add_argument("--embeddings", default=None,
                        help="recompute the reconstruction errors against these embeddings")
    report.set_defaults(func=run_report)

    compare = commands.add_parser("compare", help="two builds side by side (e.g. balanced vs none)")
    compare.add_argument("a", help="first artifact directory")
    compare.add_argument("b", help="second artifact directory")
    compare.add_argument("--json", action="store_true", help="print {\"a\": report, \"b\": report}")
    compare.set_defaults(func=run_compare)


def rq_params(sids: SidsConfig) -> RqParams:
    """Flat k-means parameters out of the ``sids`` config section."""
    if sids.kmeans_iters < 1 or sids.balance_iters < 0 or sids.threads < 0:
        raise UserError(f"sids.kmeans_iters must be >= 1, sids.balance_iters and sids.threads >= 0, "
                        f"got {sids.kmeans_iters}, {sids.balance_iters} and {sids.threads}")
    return narrow(sids, RqParams)


def sid_params(sids: SidsConfig) -> Union[RqParams, RqVaeParams]:
    """The settings of ``sids.method``: :class:`RqParams` (k-means) or :class:`RqVaeParams`."""
    params = rq_params(sids)
    return narrow(sids, RqVaeParams) if sids.method == "rqvae" else params


def _embeddings_for(args: argparse.Namespace, cfg: Config, data: SequenceData) -> Dict[str, Any]:
    """``{"vectors": [N+1, D], "encoder": identity, "file": path or None}`` for the build."""
    if args.embeddings is None:
        vectors, manifest = embed_dataset(cfg, data, progress=not args.no_progress)
        return {"vectors": vectors, "encoder": manifest["encoder"], "file": None}
    emb = load_embeddings(args.embeddings)
    if emb.num_items != data.num_items:
        raise UserError(f"{args.embeddings} holds {emb.num_items} items but the data set has {data.num_items}")
    fingerprint = emb.manifest.get("data_fingerprint")
    if fingerprint and fingerprint != data.fingerprint:
        raise UserError(f"{args.embeddings} was built for data fingerprint {fingerprint}, "
                        f"the configured data set is {data.fingerprint}")
    return {"vectors": emb.vectors, "encoder": emb.manifest.get("encoder"), "file": storage.expand(args.embeddings)}


def run_build(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    params = sid_params(cfg.sids)
    check_replaceable(storage.expand(args.out), FORMAT)  # fail before the expensive part
    data = load_sequences(cfg.data)
    emb = _embeddings_for(args, cfg, data)
    x = emb["vectors"][1:]  # row 0 is the padding item
    if isinstance(params, RqVaeParams):
        check_rqvae_inputs(x, params)
    with faiss_threads(cfg.sids.threads):
        sids = build_semantic_ids(x, params, cfg.sids.dedup, progress=not args.no_progress, method=cfg.sids.method)
    provenance = {"encoder": emb["encoder"], "embeddings_file": emb["file"],
                  "embeddings_sha256": array_sha256(emb["vectors"]),
                  "data_fingerprint": data.fingerprint, "data_format": data.format}
    report = write_semantic_ids(args.out, sids, x, provenance)
    print(render_markdown(report, title=f"Semantic-ID quality: {storage.expand(args.out)}"), end="")
    return 0


def _bounds(art: SidArtifacts) -> Optional[SizeBounds]:
    bounds = art.manifest.get("balance_stats", {}).get("size_bounds")
    return SizeBounds(*bounds) if bounds else None


def artifact_report(directory: str, embeddings: Optional[str] = None) -> Tuple[SidArtifacts, Dict[str, Any]]:
    """A validated build and its report: recomputed from the codes, reconstruction errors from
    the stored ``report.json`` (or recomputed against ``embeddings`` when given)."""
    art = load_sid_artifacts(directory)
    codes = art.codes[1:]
    if embeddings is not None:
        emb = load_embeddings(embeddings)
        if emb.num_items != art.num_items:
            raise UserError(f"{embeddings} holds {emb.num_items} items but {directory} has {art.num_items}")
        decode = load_rqvae_model(directory, art).decode_numpy if art.method == "rqvae" else None
        return art, sid_report(codes, art.codebooks, emb.vectors[1:], decode=decode, method=art.method)
    report = sid_report(codes, art.codebooks, None, method=art.method)
    stored_path = os.path.join(storage.expand(directory), REPORT_JSON)
    if storage.exists(stored_path):
        stored = storage.read_json(stored_path)
        for row, old in zip(report["layers"], stored.get("layers", [])):
            row["mse"], row["cosine"] = old.get("mse"), old.get("cosine")
    return art, report


def run_report(args: argparse.Namespace) -> int:
    art, report = artifact_report(args.dir, args.embeddings)
    write_report_files(storage.expand(args.dir), report, art.codes[1:], art.codebook_size, _bounds(art))
    if args.json:
        print(json.dumps(report))
    else:
        print(render_markdown(report, title=f"Semantic-ID quality: {storage.expand(args.dir)}"), end="")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    a, b = artifact_report(args.a)[1], artifact_report(args.b)[1]
    if args.json:
        print(json.dumps({"a": a, "b": b}))
        return 0
    name_a, name_b = os.path.basename(storage.expand(args.a)), os.path.basename(storage.expand(args.b))
    if name_a == name_b:
        name_a, name_b = "A", "B"
    print(render_compare(a, b, name_a, name_b), end="")
    return 0
