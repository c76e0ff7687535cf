"""SID quality: RQ-VAE vs balanced RQ-KMeans on one data set's item text embeddings.

Runs, through the real CLI, ``sids build`` twice on the same embeddings (``sids.method=rqkmeans``
with ``sids.balance=balanced``, and ``sids.method=rqvae``), then ``sids compare``; prints the
comparison table and one JSON line with build times and the headline figures. The embeddings
come from ``sidvid-rec embed`` (``--embeddings``), or are computed first when ``--embeddings`` is
not given.

Usage::

    python benchmarks/sids_rqvae.py --out /tmp/rqvae_bench/ml --embeddings /tmp/rqvae_bench/ml/embeddings \\
        sids.threads=1
"""

import argparse
import contextlib
import io
import json
import os
import sys

from sidvid_rec.semantic_ids import load_report, load_sid_artifacts

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: the sibling below
from sids_quality import run  # noqa: E402  (one echo-and-time helper for both SID benchmarks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="work directory (both builds; embeddings unless given)")
    parser.add_argument("--embeddings", default=None, help="an `sidvid-rec embed` output to reuse")
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="extra section.key=value (e.g. data.path=...)")
    args = parser.parse_args()

    common = [f"sids.encoder={args.encoder}", f"sids.codebook_size={args.k}", f"sids.layers={args.layers}"]
    common += args.overrides
    times = {}
    emb = args.embeddings
    if emb is None:
        emb = os.path.join(args.out, "embeddings")
        times["embed"] = run(["embed", "--out", emb, "--no-progress"] + common)
    builds = {"rqkmeans": ["sids.method=rqkmeans", "sids.balance=balanced"], "rqvae": ["sids.method=rqvae"]}
    for name, extra in builds.items():
        with contextlib.redirect_stdout(io.StringIO()):  # the compare below shows both
            times[name] = run(["sids", "build", "--out", os.path.join(args.out, name), "--embeddings", emb,
                               "--no-progress"] + common + extra)
    run(["sids", "compare", os.path.join(args.out, "rqkmeans"), os.path.join(args.out, "rqvae")])
    reports = {name: load_report(os.path.join(args.out, name)) for name in builds}
    vae_stats = load_sid_artifacts(os.path.join(args.out, "rqvae")).manifest["rqvae_stats"]
    print(json.dumps({
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "rqvae_epochs_run": vae_stats["epochs_run"], "rqvae_best_epoch": vae_stats["best_epoch"],
        "rqvae_restarts_total": vae_stats["restarts_total"],
        **{f"{name}_{key}": [round(r[key], 6) for r in rep["layers"]]
           for name, rep in reports.items() for key in ("utilization", "entropy", "mse", "cosine")},
        **{f"{name}_collision_rate": round(rep["collision_rate"], 4) for name, rep in reports.items()},
        **{f"{name}_unique_sids": rep["unique_sids"] for name, rep in reports.items()},
        **{f"{name}_max_items_per_sid": rep["max_items_per_sid"] for name, rep in reports.items()},
    }))


if __name__ == "__main__":
    main()
