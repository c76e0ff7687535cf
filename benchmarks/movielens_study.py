"""The recipe study on ML-100k (``gr``) and ml-latest-small (``loo``): choose on validation, test once.

The same discipline as ``benchmarks/sota_study.py`` (Amazon Beauty) for the two MovieLens sets:
every row of :data:`ROWS` trains under a split with a validation set, the row with the best
validation NDCG@10 is chosen, and only the chosen row's test figures are reported, as the mean and
standard deviation over seeds.

- **ml-latest-small** (``loo``): validation = each user's second-to-last item, test = the last;
  the checkpoint with the best validation NDCG@10 (early stopping), its test metrics.
- **ML-100k** (``gr``): the reference's protocol has no validation split (train = all but the last
  item, test = the last, the test curve averaged over the last 5 epochs). The rows are compared
  under ``loo`` instead, whose validation target is the **last item of each ``gr`` training
  history** (a split carved from the training histories; the ``gr`` test item is never seen),
  by the mean validation NDCG@10 of the last 5 epochs. The chosen row is then trained under
  ``gr`` and its test read by the reference's rule.

Runs are skipped when their ``bench.json`` exists, so calls can be interrupted and repeated.

Usage::

    OMP_NUM_THREADS=1 SIDVID_SHARED_DATA=../shared/data python benchmarks/movielens_study.py \
        --out runs/movielens --dataset ml-100k --seeds 42 43 44
    python benchmarks/movielens_study.py --out runs/movielens --report --record benchmarks/RESULTS.md
"""

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "benchmarks"), REPO]  # run as a script: the siblings below, and sidvid_rec
from cobra_table import sidvid  # noqa: E402  (one CLI runner)
from common import add_report_args, emit_report, shared_data_root  # noqa: E402

SELECT = "ndcg@10"
ROWS: List[Tuple[str, List[str]]] = [
    ("id", ["model.mode=id", "loss.negatives=uniform"]),  # the recipe before the study (128 uniform negatives)
    ("id-all", ["model.mode=id", "loss.negatives=all"]),  # the exact softmax over every item
]
"""(row name, overrides of the data set's ``hstu.yaml``)."""
DATASETS: Dict[str, Dict[str, object]] = {
    "ml-100k": {"config": "configs/ml-100k/hstu.yaml", "path": "movielens/ml-100k", "protocol": "gr",
                "settings": ["train.epochs=40"]},
    "ml-latest-small": {"config": "configs/ml-latest-small/hstu.yaml", "path": "", "protocol": "loo",
                        "settings": ["train.epochs=60", "train.patience=10"]},
}
"""Each data set's config, data path (under the shared data root; empty = the embedded data),
protocol of its published figure, and the budget of every row (that of the figure it must beat)."""
PUBLISHED = {"ml-100k": ("`id` as shipped before (128 uniform negatives), mean of epochs 36-40", 0.2045, 0.1074),
             "ml-latest-small": ("`id` as shipped before (128 uniform negatives), best validation", 0.0902, 0.0477)}
"""Today's figures the shipped configs must beat (benchmarks/RESULTS.md, "HSTU quality")."""


def last_five(history: List[Dict[str, float]], split: str) -> Dict[str, float]:
    """Mean of the last 5 evaluated epochs' ``split`` metrics (the reference's rule)."""
    rows = [h for h in history if f"{split}/{SELECT}" in h][-5:]
    return {k: statistics.mean(h[f"{split}/{k}"] for h in rows) for k in ("hr@10", SELECT)}


def run(name: str, dataset: str, protocol: str, seed: int, out: str) -> Dict[str, object]:
    """One row at one seed under ``protocol``; its record (cached in ``bench.json``)."""
    spec = DATASETS[dataset]
    run_dir = os.path.join(out, dataset, f"{protocol}-s{seed}", name)
    bench = os.path.join(run_dir, "bench.json")
    if os.path.exists(bench):
        return json.load(open(bench))
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(shared_data_root(), str(spec["path"])) if spec["path"] else ""
    args = (["train", "--config", str(spec["config"]), "--run-dir", run_dir, "train.resume=true",
             f"data.path={path}", f"data.protocol={protocol}", f"train.seed={seed}", "train.device=cpu"]
            + list(spec["settings"]) + dict(ROWS)[name])
    seconds = sidvid(args, os.path.join(run_dir, "train.log"))
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    history = json.load(open(os.path.join(run_dir, "history.json")))
    record: Dict[str, object] = {"name": name, "command": "sidvid-rec " + " ".join(args), "train_s": round(seconds, 1),
                                 "epochs_run": len(history), "s_per_epoch": round(seconds / max(len(history), 1), 1)}
    if protocol == "gr":  # no checkpoint choice: the reference's mean of the last 5 epochs
        record.update(test=last_five(history, "test"), best_epoch=f"{len(history) - 4}-{len(history)}")
    else:
        record.update(valid=metrics["valid"], test=metrics["test"], best_epoch=metrics["best_epoch"],
                      valid_last5=last_five(history, "valid"))
    with open(bench, "w") as f:
        json.dump(record, f, indent=1)
    return record


def selection_score(record: Dict[str, object], dataset: str) -> float:
    """What a row is chosen by: best-checkpoint validation (``loo``), or the last-5-epoch validation
    mean under ``loo`` for a ``gr`` data set (whose runs have no checkpoint choice)."""
    if DATASETS[dataset]["protocol"] == "gr":
        return float(record["valid_last5"][SELECT])  # type: ignore[index]
    return float(record["valid"][SELECT])  # type: ignore[index]


def study(dataset: str, seeds: List[int], out: str) -> str:
    """Selection runs (first seed), the chosen row over every seed; returns the chosen row's name."""
    selection = {name: run(name, dataset, "loo", seeds[0], out) for name, _ in ROWS}
    chosen = max(selection, key=lambda name: selection_score(selection[name], dataset))
    print(f"{dataset}: chosen {chosen} on validation "
          + ", ".join(f"{n} {selection_score(r, dataset):.4f}" for n, r in selection.items()), flush=True)
    protocol = str(DATASETS[dataset]["protocol"])
    for seed in seeds:
        run(chosen, dataset, protocol, seed, out)
    return chosen


def report(out: str, seeds: List[int]) -> str:
    lines = []
    for dataset, spec in DATASETS.items():
        protocol = str(spec["protocol"])
        selection = {n: json.load(open(p)) for n, _ in ROWS
                     if os.path.exists(p := os.path.join(out, dataset, f"loo-s{seeds[0]}", n, "bench.json"))}
        if not selection:
            continue
        chosen = max(selection, key=lambda n: selection_score(selection[n], dataset))
        tests = [json.load(open(p))["test"] for s in seeds
                 if os.path.exists(p := os.path.join(out, dataset, f"{protocol}-s{s}", chosen, "bench.json"))]
        rule = "mean valid NDCG@10 of the last 5 epochs" if protocol == "gr" else "best-checkpoint valid NDCG@10"
        lines += [f"**{dataset}** (`{spec['config']}`, test under `{protocol}`; rows chosen by {rule} under "
                  f"`loo`, seed {seeds[0]}):", "",
                  "| row | valid NDCG@10 (selection) | chosen | test HR@10 | test NDCG@10 | seeds | s/epoch |",
                  "|---|---|---|---|---|---|---|"]
        for name, record in selection.items():
            stat = "-", "-", "-"
            if name == chosen and tests:
                stat = (_mean_std([t["hr@10"] for t in tests]), _mean_std([t[SELECT] for t in tests]), str(len(tests)))
            lines.append(f"| {name} | {selection_score(record, dataset):.4f} | {'yes' if name == chosen else ''} | "
                         f"{stat[0]} | {stat[1]} | {stat[2]} | {record['s_per_epoch']} |")
        label, hr, ndcg = PUBLISHED[dataset]
        lines += [f"| today's figure: {label} | - | - | {hr:.4f} | {ndcg:.4f} | 1 | - |", ""]
    return "\n".join(lines)


def _mean_std(xs: List[float]) -> str:
    return f"{xs[0]:.4f}" if len(xs) == 1 else f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/movielens")
    parser.add_argument("--dataset", choices=sorted(DATASETS), nargs="*", default=sorted(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    add_report_args(parser, "movielens")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    if args.report:
        emit_report(report(out, args.seeds), args.record, "movielens")
        return 0
    for dataset in args.dataset:
        study(dataset, args.seeds, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
