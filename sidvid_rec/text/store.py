"""The ``sidvid-rec embed`` artifact: item embeddings ``[N+1, D]`` plus a JSON manifest.

``OUT`` is either a file (``*.safetensors`` or ``*.npz``; the manifest goes next to it as
``<stem>.manifest.json``) or a directory (``embeddings.safetensors`` + ``manifest.json``,
replaced as a whole; an existing directory that is not an earlier embeddings artifact is
never replaced). The manifest records the encoder identity, the dim, the data
fingerprint and the sha256 of both the file and the float32 array bytes, which the loader
checks. Row 0 is the padding item (zeros).
"""

import hashlib
import io as _bytes_io
import os
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import numpy as np
import safetensors.numpy

from sidvid_rec import storage
from sidvid_rec.artifacts import check_replaceable
from sidvid_rec.errors import ArtifactError

FORMAT = "sidvid_rec.embeddings"
FORMAT_VERSION = 1
_TENSOR = "embeddings"


@dataclass
class EmbeddingSet:
    """Loaded embeddings: ``vectors [N+1, D]`` float32 (row 0 = padding) and their manifest."""

    vectors: np.ndarray
    manifest: Dict[str, Any]

    @property
    def num_items(self) -> int:
        return int(self.vectors.shape[0] - 1)


def array_sha256(x: np.ndarray) -> str:
    """sha256 of the C-contiguous float32 bytes of ``x`` (independent of the file format)."""
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()


def _is_file_form(out: str) -> bool:
    return out.rstrip("/").endswith((".safetensors", ".npz"))


def embedding_paths(out: str) -> Tuple[str, str]:
    """``(tensor file, manifest file)`` for an ``--out`` value."""
    out = storage.expand(out).rstrip("/")
    if _is_file_form(out):
        return out, os.path.splitext(out)[0] + ".manifest.json"
    return os.path.join(out, "embeddings.safetensors"), os.path.join(out, "manifest.json")


def _encode(path: str, vectors: np.ndarray) -> bytes:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if path.endswith(".npz"):
        buf = _bytes_io.BytesIO()
        np.savez(buf, **{_TENSOR: vectors})
        return buf.getvalue()
    return safetensors.numpy.save({_TENSOR: vectors})


def _decode(path: str, blob: bytes) -> np.ndarray:
    try:
        if path.endswith(".npz"):
            with np.load(_bytes_io.BytesIO(blob), allow_pickle=False) as z:
                return np.asarray(z[_TENSOR], dtype=np.float32)
        return safetensors.numpy.load(blob)[_TENSOR].astype(np.float32)
    except Exception as e:  # noqa: BLE001 - any decode failure is a damaged artifact
        raise ArtifactError(f"{path}: not a readable embeddings file ({type(e).__name__})")


def check_output(out: str) -> None:
    """Raises :class:`UserError` when writing to ``out`` would replace a foreign directory."""
    if not _is_file_form(out):
        check_replaceable(storage.expand(out).rstrip("/"), FORMAT)


def save_embeddings(out: str, vectors: np.ndarray, manifest: Dict[str, Any]) -> Tuple[str, str]:
    """Writes ``vectors [N+1, D]`` and ``manifest`` (completed with shapes and hashes) atomically.

    Returns the tensor and manifest paths.
    """
    tensor_path, manifest_path = embedding_paths(out)
    blob = _encode(tensor_path, vectors)
    full = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION, num_items=int(vectors.shape[0] - 1),
                dim=int(vectors.shape[1]), file=os.path.basename(tensor_path),
                file_sha256=hashlib.sha256(blob).hexdigest(), vectors_sha256=array_sha256(vectors))
    check_output(out)
    if not _is_file_form(out):
        with storage.atomic_dir(storage.expand(out)) as tmp:
            with storage.open_file(os.path.join(tmp, os.path.basename(tensor_path)), "wb") as f:
                f.write(blob)
            storage.write_json(os.path.join(tmp, os.path.basename(manifest_path)), full)
    else:  # file form: the manifest (with the file's hash) is written last
        with storage.atomic_open(tensor_path, "wb") as f:
            f.write(blob)
        storage.write_json(manifest_path, full)
    return tensor_path, manifest_path


def load_embeddings(path: str) -> EmbeddingSet:
    """Loads an ``embed`` output (file or directory); checks format, hash and shape."""
    tensor_path, manifest_path = embedding_paths(path)
    if not storage.exists(tensor_path):
        raise ArtifactError(f"embeddings not found: {tensor_path}")
    manifest = storage.read_json(manifest_path)
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path} is not an embeddings manifest")
    with storage.open_file(tensor_path, "rb") as f:
        blob = f.read()
    if hashlib.sha256(blob).hexdigest() != manifest.get("file_sha256"):
        raise ArtifactError(f"{tensor_path}: sha256 differs from its manifest (file changed or damaged)")
    vectors = _decode(tensor_path, blob)
    if vectors.ndim != 2 or vectors.shape != (manifest.get("num_items", -2) + 1, manifest.get("dim")):
        raise ArtifactError(f"{tensor_path}: shape {tuple(vectors.shape)} does not match its manifest")
    return EmbeddingSet(vectors=vectors, manifest=manifest)
