"""File access through iopath, with atomic writes.

Every path in the package goes through :data:`path_manager`, so artifacts can live on any
storage for which an iopath handler is registered (local disk by default). Writers never
leave half-written files: they write to a temporary sibling and rename it into place.
"""

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from typing import Any, Iterator, IO

from iopath.common.file_io import PathManager

from sidvid_rec.errors import ArtifactError

path_manager = PathManager()


def expand(path: str) -> str:
    """Expands ``~`` and environment variables of local paths; other URIs pass through."""
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(os.path.expandvars(path)))


def exists(path: str) -> bool:
    return path_manager.exists(path)


def isdir(path: str) -> bool:
    return path_manager.isdir(path)


def ls(path: str) -> list:
    return sorted(path_manager.ls(path))


def mkdirs(path: str) -> None:
    path_manager.mkdirs(path)


def open_file(path: str, mode: str = "r", **kwargs: Any) -> IO:
    return path_manager.open(path, mode, **kwargs)


def replace(src: str, dst: str) -> None:
    """Moves ``src`` over ``dst`` (atomic ``os.replace`` on local disk; iopath ``mv`` elsewhere)."""
    if "://" not in src and "://" not in dst:
        os.replace(src, dst)
        return
    if path_manager.exists(dst):
        path_manager.rm(dst)
    path_manager.mv(src, dst)


def _temp_sibling(path: str) -> str:
    head, tail = os.path.split(path.rstrip("/"))
    return os.path.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Opens a temporary sibling of ``path`` for writing; renames it to ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    if "r" in mode or "a" in mode:
        raise ValueError("atomic_open is for writing only")
    parent = os.path.dirname(path.rstrip("/"))
    if parent:
        mkdirs(parent)
    tmp = _temp_sibling(path)
    try:
        with path_manager.open(tmp, mode, **kwargs) as f:
            yield f
            if hasattr(f, "flush"):
                f.flush()
            if hasattr(f, "fileno"):
                with contextlib.suppress(OSError, ValueError):
                    os.fsync(f.fileno())
        replace(tmp, path)
    finally:
        if path_manager.exists(tmp):
            path_manager.rm(tmp)


def write_json(path: str, obj: Any) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path: str) -> Any:
    if not exists(path):
        raise ArtifactError(f"missing file: {path}")
    with open_file(path, "r") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})")


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yields a temporary directory that replaces ``path`` as a whole on success.

    Used for multi-file artifacts (semantic IDs, exports, checkpoints): readers see either
    the old directory or the complete new one, never a mixture. Local paths only use
    ``os.replace``; other iopath backends fall back to copy-then-remove.
    """
    path = path.rstrip("/")
    tmp = _temp_sibling(path)
    mkdirs(tmp)
    try:
        yield tmp
        old = None
        if exists(path):
            old = _temp_sibling(path) + ".old"
            replace(path, old)
        replace(tmp, path)
        if old is not None:
            remove_tree(old)
    finally:
        if exists(tmp):
            remove_tree(tmp)


def remove_tree(path: str) -> None:
    local = path_manager.get_local_path(path) if "://" in path else path
    if os.path.isdir(local):
        shutil.rmtree(local, ignore_errors=True)
    elif exists(path):
        path_manager.rm(path)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open_file(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
