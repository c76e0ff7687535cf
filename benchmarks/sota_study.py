"""The long-budget study on Amazon Beauty: the validation-chosen recipe, several seeds, test once.

``benchmarks/quality_levers.py`` sweeps the recipe levers at a short budget and chooses on the
VALIDATION split; this script trains the chosen setting of each model at the full budget under
several seeds and reports the test metrics of each run's best-validation checkpoint as the mean
and standard deviation over the seeds, beside the published rows (same data, leave-one-out
split, full ranking). Test is read once per chosen setting and seed, and never used to choose.
Runs execute one at a time per call and are skipped when their ``bench.json`` exists, so several
calls (one per seed) can share the machine and the study can be interrupted and restarted.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/sota_study.py --out runs/sota --seed 42 --only sid_id-all
    python benchmarks/sota_study.py --out runs/sota --report --seeds 42 43 44
"""

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "benchmarks"), REPO]  # run as a script: the siblings below, and sidvid_rec
from cobra_table import DATASETS, ensure_sids, sidvid  # noqa: E402  (one CLI runner, one SID build)
from common import add_report_args, emit_report  # noqa: E402  (benchmarks/common.py, a sibling)

Row = Tuple[str, str, List[str], List[str]]
"""(row name, config file in configs/amazon-beauty, overrides, ``sids.*`` overrides of its SID build)."""
K256 = ["sids.codebook_size=256"]  # TIGER's codebook size: 12,101 items -> 10,601 code tuples, <= 12 per tuple
D128 = ["model.dim=128", "model.dqk=128", "model.dv=128"]  # the width validation chose for sid_id (d=128 vs 64)
SID_GEN = (["eval.ks=[1,5,10]"]  # the beam is max(eval.ks) wide: width 200 (for HR@200) costs 16x width 10
           # what sid_gen.yaml was when the first rows ran (it now ships the chosen row): each row adds its levers
           + ["model.dim=64", "model.dqk=64", "model.dv=64"]
           + [f"model.sid_gen_{flag}=false" for flag in ("item_ids", "prefix_inputs", "item_output", "node_output")])
SID_ID_D128 = ["model.mode=sid_id", "loss.negatives=all"] + D128
SID_GEN_ITEMOUT = SID_GEN + ["model.sid_gen_item_ids=true", "model.sid_gen_item_output=true"]
SID_GEN_NODEOUT = SID_GEN_ITEMOUT + ["model.sid_gen_node_output=true"]
"""The shipped sid_id.yaml and sid_gen.yaml rows, shared by their RQ-VAE variants at the end of ROWS."""
ROWS: List[Row] = [
    # the lever validation chose at the short budget (quality_levers.py, seeds 42 and 43): the exact softmax
    ("id-all", "hstu.yaml", ["model.mode=id", "loss.negatives=all"], []),
    ("sid_id-all", "hstu.yaml", ["model.mode=sid_id", "loss.negatives=all"], []),
    ("id", "hstu.yaml", ["model.mode=id", "loss.negatives=uniform"], []),  # the recipe before the study
    # COBRA as shipped (sampled SID softmax, in-batch + 128 global VID negatives), and with both losses exact
    ("cobra", "cobra.yaml", [], []),
    ("cobra-all", "cobra.yaml", ["loss.vid_negatives=all", "loss.sid_softmax=full"], []),
    # on top of the exact softmax: warm-up + cosine decay over the 40 epochs; a wider model
    ("sid_id-all-cosine", "hstu.yaml", ["model.mode=sid_id", "loss.negatives=all", "train.lr_schedule=cosine",
                                        "train.warmup_steps=100"], []),
    ("sid_id-all-d128", "hstu.yaml", SID_ID_D128, []),
    ("sid_id-all-len50", "hstu.yaml", ["model.mode=sid_id", "loss.negatives=all", "data.max_len=50"], []),
    # sid_gen: SIDs of 3 x 32 (cobra.yaml's) vs 3 x 256 codes, dropout, lr; chosen on validation
    ("sid_gen-k32", "sid_gen.yaml", SID_GEN, []),
    ("sid_gen-k256", "sid_gen.yaml", SID_GEN, K256),
    ("sid_gen-k256-d0.2", "sid_gen.yaml", SID_GEN + ["model.dropout=0.2"], K256),
    ("sid_gen-k256-d0.2-lr3e-3", "sid_gen.yaml", SID_GEN + ["model.dropout=0.2", "train.lr=0.003"], K256),
    # ... with each complete history item's ID row on its last code token (model.sid_gen_item_ids)
    ("sid_gen-k256-ids", "sid_gen.yaml", SID_GEN + ["model.sid_gen_item_ids=true"], K256),
    ("sid_gen-k256-ids-d0.2", "sid_gen.yaml", SID_GEN + ["model.sid_gen_item_ids=true", "model.dropout=0.2"], K256),
    # ... and the last level scored by the items its codes complete (model.sid_gen_item_output)
    ("sid_gen-k256-ids-itemout", "sid_gen.yaml", SID_GEN_ITEMOUT, K256),
    # ... and every level scored by trie node: a prefix's output vector = its code's + its items' mean ID row
    ("sid_gen-k256-ids-nodeout", "sid_gen.yaml", SID_GEN_NODEOUT, K256),
    ("sid_gen-k256-ids-nodeout-d128", "sid_gen.yaml", SID_GEN_NODEOUT + D128, K256),
    # ... with each code token's input the sum of its item's codes so far (model.sid_gen_prefix_inputs)
    ("sid_gen-k256-prefix", "sid_gen.yaml", SID_GEN + ["model.sid_gen_prefix_inputs=true"], K256),
    ("sid_gen-k256-prefix-ids", "sid_gen.yaml", SID_GEN + ["model.sid_gen_prefix_inputs=true",
                                                         "model.sid_gen_item_ids=true"], K256),
    ("sid_gen-k256-prefix-ids-d0.2", "sid_gen.yaml", SID_GEN + ["model.sid_gen_prefix_inputs=true",
                                                              "model.sid_gen_item_ids=true", "model.dropout=0.2"], K256),
    # the shipped sid_gen and sid_id rows on RQ-VAE SIDs (sids.method=rqvae) instead of balanced RQ-KMeans:
    # the downstream half of "RQ-VAE vs RQ-KMeans" (RQ-VAE: Beauty's code-tuple collisions 29% -> 18% at K=128)
    ("sid_gen-k256-ids-itemout-rqvae", "sid_gen.yaml", SID_GEN_ITEMOUT, K256 + ["sids.method=rqvae"]),
    ("sid_id-all-d128-rqvae", "hstu.yaml", SID_ID_D128, ["sids.method=rqvae"]),
    ("sid_id-all-rqvae", "hstu.yaml", ["model.mode=sid_id", "loss.negatives=all"], ["sids.method=rqvae"]),
    # ... and sid_gen at sid_id's chosen width on those SIDs (the candidate for TIGER's floor)
    ("sid_gen-k256-ids-itemout-d128-rqvae", "sid_gen.yaml", SID_GEN_ITEMOUT + D128, K256 + ["sids.method=rqvae"]),
    ("sid_gen-k256-ids-nodeout-rqvae", "sid_gen.yaml", SID_GEN_NODEOUT, K256 + ["sids.method=rqvae"]),
]
PUBLISHED = [  # Amazon 2014 Beauty, leave-one-out, full ranking: R@10, N@10, source
    ("SASRec + LiGR + sampled softmax (eSASRec)", 0.0928, 0.0523, "blondered/transformer_benchmark"),
    ("SASRec + sampled softmax", 0.0921, 0.0531, "blondered/transformer_benchmark"),
    ("BARGE", 0.0927, 0.0547, "arXiv 2607.21028"),
    ("CBiT", 0.0905, 0.0537, "as reported in transformer_benchmark"),
    ("TIGER", 0.0648, 0.0384, "Rajput et al. 2023"),
]
SELECT = "ndcg@10"
STUDY_SETTINGS = ["train.epochs=40", "train.patience=10"]
"""The budget and selection rule of every row (``--epochs`` / ``--patience`` defaults; the seed is the default 42)."""
COBRA_DECODERS: List[Tuple[str, List[str]]] = [
    ("soft", ["eval.decoder=soft"]),  # cobra.yaml's eval.decoder: the one training validated each epoch
    ("beam a0.3 x10", ["eval.decoder=beam", "eval.alpha=0.3", "eval.beam_size=10"]),
    ("beam a0.3 x20", ["eval.decoder=beam", "eval.alpha=0.3", "eval.beam_size=20"]),
]
"""COBRA decoder settings, chosen per run on its validation split; test is read for the chosen one."""
SID_GEN_BEAMS: List[Tuple[str, List[str]]] = [
    ("beam 10", ["eval.sid_gen_beam=0"]),  # width max(eval.ks) = 10: what training validated each epoch
    ("beam 30", ["eval.sid_gen_beam=30"]),
]
"""sid_gen beam widths, chosen the same way (a wider beam ranks the top 10 more exactly)."""


def run_row(name: str, config: str, overrides: List[str], out: str, common: List[str]) -> Dict[str, object]:
    run_dir = os.path.join(out, name)
    bench = os.path.join(run_dir, "bench.json")
    if os.path.exists(bench):
        record = json.load(open(bench))
        if "decoder" not in record and decoding_settings(config):  # trained before the choice existed
            record.update(choose_decoder(run_dir, os.path.join(out, f"{name}.log"), decoding_settings(config)))
            with open(bench, "w") as f:
                json.dump(record, f, indent=1)
        return record
    os.makedirs(run_dir, exist_ok=True)
    args = ["train", "--config", config, "--run-dir", run_dir, "train.resume=true"] + common + overrides
    seconds = sidvid(args, os.path.join(out, f"{name}.log"))
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    history = json.load(open(os.path.join(run_dir, "history.json")))
    epochs = len(history)
    record = {"name": name, "overrides": overrides, "command": "sidvid-rec " + " ".join(args),
              "train_s": round(seconds, 1), "epochs_run": epochs, "s_per_epoch": round(seconds / max(epochs, 1), 1),
              "valid": metrics["valid"], "test": metrics["test"], "best_epoch": metrics["best_epoch"],
              "valid_curve": [h.get(f"valid/{SELECT}") for h in history]}
    if decoding_settings(config):
        record.update(choose_decoder(run_dir, os.path.join(out, f"{name}.log"), decoding_settings(config)))
    with open(bench, "w") as f:
        json.dump(record, f, indent=1)
    return record


def decoding_settings(config: str) -> List[Tuple[str, List[str]]]:
    """The decoding settings a row chooses among on validation (none for full-ranking models)."""
    return COBRA_DECODERS if config.endswith("cobra.yaml") else SID_GEN_BEAMS if config.endswith("sid_gen.yaml") else []


def choose_decoder(run_dir: str, log: str, settings: List[Tuple[str, List[str]]]) -> Dict[str, object]:
    """Each decoding setting on the run's validation split, then test for the best one only."""
    valid = {}
    for label, overrides in settings:
        sidvid(["evaluate", run_dir, "--split", "valid"] + overrides, log)
        valid[label] = evaluation(run_dir, "valid", overrides)
    chosen = max(valid, key=lambda label: valid[label][SELECT])
    sidvid(["evaluate", run_dir, "--split", "test"] + dict(settings)[chosen], log)
    return {"decoder": chosen, "decoders_valid": valid, "valid": valid[chosen],
            "test": evaluation(run_dir, "test", dict(settings)[chosen])}


def evaluation(run_dir: str, split: str, overrides: List[str]) -> Dict[str, float]:
    """What ``sidvid-rec evaluate`` recorded for ``split`` under the run's config plus ``overrides``."""
    from sidvid_rec.config import load_run_config
    from sidvid_rec.eval.records import lookup

    found = lookup(run_dir, load_run_config(run_dir, overrides, command="evaluate"), split)
    if found is None:
        raise SystemExit(f"{run_dir}: no {split} evaluation under {overrides}")
    return found


def report(out: str, seeds: List[int], epochs: int) -> str:
    lines = ["| row | seeds | test R@10 | test N@10 | valid N@10 | best epoch | s/epoch |",
             "|---|---|---|---|---|---|---|"]
    for name, _, _, _ in ROWS:
        records = [json.load(open(p)) for s in seeds
                   if os.path.exists(p := os.path.join(out, f"e{epochs}-s{s}", name, "bench.json"))]
        if not records:
            continue

        def stat(split: str, key: str) -> str:
            xs = [r[split][key] for r in records]
            if len(xs) == 1:  # one seed: no spread to show
                return f"{xs[0]:.4f}"
            return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"

        best = " ".join(str(r["best_epoch"]) for r in records)
        decoders = sorted({r["decoder"] for r in records if "decoder" in r})
        if decoders:  # chosen on each run's validation split
            name = f"{name} ({' / '.join(decoders)})"
        speed = statistics.mean(r["s_per_epoch"] for r in records)
        lines.append(f"| {name} | {len(records)} | {stat('test', 'hr@10')} | {stat('test', 'ndcg@10')} | "
                     f"{stat('valid', 'ndcg@10')} | {best} | {speed:.0f} |")
    popular = most_popular()
    lines.append(f"| most popular (`sidvid-rec data baseline`, this package's evaluation) | - | "
                 f"{popular['hr@10']:.4f} | {popular['ndcg@10']:.4f} | - | - | - |")
    lines += [f"| published: {n} ({src}) | - | {r:.4f} | {nd:.4f} | - | - | - |" for n, r, nd, src in PUBLISHED]
    return "\n".join(lines)


def most_popular() -> Dict[str, float]:
    """The most-popular baseline on Beauty's test split, by the package's own evaluation."""
    from sidvid_rec.config import load_config
    from sidvid_rec.data import load_sequences
    from sidvid_rec.eval.popularity import evaluate_most_popular

    cfg = load_config(os.path.join(DATASETS["amazon-beauty"]["dir"], "hstu.yaml"),
                      [f"data.path={DATASETS['amazon-beauty']['path']}"])
    return evaluate_most_popular(load_sequences(cfg.data), "test", cfg.data.protocol, cfg.data.max_len, [10])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/sota")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--seeds", type=int, nargs="*", default=[42, 43, 44], help="with --report")
    parser.add_argument("--only", nargs="*", default=None, help="row names to run (default: all)")
    add_report_args(parser, "sota")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    if args.report:
        table = (f"Amazon Beauty, {args.epochs} epochs (patience {args.patience}), test of each run's "
                 f"best-validation checkpoint, mean ± std over seeds {', '.join(map(str, args.seeds))}:\n\n"
                 + report(out, args.seeds, args.epochs))
        emit_report(table, args.record, "sota")
        return 0
    spec = dict(DATASETS["amazon-beauty"])
    seed_dir = os.path.join(out, f"e{args.epochs}-s{args.seed}")
    os.makedirs(seed_dir, exist_ok=True)
    common = [f"data.path={spec['path']}", f"train.epochs={args.epochs}", f"train.seed={args.seed}",
              f"train.patience={args.patience}"]
    for name, config, overrides, sid_settings in ROWS:
        if args.only is not None and name not in args.only:
            continue
        # one SID build per SID setting, shared by every seed (the SIDs are the data side, not the seed's)
        where = os.path.join(out, "sids-" + "-".join(x.split(".")[-1].replace("=", "") for x in sid_settings)
                             if sid_settings else out)
        os.makedirs(where, exist_ok=True)
        sids = ensure_sids(spec, where, [f"data.path={spec['path']}"] + sid_settings)
        record = run_row(name, os.path.join(spec["dir"], config), overrides + sid_settings + [f"sids.dir={sids}"],
                         seed_dir, common)
        print(f"done {name} seed {args.seed}: valid {SELECT} {record['valid'][SELECT]:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
