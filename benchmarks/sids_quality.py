"""SID quality: balanced vs plain residual k-means on one data set's item text embeddings.

Runs, through the real CLI, ``embed`` once and ``sids build`` twice on the same embeddings
(``sids.balance=balanced`` and ``none``), then ``sids compare``; prints the comparison table
and one JSON line with the checks of issue 3 (balanced: normalized entropy >= 0.99 on every
layer; full-tuple collision rate below plain's).

Usage::

    python benchmarks/sids_quality.py --out /tmp/sidq/ml                          # embedded ml-latest-small
    python benchmarks/sids_quality.py --out /tmp/sidq/beauty data.path=../shared/data/amazon/beauty data.format=amazon
"""

import argparse
import contextlib
import io
import json
import os
import shlex
import sys
import time
from typing import List

from sidvid_rec.cli import main as cli_main
from sidvid_rec.semantic_ids import load_report


def run(argv: List[str]) -> float:
    """Runs one CLI command (echoed), returns its wall time; exits on failure."""
    print("$ sidvid-rec " + " ".join(shlex.quote(a) for a in argv), flush=True)
    start = time.perf_counter()
    rc = cli_main(argv)
    if rc != 0:
        sys.exit(rc)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="work directory (embeddings + both builds)")
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="extra section.key=value (e.g. data.path=...)")
    args = parser.parse_args()

    common = [f"sids.encoder={args.encoder}", f"sids.codebook_size={args.k}", f"sids.layers={args.layers}"]
    common += args.overrides
    emb = os.path.join(args.out, "embeddings")
    times = {"embed": run(["embed", "--out", emb, "--no-progress"] + common)}
    for balance in ("none", "balanced"):
        with contextlib.redirect_stdout(io.StringIO()):  # the compare below shows both
            times[balance] = run(["sids", "build", "--out", os.path.join(args.out, balance), "--embeddings", emb,
                                  "--no-progress"] + common + [f"sids.balance={balance}"])
    run(["sids", "compare", os.path.join(args.out, "none"), os.path.join(args.out, "balanced")])
    plain, balanced = (load_report(os.path.join(args.out, b)) for b in ("none", "balanced"))
    print(json.dumps({
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "balanced_entropy": [round(r["entropy"], 4) for r in balanced["layers"]],
        "plain_entropy": [round(r["entropy"], 4) for r in plain["layers"]],
        "balanced_collision_rate": round(balanced["collision_rate"], 4),
        "plain_collision_rate": round(plain["collision_rate"], 4),
        "entropy_ok": all(r["entropy"] >= 0.99 for r in balanced["layers"]),
        "collision_lower": balanced["collision_rate"] < plain["collision_rate"],
    }))


if __name__ == "__main__":
    main()
