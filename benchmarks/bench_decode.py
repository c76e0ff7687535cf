"""Decoding from the HSTU KV cache vs re-encoding: COBRA ``beam`` and ``sid_gen``'s beam search.

Both decoders, on the same synthetic histories (``--history`` items each, random items of a
catalogue of ``--items``, increasing timestamps) and tiny untrained models, run twice:

* ``kv_cache=True``: the history is encoded once, each query / beam level appends one token
  per beam to the cache (:meth:`HSTUEncoder.extend`);
* ``kv_cache=False``: the reference, re-encoding the history for every query (COBRA: one pass
  for the SID states plus one per beam SID; ``sid_gen``: one pass per beam per level).

Reported: seconds per 1,000 users (one thread), the speed-up, and whether both give the same
lists (share of identical top-K lists, largest score difference): the same lists mean the
same metrics. Also the trie statistic of ``sid_gen``: at each level, the share of the beam's
prefixes that no item has when the beam is *not* constrained to the trie (the same model
and width, invalid children not masked), i.e. how much of an unconstrained beam is wasted.

Run::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_decode --users 1000 --history 200
"""

import argparse
import time
from typing import Any, Dict, List, Tuple

import numpy as np
import torch


def synthetic_histories(users: int, history: int, num_items: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(items [U, H], times [U, H + 1])``: distinct random items; the last time is the query's."""
    rng = np.random.default_rng(seed)
    items = np.stack([rng.choice(np.arange(1, num_items + 1), size=history, replace=False) for _ in range(users)])
    gaps = rng.integers(1, 200_000, size=(users, history + 1))
    return items, np.cumsum(gaps, axis=1) + 1_000_000_000


def synthetic_codes(num_items: int, layers: int, size: int, seed: int) -> np.ndarray:
    """``[N + 1, layers + 1]`` random codes plus the disambiguation level (row 0: padding)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, size, size=(num_items, layers))
    dedup, seen = np.zeros(num_items, dtype=np.int64), {}
    for i, row in enumerate(map(tuple, codes)):
        dedup[i] = seen.get(row, 0)
        seen[row] = dedup[i] + 1
    return np.concatenate([np.full((1, layers + 1), -1), np.concatenate([codes, dedup[:, None]], 1)])


def eval_batch(items: np.ndarray, times: np.ndarray):
    """An evaluation :class:`SequenceBatch` (one target per user; the target id is unused)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from sidvid_rec.data.batches import FEATURE_KEYS, SequenceBatch

    users, history = items.shape
    values = np.concatenate([items.reshape(-1), times[:, :-1].reshape(-1), np.ones(users, dtype=np.int64),
                             times[:, -1]])
    lengths = [history] * users * 2 + [1] * users * 2
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=FEATURE_KEYS, values=torch.from_numpy(values.astype(np.int64)),
                                              lengths=torch.tensor(lengths, dtype=torch.int32))
    return SequenceBatch(kjt, torch.arange(users), torch.ones(users), False)


def _encoder(max_len: int, dim: int, blocks: int):
    from sidvid_rec.modules.hstu import HSTUEncoder

    return HSTUEncoder(max_len=max_len, dim=dim, num_blocks=blocks, num_heads=1, dqk=dim, dv=dim, dropout=0.0,
                       attn_dropout=0.0)


def cobra_model(num_items: int, codes: np.ndarray, history: int, dim: int, blocks: int):
    from sidvid_rec.losses import InfoNCELoss, SampledSoftmaxLoss
    from sidvid_rec.models.cobra import CobraRecommender
    from sidvid_rec.modules.embeddings import ItemEmbeddings

    emb = ItemEmbeddings.from_codes(num_items, dim, "cobra", codes)
    return CobraRecommender(emb, _encoder(2 * history + 1, dim, blocks), SampledSoftmaxLoss(num_items, 8),
                            InfoNCELoss(num_items), codes).eval()


def sid_gen_model(codes: np.ndarray, history: int, dim: int, blocks: int):
    from sidvid_rec.models.sid_gen import SidGenRecommender, sid_gen_max_tokens
    from sidvid_rec.modules.code_embeddings import CodeTokenEmbeddings
    from sidvid_rec.semantic_ids.trie import SidTrie

    trie = SidTrie.from_codes(codes)
    enc = _encoder(sid_gen_max_tokens(history, trie.num_levels), dim, blocks)
    return SidGenRecommender(CodeTokenEmbeddings(sum(trie.level_sizes), dim), enc, codes).eval()


def _timed(fn) -> Tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_cobra(model, batches: List[Any], beam: int, k: int, kv_cache: bool):
    from sidvid_rec.config import DecoderSettings
    from sidvid_rec.decode import DecodeContext, decode
    from sidvid_rec.retrieval import VidIndex

    sid_table, vid_table = model.decoding_tables()
    index = VidIndex.build(vid_table[1:], torch.arange(1, vid_table.shape[0]))
    ctx = DecodeContext(model, sid_table, index, DecoderSettings(beam_size=beam, beam_ann=50, kv_cache=kv_cache))
    with torch.no_grad():
        return [decode("beam", ctx, batch, k) for batch in batches]


def run_sid_gen(model, batches: List[Any], beam: int, k: int, kv_cache: bool):
    from sidvid_rec.decode.sid_beam import sid_beam_search

    tables = model.generation_tables()
    return [sid_beam_search(model.encoder, tables, model.trie, model.prepare(b, tables), k, beam=beam,
                            kv_cache=kv_cache) for b in batches]


def agreement(a: List[Any], b: List[Any]) -> Dict[str, float]:
    """Share of identical top-K lists and the largest finite score difference."""
    same = torch.cat([(x.items == y.items).all(dim=1) for x, y in zip(a, b)])
    diff = max(float((x.scores - y.scores).nan_to_num(posinf=0.0, neginf=0.0).abs().max()) for x, y in zip(a, b))
    return {"identical_lists": float(same.float().mean()), "max_score_diff": diff}


@torch.no_grad()
def invalid_prefix_share(model, batch, width: int) -> List[float]:
    """Per level, the share of an *unconstrained* beam's prefixes that no item has (from the
    KV cache: same states as the constrained search, every code allowed at every level)."""
    tables, trie = model.generation_tables(), model.trie
    inputs = model.prepare(batch, tables)
    out, cache = model.encoder.encode_cached(inputs.x, inputs.offsets, inputs.timestamps,
                                             query_timestamps=inputs.query_timestamps, appended=trie.num_levels - 1)
    states, users = out[inputs.offsets[1:] - 1], inputs.offsets.numel() - 1
    lengths = inputs.offsets[1:] - inputs.offsets[:-1]
    codes = model.codes[1:]
    radix = max(trie.level_sizes)
    scores, keys, step, shares = torch.zeros(users, 1), torch.zeros(users, 1, dtype=torch.long), None, []
    for level in range(trie.num_levels):
        log_p = torch.log_softmax(tables.level_logits(states, level), dim=1).view(users, keys.shape[1], -1)
        top = (scores.unsqueeze(2) + log_p).flatten(1).topk(min(width, log_p.shape[1] * log_p.shape[2]), dim=1)
        parent, code = top.indices // log_p.shape[2], top.indices % log_p.shape[2]
        scores, keys = top.values, keys.gather(1, parent) * radix + code
        valid_keys = torch.zeros(codes.shape[0], dtype=torch.long)
        for col in range(level + 1):
            valid_keys = valid_keys * radix + codes[:, col]
        shares.append(float((~torch.isin(keys, valid_keys)).float().mean()))
        if level + 1 < trie.num_levels:
            rows = (parent + torch.arange(users).unsqueeze(1) * log_p.shape[1]).reshape(-1)
            step = None if step is None else step.select(rows)
            x = tables.code_table[(code + tables.level_offsets[level]).reshape(-1)]
            states, step = model.encoder.extend(cache, step, x, inputs.target_timestamps, lengths + level,
                                                inputs.target_timestamps)
    return shares


def trained_invalid_share(run_dir: str, users: int, width: int) -> List[float]:
    """:func:`invalid_prefix_share` of a trained ``sid_gen`` run on the first ``users`` of its test split."""
    from sidvid_rec.config import load_run_config
    from sidvid_rec.data import load_sequences, make_split
    from sidvid_rec.data.batches import collate
    from sidvid_rec.models.build import build_model
    from sidvid_rec.train import checkpoint as ckpt

    cfg = load_run_config(run_dir)
    data = load_sequences(cfg.data)
    model = build_model(cfg, data, table_device="cpu")
    record = ckpt.latest_checkpoint(run_dir)
    model.load_state_dict(ckpt.read_full_tensors(record, "model.")[1])
    split = make_split(data, "test", cfg.data.protocol, cfg.data.max_len)
    examples = np.arange(min(users, split.num_examples))
    return invalid_prefix_share(model.eval(), collate(split, examples, np.ones(len(examples))), width)


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--history", type=int, default=200)
    parser.add_argument("--items", type=int, default=1682)
    parser.add_argument("--layers", type=int, default=3, help="SID k-means levels (+ the disambiguation level)")
    parser.add_argument("--codebook-size", type=int, default=16)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--beam", type=int, default=10, help="COBRA beam SIDs; sid_gen beam width")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100, help="users per decode call")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["cobra", "sid_gen"], default=None, help="one decoder only")
    parser.add_argument("--reencode-users", type=int, default=0,
                        help="time re-encoding on the first this many users (0 = all); figures are per 1,000")
    parser.add_argument("--run-dir", default="", help="only the trie statistic, of this trained sid_gen run")
    args = parser.parse_args(argv)
    if args.run_dir:
        shares = trained_invalid_share(args.run_dir, args.users, max(args.beam, args.k))
        print("invalid prefix share per level (unconstrained beam, trained):", shares, flush=True)
        return {"invalid_prefix_share": shares}
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    items, times = synthetic_histories(args.users, args.history, args.items, args.seed)
    batches = [eval_batch(items[i:i + args.batch], times[i:i + args.batch]) for i in range(0, args.users, args.batch)]
    codes = synthetic_codes(args.items, args.layers, args.codebook_size, args.seed)
    per_1000 = 1000.0 / args.users
    results: Dict[str, Any] = {"args": vars(args)}
    models = {"cobra": (cobra_model(args.items, codes, args.history, args.dim, args.blocks), run_cobra),
              "sid_gen": (sid_gen_model(codes, args.history, args.dim, args.blocks), run_sid_gen)}
    # Re-encoding is timed on the first --reencode-users users (whole batches; time scales with users).
    subset = batches[:max(1, -(-(args.reencode_users or args.users) // args.batch))]
    per_1000_subset = 1000.0 / sum(b.batch_size for b in subset)
    for name, (model, run) in models.items():
        if args.only and name != args.only:
            continue
        cached, t_cached = _timed(lambda: run(model, batches, args.beam, args.k, True))
        again, t_again = _timed(lambda: run(model, subset, args.beam, args.k, False))
        results[name] = {"cached_s_per_1000": t_cached * per_1000, "reencode_s_per_1000": t_again * per_1000_subset,
                         "speedup": t_again * per_1000_subset / (t_cached * per_1000),
                         **agreement(cached[:len(subset)], again)}
        print(name, results[name], flush=True)
    if args.only == "cobra":
        return results
    results["invalid_prefix_share"] = invalid_prefix_share(models["sid_gen"][0], batches[0], max(args.beam, args.k))
    print("invalid prefix share per level (unconstrained beam):", results["invalid_prefix_share"], flush=True)
    return results


if __name__ == "__main__":
    main()
