"""Retrieval from a COBRA export: the export-side decoding model equals the trained model's decoders."""

import json
import shutil

import pytest
import torch

from batches import histories_of
from sidvid_rec.cli import main

SIDS = ["sids.encoder=tfidf", "sids.tfidf_dim=16", "sids.codebook_size=8", "sids.layers=2", "sids.kmeans_iters=3",
        "sids.balance_iters=3"]
# Tiny COBRA over unique SIDs (sid_dedup) with the text projection on (VID = ID row + projected
# text), beam as the run's decoder with non-default settings: retrieve must pick both up from
# the manifest.
TINY = ["train.device=cpu", "model.mode=cobra", "model.sid_dedup=true", "model.text_projection=true", "data.max_len=12",
        "model.dim=14", "model.dqk=8", "model.dv=8", "model.num_blocks=1", "train.batch_size=128",
        "train.epochs=1", "eval.ks=[1,10]", "eval.batch_size=610", "eval.decoder=beam", "eval.beam_size=3",
        "eval.beam_ann=20", "eval.beam_fuse=sum"]
DECODERS = ["direct", "neighbor", "soft", "beam"]
K = 10


@pytest.fixture(scope="module")
def cobra_export(tmp_path_factory):
    """A 1-epoch tiny COBRA run on the embedded data and its export."""
    root = tmp_path_factory.mktemp("cobra_export")
    cache, sids, run, out = str(root / "cache"), str(root / "sids"), root / "run", root / "export"
    common = [f"data.cache_dir={cache}", *SIDS]
    assert main(["sids", "build", "--out", sids, "--no-progress", *common]) == 0
    assert main(["train", "--run-dir", str(run), f"sids.dir={sids}", *common, *TINY]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    return {"root": root, "run": run, "out": out}


@pytest.fixture(scope="module")
def decoded(cobra_export):
    """The trained (DMP) model's decoders on 12 validation users: ``{decoder: TopK}`` + the batch."""
    from sidvid_rec.data import load_sequences, make_split
    from sidvid_rec.data.batches import collate
    from sidvid_rec.decode import decode
    from sidvid_rec.eval.evaluate import cobra_decode_context
    from sidvid_rec.models.build import unwrap
    from sidvid_rec.train.distributed import build_sharded_model
    from sidvid_rec.train import checkpoint as ckpt
    from sidvid_rec.process_group import init_distributed
    from sidvid_rec.config import load_run_config

    run = str(cobra_export["run"])
    cfg = load_run_config(run)
    data = load_sequences(cfg.data)
    model = build_sharded_model(cfg, data, init_distributed("cpu"))
    ckpt.load_model_weights(ckpt.best_checkpoint(run), model)
    module = unwrap(model).eval()
    split = make_split(data, "valid", cfg.data.protocol, cfg.data.max_len)
    examples = torch.arange(0, 600, 50).numpy()  # 12 users
    batch = collate(split, examples, torch.ones(len(examples)).numpy())
    ctx = cobra_decode_context(module, cfg)
    with torch.no_grad():
        tops = {kind: decode(kind, ctx, batch, K) for kind in DECODERS}
    return {"cfg": cfg, "data": data, "module": module, "batch": batch, "tops": tops}


def test_manifest_records_what_decoding_needs(cobra_export, decoded):
    import safetensors.torch

    manifest = json.loads((cobra_export["out"] / "manifest.json").read_text())
    assert manifest["model"]["mode"] == "cobra" and manifest["encoder"]["max_len"] == 2 * 12 + 1
    section = manifest["cobra"]
    assert section["max_len"] == 12 and section["query_time"] == "target" and section["decoder"] == "beam"
    assert section["temperature"] == decoded["cfg"].loss.temperature
    assert section["decoder_settings"]["beam_size"] == 3 and section["decoder_settings"]["beam_fuse"] == "sum"
    vectors = safetensors.torch.load_file(str(cobra_export["out"] / "item_vectors.safetensors"))
    module = decoded["module"]
    assert torch.equal(vectors["sid_of_item"], module.sid_of_item)
    sid_table, vid_table = module.decoding_tables()
    assert torch.equal(vectors["sid_vectors"], sid_table)
    # the stored (unnormalised) VID vectors are the L2-normalised ones FAISS indexes
    assert torch.allclose(vectors["item_vectors"] / vectors["item_vectors"].norm(dim=1, keepdim=True), vid_table,
                          atol=1e-6)


@pytest.mark.parametrize("kind", DECODERS)
def test_retrieve_equals_the_trained_decoder(cobra_export, decoded, kind):
    """Per user, the export's top-K (from its files alone) is the trained model's decoder top-K:
    same items in the same order, same scores; K distinct items, none from the history."""
    from sidvid_rec.export.serving import load_export

    export = load_export(str(cobra_export["out"]))
    top = decoded["tops"][kind]
    for b, history, times, query_time in histories_of(decoded["batch"]):
        got = export.retrieve(history, k=K, timestamps=times, query_time=query_time, raw_ids=False, decoder=kind)
        assert got.ids.tolist() == top.items[b].tolist(), (kind, b)
        assert torch.allclose(torch.tensor([it["score"] for it in got.items]), top.scores[b].float(), atol=2e-6)
        assert len(set(got.ids.tolist())) == K and not set(got.ids.tolist()) & set(history)


@pytest.mark.parametrize("kind", DECODERS)
def test_retrieve_many_decodes_the_histories_together(cobra_export, decoded, kind):
    """What `sidvid-rec serve` runs for a batch of requests: all histories in one decoder pass
    give each history's own top-K (a second k in the same call is its own group)."""
    from sidvid_rec.export.serving import Query, load_export

    export = load_export(str(cobra_export["out"]))
    top = decoded["tops"][kind]
    rows = list(histories_of(decoded["batch"]))
    queries = [Query(h, K if b % 3 else 4, t, q, kind) for b, h, t, q in rows]
    got = export.retrieve_many(queries, raw_ids=False)
    for (b, *_), result in zip(rows, got):
        k = K if b % 3 else 4
        assert result.ids.tolist() == top.items[b][:k].tolist(), (kind, b)
        if k == K:
            assert result.ids.tolist() == top.items[b].tolist(), (kind, b)
            assert torch.allclose(torch.tensor([it["score"] for it in result.items]), top.scores[b].float(),
                                  atol=2e-6)


def test_default_decoder_is_the_runs(cobra_export, decoded):
    from sidvid_rec.export.serving import load_export

    export = load_export(str(cobra_export["out"]))
    b, history, times, query_time = next(histories_of(decoded["batch"]))
    got = export.retrieve(history, k=K, timestamps=times, query_time=query_time, raw_ids=False)
    assert got.ids.tolist() == decoded["tops"]["beam"].items[b].tolist()  # eval.decoder=beam, beam_size=3, sum


def test_long_history_encodes_the_recent_steps_and_filters_all(cobra_export, decoded):
    """Past ``max_len`` steps the encoder sees the most recent ones (as evaluation batches
    hold them); every given item is still kept out of the list."""
    from sidvid_rec.export.cobra import HistoryBatch
    from sidvid_rec.export.serving import load_export

    export = load_export(str(cobra_export["out"]))
    history = list(range(1, 31))
    times = [1000 * i for i in range(1, 31)]
    cobra = export.cobra.context.model
    long_inputs = cobra.prepare(HistoryBatch.single(history, times, 40_000))
    short_inputs = cobra.prepare(HistoryBatch.single(history[-12:], times[-12:], 40_000))
    assert torch.equal(long_inputs.layout.timestamps, short_inputs.layout.timestamps)
    assert torch.equal(long_inputs.sid_tokens, short_inputs.sid_tokens)
    assert torch.equal(long_inputs.vid_tokens, short_inputs.vid_tokens)
    got = export.retrieve(history, k=K, timestamps=times, query_time=40_000, raw_ids=False, decoder="direct")
    assert len(set(got.ids.tolist())) == K and not set(got.ids.tolist()) & set(history)


def test_cli_prints_one_json_object(cobra_export, decoded, capsys):
    data = decoded["data"]
    b, history, times, query_time = next(histories_of(decoded["batch"]))
    expected = decoded["tops"]["soft"].items[b][:5].tolist()
    argv = ["retrieve", str(cobra_export["out"]), "--history", ",".join(str(data.item_raw_ids[i]) for i in history),
            "--timestamps", ",".join(map(str, times)), "--query-time", str(query_time), "--k", "5",
            "--decoder", "soft"]
    capsys.readouterr()
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    items = json.loads(lines[0])["items"]
    assert [set(it) for it in items] == [{"item_id", "title", "score"}] * 5
    assert [it["item_id"] for it in items] == [int(data.item_raw_ids[i]) for i in expected]
    assert [it["title"] for it in items] == [data.item_title[i] for i in expected]
    assert [it["score"] for it in items] == sorted((it["score"] for it in items), reverse=True)


def test_bad_cobra_exports_are_refused_in_one_line(cobra_export, tmp_path, capsys):
    out = cobra_export["out"]
    capsys.readouterr()
    assert main(["retrieve", str(out), "--history", "1", "--k", "0"]) == 2
    assert "--k must be positive" in capsys.readouterr().err

    stale = tmp_path / "stale"  # an export written before COBRA retrieval had no cobra section
    shutil.copytree(out, stale)
    manifest = json.loads((stale / "manifest.json").read_text())
    del manifest["cobra"]
    (stale / "manifest.json").write_text(json.dumps(manifest))
    assert main(["retrieve", str(stale), "--history", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lacks manifest section cobra" in err and "export` again" in err


def test_cobra_retrieval_needs_no_training_code(cobra_export):
    """Loading a COBRA export and decoding with every decoder imports neither torchrec nor
    the model/trainer code (fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from sidvid_rec.export.serving import load_export\n"
        f"export = load_export({str(cobra_export['out'])!r})\n"
        f"for kind in {DECODERS!r}:\n"
        "    items = export.retrieve(['1', '50', '260'], k=3, decoder=kind).items\n"
        "    assert len(items) == 3, items\n"
        "bad = [m for m in sys.modules if m.startswith(('torchrec', 'sidvid_rec.train', 'sidvid_rec.models'))]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
