"""sid_gen end to end: train a tiny run, export it, retrieve K valid distinct items from the export."""

import json

import pytest
import torch
import yaml

from sidvid_rec.cli import main
from sidvid_rec.config import load_config

SIDS = ["sids.encoder=tfidf", "sids.tfidf_dim=16", "sids.codebook_size=8", "sids.layers=2", "sids.kmeans_iters=3",
        "sids.balance_iters=3"]
TINY = ["model.mode=sid_gen", "data.max_len=12", "model.dim=12", "model.dqk=8", "model.dv=8", "model.num_blocks=1",
        "train.batch_size=128", "train.epochs=1", "eval.ks=[1,10]", "eval.batch_size=610", "train.device=cpu"]
K = 10


VARIANTS = [(), ("item_ids", "prefix_inputs", "item_output"), ("item_ids", "item_output", "node_output")]


@pytest.fixture(scope="module", params=VARIANTS, ids=["+".join(v) or "codes" for v in VARIANTS])
def sid_gen_export(tmp_path_factory, request):
    """A 1-epoch tiny sid_gen run on the embedded data and its export: code tokens alone; with the
    item-ID input rows, prefix inputs and the item-scored last level (``model.sid_gen_item_ids`` /
    ``sid_gen_prefix_inputs`` / ``sid_gen_item_output``); with every level scored by trie node
    (``sid_gen_node_output``)."""
    root = tmp_path_factory.mktemp("sid_gen_export")
    cache, sids, run, out = str(root / "cache"), str(root / "sids"), root / "run", root / "export"
    common = [f"data.cache_dir={cache}", *SIDS]
    assert main(["sids", "build", "--out", sids, "--no-progress", *common]) == 0
    flags = [f"model.sid_gen_{name}={str(name in request.param).lower()}"
             for name in ("item_ids", "prefix_inputs", "item_output", "node_output")]
    assert main(["train", "--run-dir", str(run), f"sids.dir={sids}", *common, *TINY, *flags]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    return {"root": root, "run": run, "out": out, "item_ids": "item_ids" in request.param, "flags": request.param}


def test_training_evaluated_the_beam(sid_gen_export):
    metrics = json.loads((sid_gen_export["run"] / "metrics.json").read_text())
    for split in ("valid", "test"):
        assert metrics[split]["count"] > 0 and 0.0 <= metrics[split]["hr@10"] <= 1.0
    manifest = json.loads((sid_gen_export["out"] / "manifest.json").read_text())
    assert manifest["model"]["mode"] == "sid_gen" and manifest["sid_gen"]["levels"] == 3  # 2 levels + dedup
    assert manifest["encoder"]["max_len"] == (12 + 1) * 3 - 1
    assert ("sid_item_table" in _vectors(sid_gen_export)) == sid_gen_export["item_ids"]
    for name in ("prefix_inputs", "item_output", "node_output"):
        assert manifest["sid_gen"].get(name, False) == (name in sid_gen_export["flags"])


def _vectors(export):
    from safetensors.torch import load_file

    return load_file(str(export["out"] / "item_vectors.safetensors"))


def test_retrieve_returns_k_valid_distinct_catalogue_items(sid_gen_export):
    from sidvid_rec.export.serving import load_export

    model = load_export(str(sid_gen_export["out"]))
    catalogue = set(range(1, model.num_items + 1))
    for history in ([1, 2, 3], [50, 7, 300, 12, 9], list(range(1, 40))):
        result = model.retrieve(history, k=K, raw_ids=False)
        ids = result.ids.tolist()
        assert len(ids) == K and len(set(ids)) == K  # K distinct items
        assert set(ids) <= catalogue and not set(ids) & set(history)  # 100% valid catalogue items, none seen
        scores = [item["score"] for item in result.items]
        assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)  # log-probabilities


def test_export_retrieval_equals_the_trained_models_beam(sid_gen_export):
    """The export's cached beam gives the trained model's top-K (same tensors, same search)."""
    from sidvid_rec.config import load_run_config
    from sidvid_rec.data import load_sequences
    from sidvid_rec.decode.sid_beam import sid_beam_search
    from sidvid_rec.export.serving import load_export
    from sidvid_rec.models.build import build_model
    from sidvid_rec.train import checkpoint as ckpt

    run = str(sid_gen_export["run"])
    cfg = load_run_config(run)
    data = load_sequences(cfg.data)
    module = build_model(cfg, data, table_device="cpu")
    _, full = ckpt.read_full_tensors(ckpt.best_checkpoint(run), "model.")
    module.load_state_dict(full)
    module.eval()
    exported = load_export(str(sid_gen_export["out"]))
    from sidvid_rec.export.cobra import HistoryBatch

    batch = HistoryBatch.single([5, 17, 230, 41], timestamps=[10, 20, 30, 40], query_time=50)
    tables = module.generation_tables()
    from sidvid_rec.modules.sid_tokens import prepare_histories

    inputs = prepare_histories(tables, module.token_of_item, batch.item_ids, batch.timestamps, batch.offsets,
                               batch.query_times)
    expected = sid_beam_search(module.encoder, tables, module.trie, inputs, K)
    got = exported.sid_gen.top_k(batch, K)
    assert torch.equal(got.items, expected.items)
    torch.testing.assert_close(got.scores, expected.scores)


def test_shipped_sid_gen_configs_load():
    for name in ("ml-100k", "amazon-beauty", "ml-latest-small"):
        cfg = load_config(f"configs/{name}/sid_gen.yaml")
        assert cfg.model.mode == "sid_gen" and cfg.eval.kv_cache
        with open(f"configs/{name}/sid_gen.yaml") as f:
            assert yaml.safe_load(f)["model"]["mode"] == "sid_gen"


def test_recommend_of_a_sid_gen_export_equals_retrieve(sid_gen_export, tmp_path):
    """Batch ``recommend`` runs the same trie-constrained beam as ``retrieve``, per user."""
    from sidvid_rec.data import load_sequences
    from sidvid_rec.export.recommend import data_config
    from sidvid_rec.export.serving import load_export

    model = load_export(str(sid_gen_export["out"]))
    data = load_sequences(data_config(model.manifest, []))
    users = tmp_path / "users.txt"
    picked = [int(data.user_raw_ids[i]) for i in (0, 17, 300)]
    users.write_text("\n".join(map(str, picked)) + "\n")
    out = tmp_path / "top.jsonl"
    assert main(["recommend", str(sid_gen_export["out"]), "--users", str(users), "--k", str(K), "--out", str(out),
                 "--no-progress", "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["user_id"] for r in rows] == picked
    index = {int(u): i for i, u in enumerate(data.user_raw_ids)}
    for row in rows:
        user = index[row["user_id"]]
        lo, hi = int(data.offsets[user]), int(data.offsets[user + 1])
        history = [int(data.item_raw_ids[i]) for i in data.item_values[lo:hi]]
        got = model.retrieve(history, k=K, timestamps=data.timestamps[lo:hi].tolist())
        assert row["item_ids"] == [it["item_id"] for it in got.items]
        assert row["scores"] == pytest.approx([it["score"] for it in got.items], abs=1e-5)
