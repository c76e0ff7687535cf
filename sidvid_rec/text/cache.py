"""On-disk embedding cache keyed by (encoder identity, sha256 of the text).

Layout: ``<root>/<identity hash>/identity.json`` plus shards ``shard-<uuid>.safetensors``,
each holding ``keys [m, 32]`` uint8 (sha256 of each text) and ``vectors [m, D]`` float32.
A run appends one shard with what it encoded (written atomically, so concurrent runs
never see half a shard); once there are many shards they are merged into one. A damaged
shard is skipped with a warning and its texts are simply encoded again.
"""

import hashlib
import json
import os
import sys
import uuid
from typing import Any, Dict, List, Tuple

import numpy as np
import safetensors.numpy

from sidvid_rec import storage

_MAX_SHARDS = 16  # merge beyond this many shards, so lookups stay a few file reads


def identity_hash(identity: Dict[str, Any]) -> str:
    """Short stable hash of an encoder identity (canonical JSON)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def _key64(keys: np.ndarray) -> np.ndarray:
    """First 8 bytes of each ``[m, 32]`` digest as uint64 ``[m]`` (the sort key)."""
    return np.ascontiguousarray(keys[:, :8]).view("<u8").reshape(-1)


class EmbeddingCache:
    """Vectors of texts already embedded by one encoder identity."""

    def __init__(self, root: str, identity: Dict[str, Any]) -> None:
        self.dir = os.path.join(storage.expand(root), identity_hash(identity))
        self._identity = identity

    def _shards(self) -> List[str]:
        if not storage.exists(self.dir):
            return []
        return [os.path.join(self.dir, n) for n in storage.ls(self.dir)
                if n.startswith("shard-") and n.endswith(".safetensors")]

    def _read_shard(self, path: str) -> Tuple[np.ndarray, np.ndarray]:
        with storage.open_file(path, "rb") as f:
            tensors = safetensors.numpy.load(f.read())
        keys, vectors = tensors["keys"], tensors["vectors"]
        if keys.ndim != 2 or keys.shape[1] != 32 or vectors.shape[0] != keys.shape[0]:
            raise ValueError("bad shapes")
        return keys.astype(np.uint8), vectors.astype(np.float32)

    def _read_all(self) -> Tuple[np.ndarray, np.ndarray, List[str]]:
        """All cached ``keys [M, 32]``, ``vectors [M, D]`` and the shard paths read."""
        keys, vectors, read = [], [], []
        for path in self._shards():
            try:
                k, v = self._read_shard(path)
            except Exception as e:  # noqa: BLE001 - any damage means "not cached"
                print(f"warning: ignoring damaged embedding cache shard {path} ({e})", file=sys.stderr)
                continue
            if vectors and v.shape[1] != vectors[0].shape[1]:
                print(f"warning: ignoring embedding cache shard {path} (dim {v.shape[1]})", file=sys.stderr)
                continue
            keys.append(k)
            vectors.append(v)
            read.append(path)
        if not keys:
            return np.zeros((0, 32), np.uint8), np.zeros((0, 0), np.float32), read
        return np.concatenate(keys), np.concatenate(vectors), read

    def lookup(self, keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """For ``keys [n, 32]``: ``found [n]`` bool and ``vectors [n, D]`` (rows of misses are 0).

        Vectorized: a sorted search on the first 8 key bytes, then a full 32-byte check.
        """
        cached_keys, cached_vectors, _ = self._read_all()
        found = np.zeros(keys.shape[0], dtype=bool)
        if cached_keys.shape[0] == 0:
            return found, np.zeros((keys.shape[0], 0), np.float32)
        order = np.argsort(_key64(cached_keys), kind="stable")
        sorted64 = _key64(cached_keys)[order]
        pos = np.minimum(np.searchsorted(sorted64, _key64(keys)), sorted64.size - 1)
        rows = order[pos]
        found = (cached_keys[rows] == keys).all(axis=1)
        vectors = np.where(found[:, None], cached_vectors[rows], 0.0).astype(np.float32)
        return found, vectors

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Stores ``vectors [m, D]`` under ``keys [m, 32]`` as a new shard (merging if needed)."""
        if keys.shape[0] == 0:
            return
        storage.mkdirs(self.dir)
        identity_path = os.path.join(self.dir, "identity.json")
        if not storage.exists(identity_path):
            storage.write_json(identity_path, self._identity)
        self._write_shard(keys, vectors)
        if len(self._shards()) > _MAX_SHARDS:
            self._merge()

    def _write_shard(self, keys: np.ndarray, vectors: np.ndarray) -> str:
        path = os.path.join(self.dir, f"shard-{uuid.uuid4().hex}.safetensors")
        blob = safetensors.numpy.save({"keys": np.ascontiguousarray(keys, dtype=np.uint8),
                                       "vectors": np.ascontiguousarray(vectors, dtype=np.float32)})
        with storage.atomic_open(path, "wb") as f:
            f.write(blob)
        return path

    def _merge(self) -> None:
        """Rewrites all shards as one; the old ones are removed only after the new one exists."""
        keys, vectors, read = self._read_all()
        _, first = np.unique(keys, axis=0, return_index=True)
        first.sort()
        self._write_shard(keys[first], vectors[first])
        for path in read:
            storage.remove_tree(path)
