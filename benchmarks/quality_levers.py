"""Training-recipe levers of the HSTU ``id`` model on one data set, at one short epoch budget.

Every row trains ``configs/<dataset>/hstu.yaml`` through the ``sidvid-rec`` CLI with the same
data, protocol, seed and epoch budget, changing one lever (or a named combination). The rows
are compared on the VALIDATION split only (NDCG@10 of the best-validation epoch); the test
split is reported for the baseline and for the row that validation chooses, nothing else, so
the choice never sees test. Runs execute one at a time and are skipped when their
``metrics.json`` already exists, so the script can be interrupted and restarted.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/quality_levers.py --dataset amazon-beauty --out runs/levers --epochs 5
    python benchmarks/quality_levers.py --dataset amazon-beauty --out runs/levers --epochs 5 --report
    python benchmarks/quality_levers.py ... --only baseline all --seed 43   # a second seed

Options after ``--set`` are overrides applied to every run.
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

SHARED = os.environ.get("SIDVID_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
DATASETS: Dict[str, Dict[str, str]] = {
    "amazon-beauty": {"config": "configs/amazon-beauty/hstu.yaml", "path": os.path.join(SHARED, "amazon", "beauty")},
    "ml-100k": {"config": "configs/ml-100k/hstu.yaml", "path": os.path.join(SHARED, "movielens", "ml-100k")},
}
Row = Tuple[str, List[str]]
"""(row name, overrides of the data set's hstu.yaml)."""

ROWS: List[Row] = [
    ("baseline", ["loss.negatives=uniform"]),  # 128 uniform negatives, constant lr (hstu.yaml before the study)
    ("all", ["loss.negatives=all"]),  # exact softmax over every item
    ("r256", ["loss.num_negatives=256"]),
    ("cosine", ["train.lr_schedule=cosine", "train.warmup_steps=100"]),
    ("mixed", ["loss.negatives=mixed", "loss.num_negatives=128"]),  # in-batch + 128 uniform, logQ
    ("all-cosine", ["loss.negatives=all", "train.lr_schedule=cosine", "train.warmup_steps=100"]),
    ("all-ls0.1", ["loss.negatives=all", "loss.label_smoothing=0.1"]),
    # the reference recipe (hstu-reference.yaml's two changes): Adam tables at 1e-3, attention / padded length
    ("reference", ["train.embedding_optimizer=adam", "train.embedding_lr=0.001", "model.attention_scale=max_len"]),
]
SELECT = "ndcg@10"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: the sibling below
from cobra_table import sidvid  # noqa: E402  (one CLI runner for the quality benchmarks)


def run_row(name: str, overrides: List[str], config: str, out: str, common: List[str]) -> Dict[str, object]:
    run_dir = os.path.join(out, name)
    bench = os.path.join(run_dir, "bench.json")
    if os.path.exists(bench):
        return json.load(open(bench))
    os.makedirs(run_dir, exist_ok=True)
    args = ["train", "--config", config, "--run-dir", run_dir] + common + overrides
    seconds = sidvid(args, os.path.join(out, f"{name}.log"))
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    history = json.load(open(os.path.join(run_dir, "history.json")))
    record = {"name": name, "overrides": overrides, "command": "sidvid-rec " + " ".join(args), "train_s": seconds,
              "valid": metrics["valid"], "test": metrics["test"], "best_epoch": metrics["best_epoch"],
              "valid_curve": [h.get(f"valid/{SELECT}") for h in history]}
    with open(bench, "w") as f:
        json.dump(record, f, indent=1)
    return record


def markdown(records: List[Dict[str, object]], chosen: Optional[str]) -> str:
    lines = ["| row | overrides | valid HR@10 | valid NDCG@10 | valid NDCG@10 per epoch | best epoch | "
             "test HR@10 | test NDCG@10 | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        v, t = r["valid"], r["test"]
        shown = r["name"] in ("baseline", chosen)  # test is read for the baseline and the chosen row only
        curve = " ".join(f"{x:.4f}" for x in r["valid_curve"] if x is not None)
        test = f"{t['hr@10']:.4f} | {t['ndcg@10']:.4f}" if shown else "- | -"
        name = f"**{r['name']}**" if r["name"] == chosen else r["name"]
        lines.append(f"| {name} | {' '.join(r['overrides']) or '-'} | {v['hr@10']:.4f} | {v['ndcg@10']:.4f} | "
                     f"{curve} | {r['best_epoch']} | {test} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def across_seeds(by_seed: Dict[int, List[Dict[str, object]]]) -> str:
    """Rows finished under every seed: mean and spread (max - min) of validation NDCG@10 and HR@10;
    the row with the best mean validation NDCG@10 is chosen, and test is shown for it and the
    baseline only (means over the seeds)."""
    names = [r["name"] for r in next(iter(by_seed.values()))]
    names = [n for n in names if all(any(r["name"] == n for r in rs) for rs in by_seed.values())]

    def values(name: str, split: str, key: str) -> List[float]:
        return [next(r for r in rs if r["name"] == name)[split][key] for rs in by_seed.values()]

    def stat(xs: List[float]) -> str:
        return f"{sum(xs) / len(xs):.4f} ± {(max(xs) - min(xs)) / 2:.4f}"

    chosen = max(names, key=lambda n: sum(values(n, "valid", SELECT)))
    lines = [f"seeds {', '.join(str(s) for s in by_seed)}; mean ± half the spread; chosen on mean validation "
             f"{SELECT}: {chosen}", "",
             "| row | valid NDCG@10 | valid HR@10 | test NDCG@10 | test HR@10 |", "|---|---|---|---|---|"]
    for n in names:
        test = (f"{stat(values(n, 'test', 'ndcg@10'))} | {stat(values(n, 'test', 'hr@10'))}"
                if n in ("baseline", chosen) else "- | -")
        lines.append(f"| {'**' + n + '**' if n == chosen else n} | {stat(values(n, 'valid', 'ndcg@10'))} | "
                     f"{stat(values(n, 'valid', 'hr@10'))} | {test} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="amazon-beauty")
    parser.add_argument("--out", default="runs/levers")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--seeds", type=int, nargs="*", default=None,
                        help="with --report: aggregate these seeds' finished rows (mean and spread)")
    parser.add_argument("--only", nargs="*", default=None, help="row names to run (default: all)")
    parser.add_argument("--report", action="store_true", help="print the table of finished rows only")
    parser.add_argument("--set", nargs="*", default=[], help="overrides applied to every row")
    args = parser.parse_args(argv)
    spec = DATASETS[args.dataset]
    if args.report and args.seeds:
        by_seed = {}
        for seed in args.seeds:
            root = os.path.abspath(os.path.join(args.out, f"{args.dataset}-e{args.epochs}-s{seed}"))
            by_seed[seed] = [json.load(open(os.path.join(root, n, "bench.json"))) for n, _ in ROWS
                             if os.path.exists(os.path.join(root, n, "bench.json"))]
        print(across_seeds(by_seed))
        return 0
    out = os.path.abspath(os.path.join(args.out, f"{args.dataset}-e{args.epochs}-s{args.seed}"))
    os.makedirs(out, exist_ok=True)
    common = [f"data.path={spec['path']}", f"train.epochs={args.epochs}", f"train.seed={args.seed}",
              "train.patience=1000"] + list(args.set)
    rows = [r for r in ROWS if args.only is None or r[0] in args.only]
    records = []
    for name, overrides in rows:
        if args.report:
            path = os.path.join(out, name, "bench.json")
            if os.path.exists(path):
                records.append(json.load(open(path)))
            continue
        records.append(run_row(name, overrides, spec["config"], out, common))
        print(f"done {name}: valid {SELECT} {records[-1]['valid'][SELECT]:.4f}", flush=True)
    # Choose among every finished row of this output directory, not only this call's rows, so
    # that running one more row never shows its test figures unless validation picks it.
    done = {r["name"] for r in records}
    records += [json.load(open(os.path.join(out, n, "bench.json"))) for n, _ in ROWS
                if n not in done and os.path.exists(os.path.join(out, n, "bench.json"))]
    order = [n for n, _ in ROWS]
    records.sort(key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    chosen = max(records, key=lambda r: r["valid"][SELECT])["name"] if records else None
    print(f"## {args.dataset}, {args.epochs} epochs, seed {args.seed} (chosen on validation {SELECT}: {chosen})\n")
    print(markdown(records, chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
