"""Batch recommendation from an export: the top-K after every user's whole history, to a file.

``sidvid-rec recommend EXPORT --users FILE|all --k K --out F`` (see :mod:`sidvid_rec.cli.recommend_cmd`)
reads each user's history from the data set the run was trained on (the export manifest's
``data`` section; ``data.key=value`` overrides, e.g. ``data.path=`` a newer copy of the data),
encodes the whole history (the most recent ``max_len`` items, as ``retrieve`` does; the query
time is the last item's time) and writes one row per user: ``user_id`` (the data set's raw id),
``item_ids`` (raw ids, best first, as ``retrieve`` reports them) and ``scores``. ``.parquet`` or
``.jsonl`` by the output's extension.

Resumable: users are cut into chunks of ``chunk_users``; each chunk's rows are written to a part
file under ``.<out name>.parts/`` next to the output, atomically (a temporary renamed when
complete, :func:`sidvid_rec.storage.atomic_open`). A rerun of the same job (same export, data,
users, K, decoder, chunking: ``job.json`` in that directory) skips the parts already there; a
killed writer's temporary is removed by the next write of its part. The output is assembled
from the parts atomically, then the parts directory is removed. A parts directory of another
job is replaced.

Users file: raw user ids, one per line (blank lines skipped, a repeated id kept once). An id
that is not an integer or not a user of the data set is a one-line error (nothing is written).
A history item the export does not know (``data.path`` overridden with newer data) is left out
of the history; a user none of whose items the export knows gets an empty row.
"""

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from sidvid_rec import storage
from sidvid_rec.config import DataConfig, config_from_dict, parse_override
from sidvid_rec.data import SequenceData, load_sequences
from sidvid_rec.errors import ArtifactError, ConfigError, DataError
from sidvid_rec.export.serving import ExportedModel, load_export
from sidvid_rec.types import MISSING_ID, RecommendOutput

OUTPUT_SUFFIXES = (".parquet", ".jsonl")
PARTS_VERSION = 1


def output_kind(out: str) -> RecommendOutput:
    """``.parquet`` or ``.jsonl``: the format of ``out``; any other ending is a one-line error."""
    ext = os.path.splitext(out)[1].lower()
    if ext not in OUTPUT_SUFFIXES:
        raise DataError(f"--out {out}: the output must end in .parquet or .jsonl")
    return ext  # type: ignore[return-value]


def data_config(manifest: Dict[str, Any], overrides: Sequence[str]) -> DataConfig:
    """The data config of the export's run (its manifest's ``data`` section), with ``data.*`` overrides."""
    section = manifest.get("data")
    if not isinstance(section, dict):
        if not any(t.strip().startswith("data.path=") for t in overrides):
            raise ArtifactError("this export does not record its data set (exported before `recommend`); "
                                "pass data.path=... (and data.format=...) or export the run again")
        section = {}
    raw: Dict[str, Dict[str, Any]] = {"data": dict(section)}
    for text in overrides:
        key_section, key, value = parse_override(text)
        if key_section != "data":
            raise ConfigError(f"recommend takes data.* overrides only, got {key_section}.{key}")
        raw["data"][key] = value
    return config_from_dict(raw).data


def read_users(path: str, data: SequenceData) -> np.ndarray:
    """Indices into ``data``'s users of the raw ids in the text file ``path`` (file order, first
    occurrence kept); a bad or unknown id is a one-line :class:`DataError`."""
    try:
        with storage.open_file(path, "r") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the users file {path}: {getattr(e, 'strerror', None) or e}")
    ids, line_nos = [], []
    for n, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        try:
            value = int(text)
        except ValueError:
            raise DataError(f"{path}: line {n}: {text[:40]!r} is not an integer user id")
        if not -(2**63) <= value < 2**63:
            raise DataError(f"{path}: line {n}: user id {value} is out of the int64 range")
        ids.append(value)
        line_nos.append(n)
    if not ids:
        raise DataError(f"{path} holds no user ids (one raw user id per line)")
    raw = np.asarray(ids, dtype=np.int64)
    index = np.searchsorted(data.user_raw_ids, raw).clip(max=data.num_users - 1)
    unknown = np.flatnonzero(data.user_raw_ids[index] != raw)
    if unknown.size:
        first = int(unknown[0])
        raise DataError(f"{path}: line {line_nos[first]}: user {ids[first]} is not in the data set "
                        f"({unknown.size} of the file's ids are unknown; {data.num_users} users)")
    _, first_seen = np.unique(index, return_index=True)
    return index[np.sort(first_seen)]


def item_map(data: SequenceData, model: ExportedModel) -> np.ndarray:
    """``[N_data + 1]`` int64: the export's internal id of each of ``data``'s items (0 = unknown)."""
    export_raw = np.asarray([int(r) for r in model.raw_ids[1:]], dtype=np.int64)
    order = np.argsort(export_raw, kind="stable")
    sorted_raw = export_raw[order]
    wanted = data.item_raw_ids[1:]
    pos = np.searchsorted(sorted_raw, wanted).clip(max=max(sorted_raw.size - 1, 0))
    found = sorted_raw[pos] == wanted
    out = np.zeros(data.num_items + 1, dtype=np.int64)
    out[1:][found] = order[pos[found]] + 1
    return out


@dataclass
class RecommendJob:
    """One batch-recommendation job: what to compute and where its parts go."""

    model: ExportedModel
    data: SequenceData
    users: np.ndarray  # [U'] indices into data's users
    k: int
    out: str
    batch_size: int
    chunk_users: int
    decoder: Optional[str]
    progress: bool = True

    def __post_init__(self) -> None:
        self.kind = output_kind(self.out)
        head, tail = os.path.split(self.out)
        self.parts_dir = os.path.join(head, f".{tail}.parts")
        self.to_export = item_map(self.data, self.model)
        self.raw_items = np.asarray([int(r) for r in self.model.raw_ids], dtype=np.int64)
        self.num_parts = (self.users.size + self.chunk_users - 1) // self.chunk_users

    # -- identity of the job (a rerun resumes only the same job)

    def key(self) -> Dict[str, Any]:
        users = hashlib.sha256(self.users.astype(np.int64).tobytes()).hexdigest()
        with storage.open_file(os.path.join(self.model.directory, "manifest.json"), "rb") as f:
            manifest = hashlib.sha256(f.read()).hexdigest()
        return {"version": PARTS_VERSION, "export_manifest_sha256": manifest, "data": self.data.fingerprint,
                "users_sha256": users, "k": self.k, "decoder": self.decoder, "chunk_users": self.chunk_users,
                "format": self.kind}

    def part_path(self, index: int) -> str:
        return os.path.join(self.parts_dir, f"part-{index:06d}{self.kind}")

    def open_parts(self) -> int:
        """Creates (or reuses, for the same job) the parts directory; returns the parts already done."""
        key, job_file = self.key(), os.path.join(self.parts_dir, "job.json")
        if storage.exists(self.parts_dir):
            previous = None
            if storage.exists(job_file):
                try:
                    previous = storage.read_json(job_file)
                except ArtifactError:
                    previous = None
            if previous is None and any(not n.startswith((".part-", "part-", "job.json", ".job.json")) for n in storage.ls(self.parts_dir)):
                raise DataError(f"{self.parts_dir} exists and was not written by `recommend`; remove it")
            if previous != key:
                storage.remove_tree(self.parts_dir)
        if not storage.exists(job_file):
            storage.mkdirs(self.parts_dir)
            storage.write_json(job_file, key)
        return sum(storage.exists(self.part_path(i)) for i in range(self.num_parts))

    # -- computing

    def rows(self, users: np.ndarray) -> List[Dict[str, Any]]:
        """The output rows of ``users`` (indices into the data's users, in that order), in batches
        of users of similar history length (a batch's search over-fetches K + its longest history)."""
        lengths = self.data.offsets[users + 1] - self.data.offsets[users]
        order = np.argsort(lengths, kind="stable")
        rows: List[Dict[str, Any]] = [{} for _ in range(users.size)]
        for lo in range(0, users.size, self.batch_size):
            picked = order[lo:lo + self.batch_size]
            for j, row in zip(picked, self._batch_rows(users[picked])):
                rows[j] = row
        return rows

    def _batch_rows(self, users: np.ndarray) -> List[Dict[str, Any]]:
        starts, ends = self.data.offsets[users], self.data.offsets[users + 1]
        lengths = ends - starts
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        items = self.to_export[self.data.item_values[gather]]
        times = self.data.timestamps[gather]
        known = items > 0
        seg = np.repeat(np.arange(users.size), lengths)
        kept_lengths = np.bincount(seg[known], minlength=users.size)
        has = kept_lengths > 0
        ids = np.empty((users.size, 0), dtype=np.int64)
        scores = np.empty((users.size, 0), dtype=np.float32)
        if has.any():
            keep_rows = known & has[seg]
            new_offsets = np.concatenate([[0], np.cumsum(kept_lengths[has])])
            top_ids, top_scores = self.model.top_k_batch(
                torch.from_numpy(items[keep_rows]), torch.from_numpy(times[keep_rows]),
                torch.from_numpy(new_offsets.astype(np.int64)), self.k, decoder=self.decoder)
            ids = np.full((users.size, top_ids.shape[1]), MISSING_ID, dtype=np.int64)
            scores = np.zeros((users.size, top_ids.shape[1]), dtype=np.float32)
            ids[has], scores[has] = top_ids.numpy(), top_scores.float().numpy()
        out = []
        for b, user in enumerate(users):
            valid = ids[b] != MISSING_ID
            out.append({"user_id": int(self.data.user_raw_ids[user]),
                        "item_ids": self.raw_items[ids[b][valid]].tolist(),
                        "scores": [round(float(s), 6) for s in scores[b][valid]]})
        return out

    # -- files

    def write_part(self, index: int) -> int:
        users = self.users[index * self.chunk_users:(index + 1) * self.chunk_users]
        rows = self.rows(users)
        with storage.atomic_open(self.part_path(index), "wb") as f:
            _write_rows(rows, f, self.kind)
        return users.size

    def assemble(self) -> None:
        with storage.atomic_open(self.out, "wb") as f:
            if self.kind == ".jsonl":
                for i in range(self.num_parts):
                    with storage.open_file(self.part_path(i), "rb") as part:
                        shutil.copyfileobj(part, f)
            else:
                import pyarrow.parquet as pq

                with pq.ParquetWriter(f, _schema()) as writer:
                    for i in range(self.num_parts):
                        with storage.open_file(self.part_path(i), "rb") as part:
                            writer.write_table(pq.read_table(part, schema=_schema(), use_threads=False))
        storage.remove_tree(self.parts_dir)

    def run(self) -> Dict[str, Any]:
        from tqdm import tqdm

        resumed = self.open_parts()
        with tqdm(total=int(self.users.size), unit="user", desc="recommend", disable=not self.progress,
                  file=sys.stderr) as bar:
            for i in range(self.num_parts):
                if storage.exists(self.part_path(i)):
                    bar.update(min(self.chunk_users, int(self.users.size) - i * self.chunk_users))
                    continue
                bar.update(self.write_part(i))
        self.assemble()
        return {"out": self.out, "users": int(self.users.size), "k": self.k, "parts": self.num_parts,
                "resumed_parts": resumed, "decoder": self.decoder}


def _schema():
    import pyarrow as pa

    return pa.schema([("user_id", pa.int64()), ("item_ids", pa.list_(pa.int64())),
                      ("scores", pa.list_(pa.float64()))])


def _write_rows(rows: List[Dict[str, Any]], f, kind: str) -> None:
    if kind == ".jsonl":
        f.write("".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=_schema())
    pq.write_table(table, f)


def make_job(export_dir: str, users: str, k: int, out: str, batch_size: int = 256, chunk_users: int = 10_000,
             decoder: Optional[str] = None, overrides: Sequence[str] = (), progress: bool = True) -> RecommendJob:
    """Loads the export and the histories and checks every argument (nothing is written yet)."""
    out = storage.expand(out)
    output_kind(out)
    for name, value in (("--k", k), ("--batch-size", batch_size), ("--chunk-users", chunk_users)):
        if value <= 0:
            raise DataError(f"{name} must be positive, got {value}")
    if users != "all" and not storage.exists(storage.expand(users)):
        raise DataError(f"users file does not exist: {users} (give a file of raw user ids, or `all`)")
    model = load_export(export_dir)
    if decoder is not None and model.cobra is None:
        raise ConfigError(f"--decoder applies to COBRA exports; this export is mode {model.mode}")
    data = load_sequences(data_config(model.manifest, overrides))
    if data.fingerprint != model.manifest.get("data_fingerprint"):
        print(f"warning: the histories come from other data than the run's (fingerprint {data.fingerprint}, the "
              f"export's {model.manifest.get('data_fingerprint')}); items the export does not know are left out",
              file=sys.stderr)
    index = np.arange(data.num_users) if users == "all" else read_users(storage.expand(users), data)
    return RecommendJob(model, data, index.astype(np.int64), k, out, batch_size, chunk_users, decoder, progress)
