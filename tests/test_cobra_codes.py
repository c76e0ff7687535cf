"""COBRA with the code-by-code SID head (model.cobra_sid_head=codes): train -> evaluate -> export
-> retrieve on a tiny run; decoders' outputs valid; retrieve equals the trained decoders; the
KV-cached decoding equals re-encoding; ``soft`` is refused; old fingerprints are unchanged."""

import json

import pytest
import torch

from batches import histories_of
from sidvid_rec.cli import main
from sidvid_rec.errors import ConfigError

SIDS = ["sids.encoder=tfidf", "sids.tfidf_dim=16", "sids.codebook_size=8", "sids.layers=2", "sids.kmeans_iters=3",
        "sids.balance_iters=3"]
TINY = ["train.device=cpu", "model.mode=cobra", "model.cobra_sid_head=codes", "model.sid_dedup=true",
        "data.max_len=12", "model.dim=14", "model.dqk=8", "model.dv=8", "model.num_blocks=1",
        "train.batch_size=128", "train.epochs=1", "eval.ks=[1,10]", "eval.batch_size=610", "eval.decoder=beam",
        "eval.beam_size=3", "eval.beam_ann=20"]
DECODERS = ["direct", "neighbor", "beam"]
K = 10


@pytest.fixture(scope="module")
def codes_run(tmp_path_factory):
    """A 1-epoch tiny COBRA run with the codes head on the embedded data, evaluated and exported."""
    root = tmp_path_factory.mktemp("cobra_codes")
    cache, sids, run, out = str(root / "cache"), str(root / "sids"), root / "run", root / "export"
    common = [f"data.cache_dir={cache}", *SIDS]
    assert main(["sids", "build", "--out", sids, "--no-progress", *common]) == 0
    assert main(["train", "--run-dir", str(run), f"sids.dir={sids}", *common, *TINY]) == 0
    assert main(["evaluate", str(run), "--split", "test"]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    return {"run": run, "out": out}


@pytest.fixture(scope="module")
def decoded(codes_run):
    from sidvid_rec.config import load_run_config
    from sidvid_rec.data import load_sequences, make_split
    from sidvid_rec.data.batches import collate
    from sidvid_rec.decode import decode
    from sidvid_rec.eval.evaluate import cobra_decode_context
    from sidvid_rec.models.build import unwrap
    from sidvid_rec.process_group import init_distributed
    from sidvid_rec.train import checkpoint as ckpt
    from sidvid_rec.train.distributed import build_sharded_model

    cfg = load_run_config(str(codes_run["run"]))
    data = load_sequences(cfg.data)
    model = build_sharded_model(cfg, data, init_distributed("cpu"))
    ckpt.load_model_weights(ckpt.best_checkpoint(str(codes_run["run"])), model)
    module = unwrap(model).eval()
    split = make_split(data, "valid", cfg.data.protocol, cfg.data.max_len)
    examples = torch.arange(0, 600, 50).numpy()
    batch = collate(split, examples, torch.ones(len(examples)).numpy())
    ctx = cobra_decode_context(module, cfg)
    with torch.no_grad():
        tops = {kind: decode(kind, ctx, batch, K) for kind in DECODERS}
    return {"cfg": cfg, "module": module, "batch": batch, "ctx": ctx, "tops": tops}


def test_run_trains_evaluates_and_records_the_head(codes_run, decoded):
    metrics = json.loads((codes_run["run"] / "metrics.json").read_text())
    assert metrics  # training validated with the codes head's beam decoder
    module = decoded["module"]
    assert module.sid_head is not None and module.sid_head.num_levels == module.sid_tuples.shape[1]
    manifest = json.loads((codes_run["out"] / "manifest.json").read_text())
    assert manifest["cobra"]["sid_head"] == "codes" and manifest["cobra"]["decoder"] == "beam"


@pytest.mark.parametrize("kind", DECODERS)
def test_decoders_return_k_distinct_items_outside_the_history(decoded, kind):
    top, batch = decoded["tops"][kind], decoded["batch"]
    num_items = decoded["module"].num_items
    assert top.items.shape == (12, K)
    for b, history, _, _ in histories_of(batch):
        items = top.items[b].tolist()
        assert len(set(items)) == K and all(1 <= i <= num_items for i in items) and not set(items) & set(history)


def test_code_beam_gives_valid_sids_by_log_probability(decoded):
    """The code beam's SIDs are valid, distinct, sorted by their sequence log-probability, and
    that log-probability is the sum of the head's per-level log-softmax over the trie's children."""
    from sidvid_rec.decode.base import DecodeState

    ctx, module = decoded["ctx"], decoded["module"]
    state = DecodeState(ctx, decoded["batch"])
    log_p, sids = ctx.sid_beam.top_sids(state.states, 6)
    assert sids.shape == (12, 6) and int(sids.min()) >= 0 and int(sids.max()) < module.num_sids
    assert all(len(set(row)) == 6 for row in sids.tolist())
    assert torch.all(log_p[:, :-1] >= log_p[:, 1:]) and torch.all(log_p <= 0)
    head, trie = module.sid_head, ctx.sid_beam.trie
    b, sid = 0, int(sids[0, 0])
    codes = module.sid_tuples[sid]
    prefix, node, total = torch.zeros(1, head.heads.shape[1]), 0, 0.0
    with torch.no_grad():
        for level in range(head.num_levels):
            logits = head.tables().level_logits(head.level_queries(state.states[b:b + 1], prefix, level), level)[0]
            children = trie.children[level][node]
            total += float(torch.log_softmax(logits.masked_fill(children < 0, float("-inf")), 0)[codes[level]])
            node = int(children[codes[level]])
            prefix = prefix + head.code_in[int(codes[level]) + int(head.level_offsets[level])]
    assert abs(total - float(log_p[0, 0])) < 1e-4


@pytest.mark.parametrize("kind", DECODERS)
def test_kv_cached_decoding_matches_re_encoding(decoded, kind):
    import dataclasses

    from sidvid_rec.decode import decode

    ctx = decoded["ctx"]
    again = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, kv_cache=False))
    with torch.no_grad():
        ref = decode(kind, again, decoded["batch"], K)
    assert torch.equal(ref.items, decoded["tops"][kind].items)
    assert torch.allclose(ref.scores, decoded["tops"][kind].scores, atol=1e-5)


@pytest.mark.parametrize("kind", DECODERS)
def test_retrieve_equals_the_trained_decoder(codes_run, decoded, kind):
    from sidvid_rec.export.serving import load_export

    export = load_export(str(codes_run["out"]))
    top = decoded["tops"][kind]
    for b, history, times, query_time in histories_of(decoded["batch"]):
        got = export.retrieve(history, k=K, timestamps=times, query_time=query_time, raw_ids=False, decoder=kind)
        assert got.ids.tolist() == top.items[b].tolist(), (kind, b)
        assert torch.allclose(torch.tensor([it["score"] for it in got.items]), top.scores[b].float(), atol=2e-6)


def test_soft_is_refused_with_the_decoders_that_work(codes_run, decoded):
    from sidvid_rec.decode import decode
    from sidvid_rec.export.serving import load_export

    with pytest.raises(ConfigError, match="direct, neighbor, beam"):
        decode("soft", decoded["ctx"], decoded["batch"], K)
    with pytest.raises(ConfigError, match="direct, neighbor, beam"):
        load_export(str(codes_run["out"])).retrieve([1, 2, 3], k=K, raw_ids=False, decoder="soft")
    from sidvid_rec.config import load_config

    with pytest.raises(ConfigError, match="cobra_sid_head=whole"):
        load_config(None, ["model.mode=cobra", "model.cobra_sid_head=codes", "eval.decoder=soft"])


def test_fingerprint_of_the_whole_head_is_unchanged():
    """The new key at its default leaves the hash as it was before the key existed."""
    import hashlib

    from sidvid_rec.config import load_config
    from sidvid_rec.train.checkpoint import FINGERPRINT_ADDED_KEYS, model_fingerprint

    cfg = load_config(None, ["model.mode=cobra"])
    added = tuple(FINGERPRINT_ADDED_KEYS)
    assert set(added) >= {"cobra_sid_head", "sid_gen_item_ids", "sid_gen_prefix_inputs", "sid_gen_item_output",
                          "sid_gen_node_output"}
    old = {k: v for k, v in cfg.model.__dict__.items() if k not in added}
    shape = {"model": old, "num_items": 7, "max_len": cfg.data.max_len, "data_path": cfg.data.path,
             "format": cfg.data.format}
    before = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert model_fingerprint(cfg, 7) == before
    assert model_fingerprint(load_config(None, ["model.mode=cobra", "model.cobra_sid_head=codes"]), 7) != before
    sid_gen = load_config(None, ["model.mode=sid_gen"])
    with_ids = load_config(None, ["model.mode=sid_gen", "model.sid_gen_item_ids=true"])
    assert model_fingerprint(sid_gen, 7) != model_fingerprint(with_ids, 7) != model_fingerprint(
        load_config(None, ["model.mode=sid_gen", "model.sid_gen_item_ids=true", "model.sid_gen_item_output=true"]), 7)
    item_output = ["model.mode=sid_gen", "model.sid_gen_item_ids=true", "model.sid_gen_item_output=true"]
    assert model_fingerprint(load_config(None, item_output), 7) != model_fingerprint(
        load_config(None, item_output + ["model.sid_gen_node_output=true"]), 7)


def test_codes_export_retrieval_needs_no_training_code(codes_run):
    """A codes-head export decodes with every decoder it supports in a fresh interpreter
    that never imports torchrec or the model/trainer code."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from sidvid_rec.export.serving import load_export\n"
        f"export = load_export({str(codes_run['out'])!r})\n"
        f"for kind in {DECODERS!r}:\n"
        "    items = export.retrieve(['1', '50', '260'], k=3, decoder=kind).items\n"
        "    assert len(items) == 3, items\n"
        "bad = [m for m in sys.modules if m.startswith(('torchrec', 'sidvid_rec.train', 'sidvid_rec.models'))]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
