"""HSTU quality: `id` and `sid_id` modes on ML-100k (protocol gr), ml-latest-small and Amazon Beauty (loo).

Runs (or reuses, when ``RUN_ROOT/<name>/metrics.json`` exists) each training through the
CLI, then prints one Markdown table. Under ``gr`` the learning curve of the test split is
averaged over the last five epochs, as ../shared/REFERENCE.md reports the reference.

    python -m benchmarks.hstu_quality --run-root runs/bench --shared ../shared/data [--epochs 60]
"""

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List

REFERENCE = {  # ../shared/REFERENCE.md (generative-recommenders research HSTU, this machine)
    "ml-100k": {"hr@10": 0.1915, "ndcg@10": 0.1027, "mrr": 0.0919},
}
PUBLISHED_BEAUTY = {"SASRec": 0.0605, "TIGER": 0.0648, "HSTU (genrec re-run)": 0.0708, "COBRA": 0.0725}


def datasets(shared: str) -> Dict[str, Dict[str, object]]:
    return {
        # the recorded rows: 128 uniform negatives (the hstu.yaml configs now ship the exact softmax)
        "ml-100k": {"config": "configs/ml-100k/hstu.yaml",
                    "overrides": [f"data.path={shared}/movielens/ml-100k", "loss.negatives=uniform"], "codebook": 64},
        "ml-latest-small": {"config": "configs/ml-latest-small/hstu.yaml", "overrides": ["loss.negatives=uniform"],
                            "codebook": 128},
        "amazon-beauty": {"config": "configs/amazon-beauty/hstu.yaml",
                          # the recorded rows: 128 uniform negatives (hstu.yaml now ships the exact softmax)
                          "overrides": [f"data.path={shared}/amazon/beauty", "loss.negatives=uniform"],
                          "codebook": 128},
    }


def run(cmd: List[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def ensure_sids(name: str, spec: Dict[str, object], root: str) -> str:
    out = os.path.join(root, f"{name}-sids")
    if not os.path.exists(os.path.join(out, "manifest.json")):
        run(["sidvid-rec", "sids", "build", "--config", spec["config"], "--out", out, *spec["overrides"],
             f"sids.codebook_size={spec['codebook']}"])
    return out


def ensure_run(name: str, mode: str, spec: Dict[str, object], root: str, epochs: int) -> str:
    run_dir = os.path.join(root, f"{name}-{mode}")
    if os.path.exists(os.path.join(run_dir, "metrics.json")):
        return run_dir
    extra = [f"train.epochs={epochs}", f"model.mode={mode}"]
    if mode != "id":
        extra.append(f"sids.dir={ensure_sids(name, spec, root)}")
    run(["sidvid-rec", "train", "--config", spec["config"], "--run-dir", run_dir, *spec["overrides"], *extra])
    return run_dir


def summarize(run_dir: str) -> Dict[str, float]:
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(run_dir, "history.json")) as f:
        history = json.load(f)
    if "valid" in metrics:  # loo: the checkpoint chosen on validation, its test metrics
        return {**metrics["test"], "epoch": metrics["best_epoch"], "how": "best valid NDCG@10"}
    last = [h for h in history if "test/hr@10" in h][-5:]
    mean = {k: sum(h[f"test/{k}"] for h in last) / len(last) for k in ("hr@10", "ndcg@10", "mrr", "hr@50", "hr@200")}
    return {**mean, "epoch": f"{last[0]['epoch']}-{last[-1]['epoch']}", "how": "mean of last 5 epochs"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-root", default="runs/bench")
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--only", nargs="*", default=None, help="data sets to run (default: all)")
    args = parser.parse_args()
    rows = []
    for name, spec in datasets(args.shared).items():
        if args.only and name not in args.only:
            continue
        for mode in ("id", "sid_id"):
            s = summarize(ensure_run(name, mode, spec, args.run_root, args.epochs))
            rows.append((name, mode, s))
    print("| data | mode | HR@10 | NDCG@10 | MRR | HR@50 | HR@200 | epochs | selection |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, mode, s in rows:
        print(f"| {name} | {mode} | {s['hr@10']:.4f} | {s['ndcg@10']:.4f} | {s['mrr']:.4f} | {s['hr@50']:.4f} "
              f"| {s['hr@200']:.4f} | {s['epoch']} | {s['how']} |")
    for name, ref in REFERENCE.items():
        print(f"| {name} | reference HSTU | {ref['hr@10']:.4f} | {ref['ndcg@10']:.4f} | {ref['mrr']:.4f} | | | 55-59 | mean |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
