"""Export (tables gathered from the checkpoint's shards, FAISS index, manifest) and retrieve."""

import json
import os

import pytest
import safetensors.torch
import torch

from sidvid_rec.cli import main

TINY = ["train.device=cpu", "data.max_len=20", "model.dim=18", "model.dqk=8", "model.dv=8", "model.num_blocks=1",
        "loss.num_negatives=16", "train.batch_size=128", "train.epochs=1", "train.max_steps=3", "eval.batch_size=610"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny trained run (model.dim=18: tables are stored 20 wide) and its export."""
    root = tmp_path_factory.mktemp("export")
    cache, run, out = str(root / "cache"), root / "run", root / "export"
    assert main(["train", "--run-dir", str(run), f"data.cache_dir={cache}", *TINY]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    return {"root": root, "cache": cache, "run": run, "out": out}


def _trained_model(exported):
    from sidvid_rec.data import load_sequences
    from sidvid_rec.train.distributed import build_sharded_model
    from sidvid_rec.train import checkpoint as ckpt
    from sidvid_rec.process_group import init_distributed
    from sidvid_rec.config import load_run_config

    cfg = load_run_config(str(exported["run"]))
    data = load_sequences(cfg.data)
    model = build_sharded_model(cfg, data, init_distributed("cpu"))
    ckpt.load_model_weights(ckpt.best_checkpoint(str(exported["run"])), model)
    return cfg, data, model


def test_exported_tables_equal_the_trained_model(exported):
    from sidvid_rec.models.build import unwrap
    from sidvid_rec.train.distributed import gather_state_dict

    cfg, data, model = _trained_model(exported)
    state = gather_state_dict(model.state_dict())
    tables = safetensors.torch.load_file(str(exported["out"] / "tables.safetensors"))
    stored = state["embeddings.ebc.embedding_bags.item_id.weight"]
    assert stored.shape == (data.num_items + 1, 20)  # fbgemm width: 18 rounded up to 20
    assert torch.equal(tables["item_id"], stored[:, :18])
    dense = safetensors.torch.load_file(str(exported["out"] / "dense.safetensors"))
    assert set(dense) == set(state) - {"embeddings.ebc.embedding_bags.item_id.weight"}
    assert all(torch.equal(dense[k], state[k]) for k in dense)
    vectors = safetensors.torch.load_file(str(exported["out"] / "item_vectors.safetensors"))["item_vectors"]
    with torch.no_grad():
        assert torch.equal(vectors, unwrap(model).embeddings.all_item_vectors())
    manifest = json.loads((exported["out"] / "manifest.json").read_text())
    assert manifest["tables"] == {"item_id": [data.num_items + 1, 18]}
    assert "cobra" not in manifest  # the COBRA decoding section is written for mode cobra only
    assert set(safetensors.torch.load_file(str(exported["out"] / "item_vectors.safetensors"))) == {"item_vectors"}
    assert set(manifest["files"]) == {"tables.safetensors", "dense.safetensors", "item_vectors.safetensors",
                                      "index.faiss", "items.json"}


def test_retrieve_returns_the_evaluate_top_k(exported, capsys):
    """For real validation users, retrieve's top-10 (raw ids, from the export alone) equals the
    top-10 of the evaluation path (model.query @ item_vectors, history masked)."""
    from sidvid_rec.data import make_split
    from sidvid_rec.data.batches import collate
    from sidvid_rec.eval.ranking import mask_history
    from sidvid_rec.models.build import unwrap
    from sidvid_rec.export.serving import load_export

    cfg, data, model = _trained_model(exported)
    split = make_split(data, "valid", cfg.data.protocol, cfg.data.max_len)
    examples = torch.arange(0, 600, 30).numpy()  # 20 users
    batch = collate(split, examples, torch.ones(len(examples)).numpy())
    module = unwrap(model).eval()
    with torch.no_grad():
        scores = module.query(batch) @ module.item_vectors().T  # [B, N+1]
    scores[:, 0] = float("-inf")
    mask_history(scores, batch)
    expected = scores.topk(10, dim=1).indices

    export = load_export(str(exported["out"]))
    items, times = batch.jagged("item_id"), batch.jagged("timestamp")
    targets = batch.jagged("target_timestamp").values()
    offsets = items.offsets()
    for b in range(len(examples)):
        history = items.values()[offsets[b]:offsets[b + 1]].tolist()
        raw = [data.item_raw_ids[i] for i in history]
        got = export.retrieve(raw, k=10, timestamps=times.values()[offsets[b]:offsets[b + 1]].tolist(),
                              query_time=int(targets[b]))
        assert got.ids.tolist() == expected[b].tolist(), b
        assert [it["item_id"] for it in got.items] == [int(data.item_raw_ids[i]) for i in expected[b]]

    # The CLI prints one JSON object with item_id (raw), title and score, best first.
    history = items.values()[offsets[0]:offsets[1]].tolist()
    argv = ["retrieve", str(exported["out"]), "--history", ",".join(str(data.item_raw_ids[i]) for i in history),
            "--timestamps", ",".join(map(str, times.values()[offsets[0]:offsets[1]].tolist())),
            "--query-time", str(int(targets[0])), "--k", "5"]
    capsys.readouterr()
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert [it["item_id"] for it in out["items"]] == [int(data.item_raw_ids[i]) for i in expected[0][:5]]
    assert out["items"][0]["title"] == data.item_title[int(expected[0][0])]
    scores_out = [it["score"] for it in out["items"]]
    assert scores_out == sorted(scores_out, reverse=True)
    assert main(argv[:-2] + ["--internal-ids", "--history", ",".join(map(str, history))]) == 0
    assert [it["item_id"] for it in json.loads(capsys.readouterr().out)["items"]] == expected[0].tolist()


def _error(capsys, argv):
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err


def test_bad_exports_are_refused_in_one_line(exported, tmp_path, capsys):
    import shutil

    good = exported["out"]
    assert "not an export directory" in _error(capsys, ["retrieve", str(tmp_path), "--history", "1"])
    assert "not in this export's catalogue" in _error(capsys, ["retrieve", str(good), "--history", "1,999999999"])
    assert "--decoder applies to COBRA exports; this export is mode id" in _error(
        capsys, ["retrieve", str(good), "--history", "1", "--decoder", "beam"])

    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    os.remove(missing / "index.faiss")
    assert "missing index.faiss" in _error(capsys, ["retrieve", str(missing), "--history", "1"])

    tampered = tmp_path / "tampered"
    shutil.copytree(good, tampered)
    blob = bytearray((tampered / "dense.safetensors").read_bytes())
    blob[-1] ^= 0x01
    (tampered / "dense.safetensors").write_bytes(bytes(blob))
    assert "dense.safetensors does not match its sha256" in _error(capsys, ["retrieve", str(tampered), "--history", "1"])

    extra = tmp_path / "extra"
    shutil.copytree(good, extra)
    (extra / "planted.bin").write_bytes(b"x")
    assert "planted.bin is not listed" in _error(capsys, ["retrieve", str(extra), "--history", "1"])

    assert "not a run directory" in _error(capsys, ["export", str(tmp_path), "--out", str(tmp_path / "x")])
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(exported["run"] / "config.yaml", untrained / "config.yaml")
    assert "has no checkpoint" in _error(capsys, ["export", str(untrained), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_retrieval_needs_no_training_code(exported):
    """Loading an export and retrieving imports neither torchrec nor the trainer (fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from sidvid_rec.export.serving import load_export\n"
        f"items = load_export({str(exported['out'])!r}).retrieve(['1', '50', '260'], k=3).items\n"
        "assert len(items) == 3, items\n"
        "bad = [m for m in sys.modules if m.startswith(('torchrec', 'sidvid_rec.train', 'sidvid_rec.models'))]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _tree(path):
    """``{relative path: bytes}`` of every file under ``path`` (or of the file itself)."""
    if os.path.isfile(path):
        return {"": open(path, "rb").read()}
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


def test_export_never_replaces_what_it_did_not_write(exported, tmp_path, capsys):
    """``--out`` naming the run directory itself, a folder of other files or a regular file is
    refused in one line with nothing changed; an earlier export is replaced."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    regular = tmp_path / "file.txt"
    regular.write_text("keep me too")
    for target in (exported["run"], foreign, regular):
        before = _tree(str(target))
        assert main(["export", str(exported["run"]), "--out", str(target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "refusing to replace" in err[0], err
        assert _tree(str(target)) == before
    again = tmp_path / "again"
    assert main(["export", str(exported["run"]), "--out", str(again)]) == 0
    assert main(["export", str(exported["run"]), "--out", str(again)]) == 0  # its own earlier export


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/hostname", "fifo"])
def test_manifest_names_only_regular_files_inside_the_export(exported, tmp_path, capsys, name):
    """A manifest naming a path outside the export, an absolute path or a FIFO is refused in one
    line before anything is opened (a FIFO would hang ``retrieve``)."""
    import shutil

    crafted = tmp_path / "crafted"
    shutil.copytree(exported["out"], crafted)
    (tmp_path / "outside.bin").write_bytes(b"secret")
    if name == "fifo":
        os.mkfifo(crafted / "fifo")
    manifest = json.loads((crafted / "manifest.json").read_text())
    manifest["files"][name] = "0" * 64
    (crafted / "manifest.json").write_text(json.dumps(manifest))
    err = _error(capsys, ["retrieve", str(crafted), "--history", "1"])
    assert "not a plain file name inside it" in err or "is not a regular file" in err, err
