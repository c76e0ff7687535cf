"""Export a trained run for retrieval: gathered tables, dense weights, FAISS index, manifest.

``export_run(run_dir, out)`` reads a checkpoint's shards (written by any number of ranks)
into full tensors in this one process, rebuilds the unsharded model on the CPU to compute
every item's vector, and writes the directory described in
:mod:`sidvid_rec.export.format` atomically (built in a temporary directory, renamed
into place), with the sha256 of every file in ``manifest.json``. Tables are cut back from
their stored width (a multiple of 4, for fbgemm) to ``model.dim``.

Example::

    summary = export_run("runs/demo", "runs/demo/export")
    model = load_export("runs/demo/export")   # sidvid_rec.export.serving
"""

import dataclasses
import json
import os
from typing import Any, Dict, Sequence

import safetensors.torch
import torch

from sidvid_rec import artifacts, storage
from sidvid_rec.config import Config, DecoderSettings, load_run_config, narrow
from sidvid_rec.data import SequenceData, load_sequences
from sidvid_rec.errors import ArtifactError
from sidvid_rec.export import format as ex
from sidvid_rec.export.cobra import cobra_manifest_section
from sidvid_rec.export.sid_gen import sid_gen_manifest_section
from sidvid_rec.models.build import build_model
from sidvid_rec.modules.hstu import HSTUParams
from sidvid_rec.retrieval.faiss_index import VidIndex
from sidvid_rec.train import checkpoint as ckpt
from sidvid_rec.types import decodes, generates_sids, uses_sids
TABLE_PREFIX = "embeddings.ebc.embedding_bags."
"""State-dict prefix of the TorchRec tables (``<prefix><table>.weight``)."""


def _record_path(run_dir: str, which: str) -> str:
    if which == "best":
        return ckpt.best_checkpoint(run_dir)
    if which == "latest":
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is None:
            raise ArtifactError(f"run directory {run_dir} has no checkpoint; train first")
        return latest
    return which  # an explicit record path


def split_state(state: Dict[str, torch.Tensor], dim: int) -> Dict[str, Dict[str, torch.Tensor]]:
    """``{"tables": {table: [rows, dim]}, "dense": {name: tensor}}`` from a full model state dict."""
    tables, dense = {}, {}
    for key, value in state.items():
        if key.startswith(TABLE_PREFIX) and key.endswith(".weight"):
            tables[key[len(TABLE_PREFIX):-len(".weight")]] = value[:, :dim].contiguous()
        else:
            dense[key] = value.contiguous()
    return {"tables": tables, "dense": dense}


def _items_json(data: SequenceData) -> bytes:
    raw = [r.item() if hasattr(r, "item") else r for r in data.item_raw_ids]
    return json.dumps({"raw_ids": raw, "titles": list(data.item_title)}, ensure_ascii=False).encode("utf-8")


def _copy_tree(src: str, dst: str) -> None:
    storage.mkdirs(dst)
    for name in storage.ls(src):
        path = os.path.join(src, name)
        if storage.isdir(path):
            _copy_tree(path, os.path.join(dst, name))
            continue
        with storage.open_file(path, "rb") as f, storage.open_file(os.path.join(dst, name), "wb") as g:
            g.write(f.read())


def _manifest(cfg: Config, data: SequenceData, record: ckpt.CheckpointRecord, run_dir: str,
              tables: Dict[str, torch.Tensor], encoder: HSTUParams) -> Dict[str, Any]:
    m = cfg.model
    metrics_path = os.path.join(run_dir, "metrics.json")
    return {
        "format": ex.FORMAT, "format_version": ex.FORMAT_VERSION,
        "source": {"run_dir": storage.expand(run_dir), "checkpoint": record.name, "epoch": record.epoch,
                   "step": record.step, "fingerprint": record.fingerprint, "world_size": record.world_size},
        "model": {"mode": m.mode, "dim": m.dim, "fusion": m.fusion, "sid_table_size": m.sid_table_size},
        "encoder": encoder.inference_dict(),
        "num_items": data.num_items, "data_fingerprint": data.fingerprint, "data_format": data.format,
        "data": data_section(cfg),
        "ids": "retrieve takes and prints the data set's raw item ids (items.json raw_ids); tensors are "
               "indexed by internal ids 1..N (row 0 = padding)",
        "filter_history": cfg.eval.filter_history,
        "tables": {name: list(t.shape) for name, t in tables.items()},
        "index": {"kind": cfg.retrieval.index, "vectors": "L2-normalised item vectors", "count": data.num_items,
                  "ef_search": cfg.retrieval.ef_search, "nprobe": cfg.retrieval.nprobe},
        "metrics": storage.read_json(metrics_path) if storage.exists(metrics_path) else None,
    }


def data_section(cfg: Config) -> Dict[str, Any]:
    """The manifest's ``data`` section: the run's ``data`` config with its paths made absolute, so
    that ``sidvid-rec recommend`` reads the histories of the data set the run was trained on."""
    section = dataclasses.asdict(cfg.data)
    for key in ("path", "items_path"):
        section[key] = storage.expand(section[key]) if section[key] else ""
    return section


def _cobra_section(cfg: Config, module: torch.nn.Module) -> Dict[str, Any]:
    """The manifest's ``cobra`` section: what decoding needs besides the tensors (the model's
    own temperature and query-time rule, the history length, the run's decoder defaults)."""
    return cobra_manifest_section(cfg.data.max_len, module.query_time, module.temperature, cfg.eval.decoder,
                                  narrow(cfg.eval, DecoderSettings), sid_head=cfg.model.cobra_sid_head)


def export_run(run_dir: str, out: str, checkpoint: str = "best", overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Writes the export of ``run_dir``'s ``checkpoint`` (``best``, ``latest`` or a record path) to ``out``.

    ``overrides``: ``eval.*`` / ``retrieval.*`` settings (index kind, history filtering, and
    for COBRA the default decoder and its settings recorded in the manifest).
    Returns a summary (paths, shapes). Nothing is left at ``out`` unless the whole export
    was written.
    """
    out = storage.expand(out)
    # Refuse before any work: the export replaces ``out`` whole, so it must be absent, empty or
    # an earlier export (never a run directory, a folder of other files or a regular file).
    artifacts.check_replaceable(out, ex.FORMAT)
    cfg = load_run_config(run_dir, overrides, command="export")
    data = load_sequences(cfg.data)
    fingerprint = ckpt.model_fingerprint(cfg, data.num_items)
    record, full = ckpt.read_full_tensors(_record_path(run_dir, checkpoint), "model.", fingerprint, data.fingerprint)
    module = build_model(cfg, data, table_device="cpu")
    for key, tensor in module.state_dict().items():  # a size change named by its cause (e.g. the SIDs)
        if key in full and tuple(full[key].shape) != tuple(tensor.shape):
            raise ArtifactError(ckpt.shape_mismatch(f"{record.name} of {run_dir}", key, tuple(full[key].shape),
                                                    tuple(tensor.shape), record))
    try:
        module.load_state_dict(full)
    except RuntimeError as e:
        raise ArtifactError(f"checkpoint {record.name} of {run_dir} does not fit its config "
                            f"({str(e).splitlines()[0][:160]})")
    module.eval()
    parts = split_state(full, cfg.model.dim)
    vectors = module.export_vectors()
    # The saved index is a CPU one: a GPU is the serving machine's business, not the file's.
    index = VidIndex.from_config(vectors["candidates"][1:], torch.arange(1, data.num_items + 1), cfg.retrieval,
                                 use_gpu=False)
    blobs = {
        ex.TABLES: safetensors.torch.save(parts["tables"]),
        ex.DENSE: safetensors.torch.save(parts["dense"]),
        ex.ITEM_VECTORS: safetensors.torch.save({"item_vectors": vectors["inputs"],
                                                 **{k: v for k, v in vectors.items() if k.startswith("sid_")}}),
        ex.ITEMS: _items_json(data),
    }
    manifest = _manifest(cfg, data, record, run_dir, parts["tables"], module.encoder.params)  # COBRA: 2 tokens/item
    if decodes(cfg.model.mode):  # id/sid/sid_id manifests are unchanged
        manifest["cobra"] = _cobra_section(cfg, module)
    if generates_sids(cfg.model.mode):
        manifest["sid_gen"] = sid_gen_manifest_section(cfg.data.max_len, module.num_levels, module.temperature,
                                                       cfg.eval.sid_gen_beam, cfg.eval.kv_cache,
                                                       module.prefix_inputs, module.item_output,
                                                       module.node_output)
    with storage.atomic_dir(out) as tmp:
        index.save(os.path.join(tmp, ex.INDEX))
        for name, blob in blobs.items():
            with storage.open_file(os.path.join(tmp, name), "wb") as f:
                f.write(blob)
        if uses_sids(cfg.model.mode):
            _copy_tree(storage.expand(cfg.sids.dir), os.path.join(tmp, ex.SIDS_DIR))
        files = ex.list_files(tmp)
        manifest["files"] = artifacts.file_hashes(tmp, files)
        storage.write_json(os.path.join(tmp, ex.MANIFEST), manifest)
    return {"out": out, "checkpoint": record.name, "epoch": record.epoch, "items": data.num_items,
            "tables": manifest["tables"], "files": len(files) + 1}
