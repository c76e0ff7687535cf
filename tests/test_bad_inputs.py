"""Every command against bad input: exit 2, exactly one stderr line, no traceback, and the
file tree byte-identical before and after.

One small workspace (data copy, a trained ``id`` run, its export, embeddings, semantic IDs)
is built once; each case damages it in place (restored afterwards), runs one command and
compares a hash of every path under the workspace. The cases follow the defect classes of
the reliability issue: outputs that are not the command's own, crafted or damaged
artifacts, data changed under a run, out-of-range values, malformed files, outputs under a
regular file, and usage errors.
"""

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import pytest

from sidvid_rec.cli import main

EMBEDDED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sidvid_rec", "data", "default",
                        "ml-latest-small")
TINY = ["data.max_len=20", "model.dim=16", "model.dqk=8", "model.dv=8", "model.num_blocks=1", "loss.num_negatives=16",
        "train.batch_size=128", "train.epochs=1", "train.max_steps=2", "eval.batch_size=610", "train.device=cpu"]
SIDS = ["sids.encoder=tfidf", "sids.tfidf_dim=16", "sids.codebook_size=8", "sids.layers=2", "sids.kmeans_iters=3",
        "sids.balance_iters=3"]
BINARY = bytes(range(256)) * 8


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("ws"))
    shutil.copytree(EMBEDDED, os.path.join(root, "data"))
    common = [f"data.path={root}/data", f"data.cache_dir={root}/cache"]
    assert main(["train", "--run-dir", f"{root}/run", *common, *TINY]) == 0
    assert main(["export", f"{root}/run", "--out", f"{root}/export"]) == 0
    assert main(["embed", "--out", f"{root}/emb", "--no-progress", *common, *SIDS]) == 0
    assert main(["sids", "build", "--out", f"{root}/sids", "--embeddings", f"{root}/emb", "--no-progress",
                 *common, *SIDS]) == 0
    os.makedirs(f"{root}/foreign")
    with open(f"{root}/foreign/notes.txt", "w") as f:
        f.write("someone else's file\n")
    with open(f"{root}/plain.txt", "w") as f:
        f.write("a regular file\n")
    return root


def _tree(root: str) -> Dict[str, str]:
    """relative path -> sha256 of a file / 'dir' / 'link:<target>' for everything under root
    but the data cache: it is content-addressed (an entry is keyed by the data's own
    fingerprint, so a reader may add one for data it read, and none is ever wrong)."""
    out = {}
    for top, dirs, files in os.walk(root):
        if top == root:
            dirs[:] = [d for d in dirs if d != "cache"]
        for name in dirs + files:
            path = os.path.join(top, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = "link:" + os.readlink(path)
            elif os.path.isdir(path):
                out[rel] = "dir"
            else:
                with open(path, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


# ----------------------------------------------------------------------------- damage, undone after each case


@contextlib.contextmanager
def _edited(ws: str, rel: str, change: Callable[[bytes], bytes]) -> Iterator[None]:
    path = os.path.join(ws, rel)
    with open(path, "rb") as f:
        original = f.read()
    with open(path, "wb") as f:
        f.write(change(original))
    try:
        yield
    finally:
        with open(path, "wb") as f:
            f.write(original)


@contextlib.contextmanager
def _created(ws: str, rel: str, content: Optional[bytes]) -> Iterator[None]:
    """A new file (or, with None, a directory) at ``rel``, removed after."""
    path = os.path.join(ws, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if content is None:
        os.makedirs(path)
    else:
        with open(path, "wb") as f:
            f.write(content)
    try:
        yield
    finally:
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _json_edit(edit: Callable[[dict], object]) -> Callable[[bytes], bytes]:
    def change(raw: bytes) -> bytes:
        value = json.loads(raw)
        result = edit(value)
        return json.dumps(value if result is None else result).encode()
    return change


def _first_shard(ws: str) -> str:
    data = os.path.join(ws, "run", "checkpoints")
    for top, _, files in os.walk(data):
        for name in sorted(files):
            if name.endswith(".distcp"):
                return os.path.relpath(os.path.join(top, name), ws)
    raise AssertionError("no checkpoint shard found")


def _truncated(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


def _changed_rating(raw: bytes) -> bytes:
    lines = raw.split(b"\n")
    user, item, rating, ts = lines[1].split(b",")
    lines[1] = b",".join([user, item, b"1.0" if rating != b"1.0" else b"2.0", ts])
    return b"\n".join(lines)


# ----------------------------------------------------------------------------- the table


@dataclass
class Case:
    name: str
    argv: List[str]
    message: str
    """A fragment the one stderr line must contain."""
    damage: Callable[[str], contextlib.AbstractContextManager] = field(default=lambda ws: contextlib.nullcontext())


def _data(ws: str) -> List[str]:
    return [f"data.path={ws}/data", f"data.cache_dir={ws}/cache"]


CASES = [
    # 1. outputs a command did not write itself are never replaced
    Case("export-into-foreign-dir", ["export", "{ws}/run", "--out", "{ws}/foreign"], "is not an earlier sidvid_rec.export artifact"),
    Case("export-onto-the-run-dir", ["export", "{ws}/run", "--out", "{ws}/run"], "is not an earlier sidvid_rec.export artifact"),
    Case("export-onto-a-regular-file", ["export", "{ws}/run", "--out", "{ws}/plain.txt"], "plain.txt"),
    Case("export-onto-sids", ["export", "{ws}/run", "--out", "{ws}/sids"], "is not an earlier sidvid_rec.export artifact"),
    Case("sids-build-into-foreign-dir", ["sids", "build", "--out", "{ws}/foreign", "--embeddings", "{ws}/emb",
                                         "--no-progress", "@data", *SIDS], "foreign"),
    Case("sids-build-onto-the-export", ["sids", "build", "--out", "{ws}/export", "--embeddings", "{ws}/emb",
                                        "--no-progress", "@data", *SIDS], "export"),
    Case("embed-into-foreign-dir", ["embed", "--out", "{ws}/foreign", "--no-progress", "@data", *SIDS], "foreign"),
    # 2. crafted and damaged checkpoints
    Case("evaluate-truncated-shard", ["evaluate", "{ws}/run"], "sha256",
         lambda ws: _edited(ws, _first_shard(ws), _truncated)),
    Case("export-truncated-shard", ["export", "{ws}/run", "--out", "{ws}/export2"], "sha256",
         lambda ws: _edited(ws, _first_shard(ws), _truncated)),
    Case("evaluate-binary-best-record", ["evaluate", "{ws}/run"], "best.pt",
         lambda ws: _edited(ws, "run/checkpoints/best.pt", lambda raw: BINARY)),
    # 3. export manifests naming files outside the export, or malformed
    Case("retrieve-manifest-path-escapes", ["retrieve", "{ws}/export", "--history", "1,2"], "manifest",
         lambda ws: _edited(ws, "export/manifest.json", _json_edit(
             lambda m: m["files"].update({"../plain.txt": m["files"].pop("dense.safetensors")})))),
    Case("retrieve-manifest-absolute-path", ["retrieve", "{ws}/export", "--history", "1,2"], "manifest",
         lambda ws: _edited(ws, "export/manifest.json", _json_edit(
             lambda m: m["files"].update({f"{ws}/plain.txt": m["files"].pop("dense.safetensors")})))),
    Case("retrieve-binary-manifest", ["retrieve", "{ws}/export", "--history", "1,2"], "manifest",
         lambda ws: _edited(ws, "export/manifest.json", lambda raw: BINARY)),
    Case("retrieve-manifest-not-an-object", ["retrieve", "{ws}/export", "--history", "1,2"], "manifest",
         lambda ws: _edited(ws, "export/manifest.json", lambda raw: b"[1, 2]")),
    Case("retrieve-manifest-without-files", ["retrieve", "{ws}/export", "--history", "1,2"], "not listed in manifest",
         lambda ws: _edited(ws, "export/manifest.json", _json_edit(lambda m: m.pop("files") and None))),
    Case("retrieve-manifest-files-wrong-type", ["retrieve", "{ws}/export", "--history", "1,2"], "file list",
         lambda ws: _edited(ws, "export/manifest.json", _json_edit(lambda m: m.update(files="all")))),
    Case("retrieve-tampered-weights", ["retrieve", "{ws}/export", "--history", "1,2"], "sha256",
         lambda ws: _edited(ws, "export/dense.safetensors", lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]))),
    # 4-5. data changed in place under a trained run
    Case("evaluate-data-changed", ["evaluate", "{ws}/run"], "data",
         lambda ws: _edited(ws, "data/ratings.csv", _changed_rating)),
    Case("export-data-changed", ["export", "{ws}/run", "--out", "{ws}/export2"], "data",
         lambda ws: _edited(ws, "data/ratings.csv", _changed_rating)),
    # 6. out-of-range values, refused before anything is written
    *[Case(f"train-{value}", ["train", "--run-dir", "{ws}/run2", "@data", *TINY, value], value.split("=")[0])
      for value in ["train.lr=0", "train.lr=nan", "train.lr=inf", "loss.temperature=-1", "train.betas=[0.9,1.0]",
                    "train.seed=-1", "train.eval_every=0", "model.num_time_buckets=-3", "loss.queue_size=0",
                    "loss.num_negatives=0", "eval.ks=[]", "eval.ks=[1,5]", "model.dropout=1.5"]],
    Case("evaluate-bad-override", ["evaluate", "{ws}/run", "eval.batch_size=0"], "eval.batch_size"),
    Case("evaluate-model-override", ["evaluate", "{ws}/run", "model.dim=8"], "eval.* and retrieval.*"),
    Case("export-bad-override", ["export", "{ws}/run", "--out", "{ws}/export2", "retrieval.nprobe=0"],
         "retrieval.nprobe"),
    Case("sids-build-bad-codebook", ["sids", "build", "--out", "{ws}/sids2", "--embeddings", "{ws}/emb",
                                     "--no-progress", "@data", *SIDS, "sids.codebook_size=0"], "sids.codebook_size"),
    Case("sids-build-nan-tol", ["sids", "build", "--out", "{ws}/sids2", "--embeddings", "{ws}/emb",
                                "--no-progress", "@data", *SIDS, "sids.tol=nan"], "sids.tol"),
    # 7. malformed files where a command expects its own
    Case("train-binary-config", ["train", "--run-dir", "{ws}/run2", "--config", "{ws}/bad.yaml"], "bad.yaml",
         lambda ws: _created(ws, "bad.yaml", BINARY)),
    Case("train-config-not-a-mapping", ["train", "--run-dir", "{ws}/run2", "--config", "{ws}/bad.yaml"], "bad.yaml",
         lambda ws: _created(ws, "bad.yaml", b"- 1\n- 2\n")),
    Case("train-config-is-a-directory", ["train", "--run-dir", "{ws}/run2", "--config", "{ws}/foreign"], "foreign"),
    Case("evaluate-binary-run-config", ["evaluate", "{ws}/run"], "config.yaml",
         lambda ws: _edited(ws, "run/config.yaml", lambda raw: BINARY)),
    Case("evaluate-run-config-not-a-mapping", ["evaluate", "{ws}/run"], "config.yaml",
         lambda ws: _edited(ws, "run/config.yaml", lambda raw: b"just a string\n")),
    Case("evaluate-run-dir-is-a-file", ["evaluate", "{ws}/plain.txt"], "plain.txt"),
    Case("evaluate-damaged-evaluations", ["evaluate", "{ws}/run"], "evaluations.json",
         lambda ws: _edited(ws, "run/evaluations.json", lambda raw: b"[1]")),
    Case("train-data-path-is-a-file", ["train", "--run-dir", "{ws}/run2", "data.path={ws}/plain.txt",
                                       "data.cache_dir={ws}/cache2", *TINY], "plain.txt"),
    Case("sids-report-not-sids", ["sids", "report", "{ws}/foreign"], "foreign"),
    Case("sids-compare-binary-manifest", ["sids", "compare", "{ws}/sids", "{ws}/sids"], "manifest",
         lambda ws: _edited(ws, "sids/manifest.json", lambda raw: BINARY)),
    Case("sids-build-embeddings-not-embeddings", ["sids", "build", "--out", "{ws}/sids2", "--embeddings",
                                                  "{ws}/foreign", "--no-progress", "@data", *SIDS], "foreign"),
    Case("pipeline-binary-stamps", ["pipeline", "--run-dir", "{ws}/run", "@data", *TINY], "pipeline.json",
         lambda ws: _created(ws, "run/pipeline.json", BINARY)),
    Case("pipeline-stamps-not-a-mapping", ["pipeline", "--run-dir", "{ws}/run", "@data", *TINY], "pipeline.json",
         lambda ws: _created(ws, "run/pipeline.json", b"[]")),
    # 8. outputs under a regular file
    Case("train-run-dir-under-a-file", ["train", "--run-dir", "{ws}/plain.txt/run", "@data", *TINY], "plain.txt"),
    Case("export-out-under-a-file", ["export", "{ws}/run", "--out", "{ws}/plain.txt/x"], "plain.txt"),
    Case("embed-out-under-a-file", ["embed", "--out", "{ws}/plain.txt/e", "--no-progress", "@data", *SIDS],
         "plain.txt"),
    Case("prepare-cache-under-a-file", ["data", "prepare", "{ws}/data", "data.cache_dir={ws}/plain.txt/c"],
         "plain.txt"),
    # 10. usage errors and empty values
    Case("prepare-empty-cache-dir", ["data", "prepare", "{ws}/data", "data.cache_dir="], "data.cache_dir"),
    Case("retrieve-unknown-item", ["retrieve", "{ws}/export", "--history", "1,999999999"], "999999999"),
    Case("retrieve-non-numeric-item", ["retrieve", "{ws}/export", "--history", "1,abc"], "abc"),
    Case("retrieve-non-ascii-digits", ["retrieve", "{ws}/export", "--history", "1,\u0662"], "\u0662"),
    Case("retrieve-id-beyond-int64", ["retrieve", "{ws}/export", "--history", "1,1e30"], "1e30"),
    Case("retrieve-k-zero", ["retrieve", "{ws}/export", "--history", "1,2", "--k", "0"], "--k"),
    Case("retrieve-k-not-a-number", ["retrieve", "{ws}/export", "--history", "1,2", "--k", "ten"], "--k"),
    Case("retrieve-timestamps-mismatch", ["retrieve", "{ws}/export", "--history", "1,2", "--timestamps", "5"],
         "timestamps"),
    # recommend and data convert write one file: never over a directory, nor over a file unasked
    Case("recommend-bad-extension", ["recommend", "{ws}/export", "--out", "{ws}/top.txt"], ".parquet or .jsonl"),
    Case("recommend-onto-an-existing-file", ["recommend", "{ws}/export", "--out", "{ws}/top.jsonl"], "--overwrite",
         lambda ws: _created(ws, "top.jsonl", b"someone's list\n")),
    Case("recommend-onto-a-directory", ["recommend", "{ws}/export", "--out", "{ws}/dir.jsonl"], "is a directory",
         lambda ws: _created(ws, "dir.jsonl", None)),
    Case("recommend-unknown-user", ["recommend", "{ws}/export", "--out", "{ws}/top.jsonl", "--users",
                                    "{ws}/users.txt"], "999999999", lambda ws: _created(ws, "users.txt", b"1\n999999999\n")),
    Case("recommend-binary-users-file", ["recommend", "{ws}/export", "--out", "{ws}/top.jsonl", "--users",
                                         "{ws}/users.txt"], "users.txt", lambda ws: _created(ws, "users.txt", BINARY)),
    Case("recommend-k-zero", ["recommend", "{ws}/export", "--out", "{ws}/top.jsonl", "--k", "0"], "--k"),
    Case("recommend-not-an-export", ["recommend", "{ws}/foreign", "--out", "{ws}/top.jsonl"], "foreign"),
    Case("recommend-model-override", ["recommend", "{ws}/export", "--out", "{ws}/top.jsonl", "model.dim=3"],
         "data.* overrides only"),
    Case("convert-bad-extension", ["data", "convert", "{ws}/data", "--out", "{ws}/x.txt",
                                   "data.cache_dir={ws}/cache"], ".parquet or .csv"),
    Case("convert-onto-an-existing-file", ["data", "convert", "{ws}/data", "--out", "{ws}/x.parquet",
                                           "data.cache_dir={ws}/cache"], "--overwrite",
         lambda ws: _created(ws, "x.parquet", b"not mine to replace")),
    # the most-popular baseline reads and evaluates, and writes nothing but its cache
    Case("baseline-valid-under-gr", ["data", "baseline", "{ws}/data", "--split", "valid", "data.protocol=gr",
                                     "data.cache_dir={ws}/cache"], "no validation split"),
    Case("baseline-unknown-split", ["data", "baseline", "{ws}/data", "--split", "dev"], "--split"),
    Case("baseline-no-data", ["data", "baseline", "{ws}/nothing-here", "data.cache_dir={ws}/cache"], "nothing-here"),
    # serve refuses before it listens
    Case("serve-not-an-export", ["serve", "{ws}/foreign", "--port", "0"], "foreign"),
    Case("serve-tampered-export", ["serve", "{ws}/export", "--port", "0"], "sha256",
         lambda ws: _edited(ws, "export/dense.safetensors", lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]))),
    Case("serve-max-batch-zero", ["serve", "{ws}/export", "--port", "0", "--max-batch", "0"], "--max-batch"),
    Case("serve-port-out-of-range", ["serve", "{ws}/export", "--port", "70000"], "--port"),
    Case("train-without-run-dir", ["train", "@data"], "--run-dir"),
    Case("evaluate-unknown-split", ["evaluate", "{ws}/run", "--split", "dev"], "--split"),
    Case("unknown-command", ["serve-me"], "serve-me"),
    Case("item-ids-outside-sid-gen", ["train", "--run-dir", "{ws}/run2", "@data", "model.sid_gen_item_ids=true"],
         "model.mode=sid_gen"),
    Case("item-output-without-item-ids", ["train", "--run-dir", "{ws}/run2", "@data", "model.mode=sid_gen",
                                          "model.sid_gen_item_output=true"], "model.sid_gen_item_ids=true"),
    Case("node-output-without-item-output", ["train", "--run-dir", "{ws}/run2", "@data", "model.mode=sid_gen",
                                             "model.sid_gen_item_ids=true", "model.sid_gen_node_output=true"],
         "model.sid_gen_item_output=true"),
    Case("attention-block-negative", ["train", "--run-dir", "{ws}/run2", "@data", "train.attention_block=-1"],
         "train.attention_block"),
    Case("unknown-key", ["train", "--run-dir", "{ws}/run2", "@data", "train.no_such_key=1"], "no_such_key"),
]


def _argv(case: Case, ws: str) -> List[str]:
    out: List[str] = []
    for word in case.argv:
        out.extend(_data(ws) if word == "@data" else [word.replace("{ws}", ws)])
    return out


def _run(argv: List[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's usage errors
        return int(e.code)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(ws, case, capsys):
    with case.damage(ws):
        before = _tree(ws)
        capsys.readouterr()
        rc = _run(_argv(case, ws))
        err = capsys.readouterr().err.strip()
        after = _tree(ws)
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert case.message.replace("{ws}", ws) in err, err
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert not changed, changed
