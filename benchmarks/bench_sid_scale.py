"""Code-by-code SID heads at catalogue scale: the per-token cost does not follow the item count.

Synthetic catalogues of ``--sizes`` items (default 10k, 100k, 1M), each item a random but
unique SID of ``--levels`` x ``--codebook-size`` codes (distinct tuples sampled without
replacement, so no disambiguation level is needed), synthetic histories of random items with
increasing timestamps, tiny untrained models. Per size, in a fresh process (its peak RSS its own):

* the trie of the valid SIDs: build time (:class:`~sidvid_rec.semantic_ids.trie.SidTrie`);
* ``sid_gen``: training step (forward + backward of the next-code loss) time per code token,
  and the KV-cached, trie-constrained beam search (history filtering on) per user;
* COBRA with ``model.cobra_sid_head=codes``: training step (both losses; the item tables
  frozen, as their updates are the trainer's fused sparse optimizer's) per encoder token, the
  codes head alone (loss forward + backward) per position,
  the code beam over the SIDs per user (the SID half of decoding), the whole ``beam`` decoder
  per user (its VID half searches a flat FAISS index over every item, which does follow N),
  and for contrast the whole-SID head's scoring of every valid SID per user.

The SID heads are ``L x K`` rows (here 3 x 256 = 768), whatever the catalogue.

Run::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_sid_scale --sizes 10000 100000 1000000 --repeats 3

With ``--repeats R`` the sizes run round robin ``R`` times and each figure is the best of its
``R`` values (a shared machine's load only ever slows a run down).
"""

import argparse
import json
import time
from typing import Any, Dict, List

import numpy as np
import torch

from benchmarks.common import call_worker, peak_rss_mb, reset_peak_rss


def unique_codes(num_items: int, levels: int, size: int, seed: int) -> np.ndarray:
    """``[N + 1, levels]`` distinct random code tuples (row 0: padding, all 0)."""
    if num_items > size ** levels:
        raise ValueError(f"{num_items} items need more than {size}^{levels} distinct SIDs")
    rng = np.random.default_rng(seed)
    keys = rng.choice(size ** levels, size=num_items, replace=False)
    codes = np.stack([(keys // size ** (levels - 1 - l)) % size for l in range(levels)], axis=1)
    return np.concatenate([np.zeros((1, levels), dtype=np.int64), codes.astype(np.int64)])


def _kjt_batch(items: np.ndarray, times: np.ndarray, training: bool):
    """A :class:`SequenceBatch` of ``U`` histories ``items [U, H + 1]`` (the last item: the
    target), ``times [U, H + 1]``: training (a target per position) or evaluation (one)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from sidvid_rec.data.batches import FEATURE_KEYS, SequenceBatch

    users, steps = items.shape
    h = steps - 1
    if training:
        parts, lengths = [items[:, :-1], times[:, :-1], items[:, 1:], times[:, 1:]], [h] * users * 4
    else:
        parts, lengths = [items[:, :-1], times[:, :-1], items[:, -1:], times[:, -1:]], [h] * users * 2 + [1] * users * 2
    values = np.concatenate([p.reshape(-1) for p in parts]).astype(np.int64)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=FEATURE_KEYS, values=torch.from_numpy(values),
                                              lengths=torch.tensor(lengths, dtype=torch.int32))
    return SequenceBatch(kjt, torch.arange(users), torch.ones(users), training)


def _histories(users: int, history: int, num_items: int, seed: int):
    rng = np.random.default_rng(seed)
    items = rng.integers(1, num_items + 1, size=(users, history + 1))
    return items, np.cumsum(rng.integers(1, 200_000, size=(users, history + 1)), axis=1) + 1_000_000_000


def _encoder(max_len: int, dim: int, blocks: int):
    from sidvid_rec.modules.hstu import HSTUEncoder

    return HSTUEncoder(max_len=max_len, dim=dim, num_blocks=blocks, num_heads=1, dqk=dim, dv=dim, dropout=0.0,
                       attn_dropout=0.0)


def _train_time(model, batches: List[Any], warmup: int) -> float:
    """Median seconds of forward + backward over ``batches`` after ``warmup`` of them."""
    model.train()
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(batch).loss.backward()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_sid_gen(codes: np.ndarray, a: Dict[str, Any]) -> Dict[str, float]:
    from sidvid_rec.decode.sid_beam import sid_beam_search
    from sidvid_rec.models.sid_gen import SidGenRecommender, sid_gen_max_tokens
    from sidvid_rec.modules.code_embeddings import CodeTokenEmbeddings
    from sidvid_rec.semantic_ids.trie import SidTrie

    levels = codes.shape[1]
    rows = sum(SidTrie.from_codes(codes).level_sizes)  # K_l = max code + 1 (3 x 256 at every size here)
    model = SidGenRecommender(CodeTokenEmbeddings(rows, a["dim"]),
                              _encoder(sid_gen_max_tokens(a["history"], levels), a["dim"], a["blocks"]), codes)
    n = codes.shape[0] - 1
    train = [_kjt_batch(*_histories(a["train_users"], a["history"], n, s), training=True)
             for s in range(a["warmup"] + a["steps"])]
    step = _train_time(model, train, a["warmup"])
    tokens = a["train_users"] * ((a["history"] + 1) * levels - 1)  # code tokens fed per sequence
    model.eval()
    batches = [_kjt_batch(*_histories(a["batch"], a["history"], n, 100 + s), training=False)
               for s in range(a["users"] // a["batch"])]
    with torch.no_grad():
        tables = model.generation_tables()
        run = lambda: [sid_beam_search(model.encoder, tables, model.trie, model.prepare(b, tables), a["k"],  # noqa: E731
                                       beam=a["beam"]) for b in batches]
        run()  # warm-up
        decode = _timed(run)
    return {"sid_gen_train_tokens_per_s": tokens / step, "sid_gen_train_step_s": step,
            "sid_gen_beam_ms_per_user": 1e3 * decode / (len(batches) * a["batch"])}


def _head_time(model, a: Dict[str, Any], positions: int = 4096, repeats: int = 5) -> float:
    """Seconds per position of the codes head's loss, forward + backward, on random states."""
    states = torch.nn.functional.normalize(torch.randn(positions, a["dim"]), dim=-1).requires_grad_(True)
    targets = model.sid_tuples[torch.randint(0, model.num_sids, (positions,))]
    model.sid_codes_loss(states, targets).loss.backward()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model.sid_codes_loss(states, targets).loss.backward()
    return (time.perf_counter() - start) / (repeats * positions)


def measure_cobra(codes: np.ndarray, a: Dict[str, Any]) -> Dict[str, float]:
    from sidvid_rec.config import DecoderSettings
    from sidvid_rec.decode import DecodeContext, decode
    from sidvid_rec.decode.base import DecodeState
    from sidvid_rec.decode.code_sids import CodeSidBeam
    from sidvid_rec.losses import InfoNCELoss, SampledSoftmaxLoss
    from sidvid_rec.models.cobra import CobraRecommender
    from sidvid_rec.modules.embeddings import ItemEmbeddings
    from sidvid_rec.retrieval import VidIndex

    n = codes.shape[0] - 1
    emb = ItemEmbeddings.from_codes(n, a["dim"], "cobra", codes)
    model = CobraRecommender(emb, _encoder(2 * a["history"] + 1, a["dim"], a["blocks"]), SampledSoftmaxLoss(n, 128),
                             InfoNCELoss(n, num_negatives=128, dim=a["dim"]), codes, sid_head="codes")
    # The item tables are the trainer's fused sparse optimizer's (row updates); here, unsharded,
    # their gradient would be a dense [rows, D] tensor (O(N) per step): left out of the timing.
    model.embeddings.requires_grad_(False)
    train = [_kjt_batch(*_histories(a["train_users"], a["history"], n, s), training=True)
             for s in range(a["warmup"] + a["steps"])]
    step = _train_time(model, train, a["warmup"])
    head = _head_time(model, a)
    tokens = a["train_users"] * (2 * (a["history"] + 1) - 1)  # SID + VID tokens, the last VID dropped
    model.eval()
    batches = [_kjt_batch(*_histories(a["batch"], a["history"], n, 100 + s), training=False)
               for s in range(a["users"] // a["batch"])]
    users = len(batches) * a["batch"]
    with torch.no_grad():
        sid_table, vid_table = model.decoding_tables()
        index = VidIndex.build(vid_table[1:], torch.arange(1, vid_table.shape[0]))
        beam = CodeSidBeam(model.sid_head, model.sid_tuples)
        ctx = DecodeContext(model, sid_table, index, DecoderSettings(beam_size=a["beam"], beam_ann=50), True, beam)
        states = [DecodeState(ctx, b).states for b in batches]
        beam.top_sids(states[0], a["beam"]), decode("beam", ctx, batches[0], a["k"])  # warm-up
        code_beam = _timed(lambda: [beam.top_sids(s, a["beam"]) for s in states])
        whole = _timed(lambda: [model.sid_logits(s, sid_table).topk(a["beam"], dim=1) for s in states])
        full = _timed(lambda: [decode("beam", ctx, b, a["k"]) for b in batches])
    return {"cobra_train_tokens_per_s": tokens / step, "cobra_train_step_s": step,
            "cobra_code_head_us_per_position": 1e6 * head,
            "cobra_code_beam_ms_per_user": 1e3 * code_beam / users,
            "cobra_beam_decoder_ms_per_user": 1e3 * full / users,
            "cobra_whole_sid_scoring_ms_per_user": 1e3 * whole / users}


def measure(num_items: int, args: Dict[str, Any]) -> Dict[str, Any]:
    """One catalogue size (run in a worker process: the peak RSS is this size's)."""
    from sidvid_rec.semantic_ids.trie import SidTrie

    torch.set_num_threads(args["threads"])
    torch.manual_seed(args["seed"])
    reset_peak_rss()
    codes = unique_codes(num_items, args["levels"], args["codebook_size"], args["seed"])
    out: Dict[str, Any] = {"items": num_items, "trie_build_s": _timed(lambda: SidTrie.from_codes(codes))}
    if "sid_gen" in args["models"]:
        out.update(measure_sid_gen(codes, args))
    if "cobra" in args["models"]:
        out.update(measure_cobra(codes, args))
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def main(argv=None) -> List[Dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--train-users", type=int, default=32, help="sequences per training step")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--users", type=int, default=200, help="users decoded per size")
    parser.add_argument("--batch", type=int, default=50, help="users per decode call")
    parser.add_argument("--beam", type=int, default=10)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--models", nargs="+", choices=["sid_gen", "cobra"], default=["sid_gen", "cobra"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per size (round robin); best of them kept")
    parser.add_argument("--in-process", action="store_true", help="no worker processes (tests; RSS is shared)")
    args = vars(parser.parse_args(argv))
    runs: Dict[int, List[Dict[str, Any]]] = {size: [] for size in args["sizes"]}
    for _ in range(args["repeats"]):  # round robin: the machine's load falls on every size alike
        for size in args["sizes"]:
            if args["in_process"]:
                row = measure(size, args)
            else:
                row = call_worker("bench_sid_scale", "measure", {"num_items": size, "args": args}, args["threads"],
                                  3600)
            print(json.dumps(row), flush=True)
            runs[size].append(row)
    rows = [best_of(runs[size]) for size in args["sizes"]]
    for row in rows:
        print("best", json.dumps(row), flush=True)
    return rows


def best_of(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per figure, the best of the repeats: the highest rate (``*_per_s``), the lowest time or memory."""
    return {key: (max if key.endswith("_per_s") else min)(row[key] for row in rows) for key in rows[0]}


if __name__ == "__main__":
    main()
