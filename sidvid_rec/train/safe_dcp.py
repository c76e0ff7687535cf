"""Reading ``torch.distributed.checkpoint`` metadata without running code from it.

DCP's ``FileSystemReader.read_metadata`` unpickles the ``.metadata`` file, so a crafted run
directory would run its author's code. :class:`SafeFileSystemReader` reads it through an
unpickler that resolves only the metadata's own data classes (an allow-list matched by exact
name); shards are read by DCP with ``torch.load(weights_only=True)``. Hand-written because
neither torch nor DCP offers a restricted metadata reader. Used by :mod:`sidvid_rec.train.checkpoint`,
which also verifies every file against the checkpoint's sha256 manifest before this runs.
"""

import importlib
import os
import pickle
from typing import IO, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from sidvid_rec.errors import ArtifactError


def _describe(e: BaseException) -> str:
    """``Type: first line`` of an exception, looking inside DCP's per-rank ``CheckpointException``."""
    e = _unwrap(e)
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _unwrap(e: BaseException) -> BaseException:
    """The first rank's original exception of a ``CheckpointException`` (``failures``: rank -> (exc, tb))."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        inner = first[0] if isinstance(first, tuple) and first else first
        if isinstance(inner, BaseException):
            return inner
    return e


_METADATA_GLOBALS = frozenset({
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # torch.strided & co. pickle as _get_layout("torch.strided")
    *((module, name) for module in ("pathlib", "pathlib._local")  # StorageMeta.checkpoint_id
      for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
    ("collections", "OrderedDict"),
})
"""The globals a DCP ``Metadata`` pickle refers to: data classes, enums and harmless constructors."""
_DTYPES = frozenset(name for name, value in vars(torch).items() if isinstance(value, torch.dtype))


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file and nothing else: any global outside the allow-list
    (a function such as ``os.system``, a class with side effects) is refused, so a crafted
    file cannot run code. Names are matched exactly, so no dotted path reaches further."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return getattr(importlib.import_module(module), name)
        if module == "torch" and name in _DTYPES:
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of checkpoint metadata)")


def load_metadata(f: IO[bytes]) -> Metadata:
    """A DCP ``Metadata`` from an open ``.metadata`` file, through :class:`_MetadataUnpickler`."""
    metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose metadata goes through the restricted unpickler, not ``pickle.load``.

    Errors are one-line :class:`ArtifactError` s. Shards are read by the base class, with
    ``torch.load(weights_only=True)``.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")  # DCP passes it when ranks wrote their own metadata files
        path = os.path.join(self.path, ".metadata" if rank is None else f"__{rank}.metadata")
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = load_metadata(f)
        except Exception as e:  # noqa: BLE001  (a refused global, a truncated or foreign file)
            raise ArtifactError(f"checkpoint data {path} is unreadable ({_describe(e)})")
        # As FileSystemReader.read_metadata does: DCP keys this load by the reader's id.
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
