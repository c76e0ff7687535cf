"""COBRA vs the ID and sid_id baselines: one table per data set, plus a VID-negatives study.

Every row is trained through the ``sidvid-rec`` CLI with the same data, protocol and epoch
budget; every COBRA run is then evaluated with each decoder (``sidvid-rec evaluate --decoder``).
Runs execute one at a time (the machine is shared) and are skipped when their
``metrics.json`` already exists, so the script can be interrupted and restarted.

Usage::

    python benchmarks/cobra_table.py --dataset ml-100k --out runs/cobra_bench --epochs 15
    python benchmarks/cobra_table.py --dataset amazon-beauty --out runs/cobra_bench --epochs 10 --study
    python benchmarks/cobra_table.py --dataset ml-100k --out runs/cobra_bench --report   # tables only

Options after ``--set`` are overrides applied to every run (e.g. ``--set data.max_len=50``).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

DECODERS: List[Tuple[str, List[str]]] = [("direct", []), ("neighbor", []), ("soft", []), ("beam", []),
                                         # the beam setting chosen on Beauty's validation split
                                         ("beam a0.3 x10", ["eval.alpha=0.3", "eval.beam_size=10"])]
POOLS = ["in_batch", "in_batch_global", "queue"]
SHARED = os.environ.get("SIDVID_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))

DATASETS: Dict[str, Dict[str, str]] = {
    "ml-100k": {"dir": "configs/ml-100k", "path": os.path.join(SHARED, "movielens", "ml-100k"), "split": "test"},
    "amazon-beauty": {"dir": "configs/amazon-beauty", "path": os.path.join(SHARED, "amazon", "beauty"),
                      "split": "test"},
}
PINNED: Dict[str, List[str]] = {
    # The settings of the recorded rows, from before configs/amazon-beauty/cobra.yaml shipped the
    # study's choice (exact SID and VID softmaxes, beam a0.3 x20): sampled SID softmax, soft / beam 5 x 0.5.
    "amazon-beauty": ["loss.sid_softmax=auto", "eval.decoder=soft", "eval.beam_size=5", "eval.alpha=0.5"],
}
Run = Tuple[str, str, List[str]]
"""(row name, config file name in the data set's config dir, overrides)."""
SHARED_SIDS = ["model.sid_dedup=false", "model.cobra_sid_dropout=0"]
"""The first COBRA rows: SIDs are code tuples only (items may share one), no SID-token dropout."""


def table_runs() -> List[Run]:
    """The main table: the two baselines with their reference config (hstu.yaml), then COBRA
    (cobra.yaml) under each VID negative pool."""
    # the recorded rows' loss: 128 uniform negatives (Beauty's hstu.yaml now ships the exact softmax)
    runs: List[Run] = [("id", "hstu.yaml", ["model.mode=id", "loss.negatives=uniform"]),
                       ("sid_id", "hstu.yaml", ["model.mode=sid_id", "loss.negatives=uniform"])]
    # SIDs without the disambiguation code (items sharing a code tuple share a SID) ...
    runs += [(f"cobra-{pool}", "cobra.yaml", [f"loss.vid_negatives={pool}", *SHARED_SIDS]) for pool in POOLS]
    # Small batches (8x the optimizer steps per epoch): COBRA's pools no longer need big batches
    # for negatives; the ID baseline gets the same batch size, so the comparison stays fair.
    runs += [("id-b16", "hstu.yaml", ["model.mode=id", "loss.negatives=uniform", "train.batch_size=16"]),
             ("cobra-in_batch_global-b16", "cobra.yaml", ["loss.vid_negatives=in_batch_global",
                                                          "train.batch_size=16", *SHARED_SIDS]),
             ("cobra-in_batch_global-b16-text", "cobra.yaml", ["loss.vid_negatives=in_batch_global",
                                                               "train.batch_size=16", "model.text_projection=true",
                                                               *SHARED_SIDS])]
    # ... and with it (every item's SID unique, as TIGER's): at the configs' batch size, 64, 32 and 16.
    for suffix, batch in (("", []), ("-b64", ["train.batch_size=64"]), ("-b32", ["train.batch_size=32"]),
                          ("-b16", ["train.batch_size=16"])):
        runs += [(f"cobra-dedup-{pool}{suffix}", "cobra.yaml",
                  [f"loss.vid_negatives={pool}", "model.sid_dedup=true", "model.cobra_sid_dropout=0"] + batch)
                 for pool in POOLS]
    # ... plus SID-token dropout (the VID query also learns from the history alone).
    runs += [(f"cobra-dedup-sd0.3-{pool}", "cobra.yaml", [f"loss.vid_negatives={pool}", "model.sid_dedup=true",
                                                          "model.cobra_sid_dropout=0.3"]) for pool in POOLS]
    return runs


def study_runs() -> List[Run]:
    """VID negatives: in-batch at several batch sizes vs pools whose size does not depend on it
    (global negatives and the memory queue, at the smallest batch size)."""
    # The whole batch (the in-batch count follows the batch size); SIDs without the disambiguation code.
    every = ["loss.vid_max_in_batch=0", *SHARED_SIDS]
    runs: List[Run] = [(f"study-in_batch-b{b}", "cobra.yaml", ["loss.vid_negatives=in_batch", *every,
                                                              f"train.batch_size={b}"]) for b in (16, 32, 64)]
    runs += [("study-global-r2048-b16", "cobra.yaml", ["loss.vid_negatives=in_batch_global", *every,
                                                       "loss.vid_num_negatives=2048", "train.batch_size=16"]),
             ("study-queue-q8192-b16", "cobra.yaml", ["loss.vid_negatives=queue", *every, "loss.queue_size=8192",
                                                      "train.batch_size=16"])]
    return runs


def sidvid(args: List[str], log: str) -> float:
    """Runs ``python -m sidvid_rec ARGS`` with output appended to ``log``; returns wall seconds."""
    start = time.time()
    with open(log, "a") as f:
        f.write(f"$ sidvid-rec {' '.join(args)}\n")
        f.flush()
        rc = subprocess.call([sys.executable, "-m", "sidvid_rec"] + args, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"sidvid-rec {args[0]} failed (rc={rc}); see {log}")
    return time.time() - start


def ensure_sids(spec: Dict[str, str], out: str, common: List[str]) -> str:
    """The SIDs of cobra.yaml (``sids.*``), built once under ``out/sids``; sid_id uses them too."""
    sids = os.path.join(out, "sids")
    if not os.path.exists(os.path.join(sids, "manifest.json")):
        sidvid(["sids", "build", "--out", sids, "--no-progress", "--config", os.path.join(spec["dir"], "cobra.yaml")]
               + common, os.path.join(out, "sids.log"))
    return sids


def run_one(name: str, config: str, overrides: List[str], spec: Dict[str, str], out: str, common: List[str],
            decode: bool) -> Dict[str, object]:
    """Trains one row (unless done) and evaluates its decoders; returns its record."""
    run_dir = os.path.join(out, name)
    log = os.path.join(out, f"{name}.log")
    record_path = os.path.join(run_dir, "bench.json")
    if os.path.exists(record_path):
        return json.load(open(record_path))
    metrics_path = os.path.join(run_dir, "metrics.json")
    if os.path.exists(metrics_path):  # trained, interrupted while evaluating: time from the run's files
        train_s = os.path.getmtime(os.path.join(run_dir, "history.json")) - os.path.getmtime(
            os.path.join(run_dir, "config.yaml"))
    else:
        train_s = sidvid(["train", "--config", config, "--run-dir", run_dir] + common + overrides, log)
    record: Dict[str, object] = {"name": name, "overrides": overrides, "train_s": round(train_s, 1), "metrics": {}}
    split = spec["split"]
    metrics = json.load(open(metrics_path))
    if not decode:
        record["metrics"]["-"] = metrics[split]
    for label, settings in DECODERS if decode else []:
        sidvid(["evaluate", run_dir, "--split", split, "--decoder", label.split()[0]] + settings, log)
        record["metrics"][label] = json.load(open(os.path.join(run_dir, "metrics.json")))[split]
    record["best_epoch"] = metrics.get("best_epoch")
    json.dump(record, open(record_path, "w"), indent=1)
    return record


def markdown(records: List[Dict[str, object]], baseline: Optional[float]) -> str:
    lines = ["| run | decoder | HR@10 | NDCG@10 | HR@50 | MRR | vs ID HR@10 | best epoch | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        for decoder, m in r["metrics"].items():
            ratio = f"{m['hr@10'] / baseline:.2f}x" if baseline else "-"
            lines.append(f"| {r['name']} | {decoder} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} | {m.get('hr@50', float('nan')):.4f} "
                         f"| {m['mrr']:.4f} | {ratio} | {r.get('best_epoch')} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--out", required=True, help="root directory of the runs")
    parser.add_argument("--epochs", type=int, default=10, help="epoch budget of every row")
    parser.add_argument("--study", action="store_true", help="also run the VID-negatives study")
    parser.add_argument("--only", nargs="*", default=None, help="run only these row names")
    parser.add_argument("--report", action="store_true", help="print the tables of finished runs, train nothing")
    parser.add_argument("--set", nargs="*", default=[], metavar="section.key=value", help="overrides for every run")
    args = parser.parse_args()
    spec = DATASETS[args.dataset]
    out = os.path.abspath(os.path.join(args.out, args.dataset))
    os.makedirs(out, exist_ok=True)
    common = [f"data.path={spec['path']}", f"train.epochs={args.epochs}"] + PINNED.get(args.dataset, []) + list(args.set)
    runs = table_runs() + (study_runs() if args.study else [])
    if args.only is not None:
        runs = [r for r in runs if r[0] in args.only]
    records = []
    for name, config_name, overrides in runs:
        if args.report:
            path = os.path.join(out, name, "bench.json")
            if os.path.exists(path):
                records.append(json.load(open(path)))
            continue
        sids = ensure_sids(spec, out, common)
        records.append(run_one(name, os.path.join(spec["dir"], config_name), overrides + [f"sids.dir={sids}"], spec,
                               out, common, decode=name.startswith("cobra")))
        print(f"done {name}", flush=True)
    base = next((r["metrics"]["-"]["hr@10"] for r in records if r["name"] == "id"), None)
    main_rows = [r for r in records if not r["name"].startswith("study")]
    study = [r for r in records if r["name"].startswith("study")]
    print(f"## {args.dataset} ({spec['split']} split, {args.epochs} epochs, overrides: {' '.join(args.set) or 'none'})\n")
    print(markdown(main_rows, base))
    if study:
        print("\n### VID negatives study\n")
        print(markdown(study, base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
