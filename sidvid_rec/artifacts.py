"""Manifests and sha256 checks: the one implementation every artifact uses (embeddings, semantic
IDs, checkpoints, exports).

An artifact directory holds files plus a ``manifest.json`` naming its ``format`` and
``format_version`` and, under ``files``, the sha256 of each file it vouches for. A reader
checks the format first, then reads each listed file once and compares its hash before
anything is parsed, so a damaged or swapped file is one line (:class:`ArtifactError`), never
a half-loaded model. An unsigned manifest cannot stop someone who rewrites files and hashes
alike; it stops accidents and truncation, and it keeps parsers away from unexpected bytes.

Example::

    manifest = read_manifest(os.path.join(d, "manifest.json"), "sidvid_rec.export", 1, what="export")
    blobs = read_verified(d, manifest["files"], what=f"export {d}")     # {relative path: bytes}
"""

import hashlib
import os
import stat
from typing import Any, Dict, Iterable, List, Optional

from sidvid_rec import storage
from sidvid_rec.errors import ArtifactError, UserError

MANIFEST_FILE = "manifest.json"


def sha256_bytes(blob: bytes) -> str:
    """Hex sha256 of ``blob``."""
    return hashlib.sha256(blob).hexdigest()


def list_files(directory: str, prefix: str = "", exclude: Iterable[str] = (MANIFEST_FILE,)) -> List[str]:
    """Relative paths of every file under ``directory`` (sorted), ``exclude`` left out; a
    symbolic link is listed as a file, never followed (it cannot smuggle in a tree)."""
    out: List[str] = []
    skip = set(exclude)
    for name in storage.ls(os.path.join(directory, prefix) if prefix else directory):
        rel = os.path.join(prefix, name) if prefix else name
        full = os.path.join(directory, rel)
        if storage.isdir(full) and not os.path.islink(full):
            out += list_files(directory, rel, skip)
        elif rel not in skip:
            out.append(rel)
    return sorted(out)


def file_hashes(directory: str, names: Iterable[str]) -> Dict[str, str]:
    """``{name: sha256}`` of the given files of ``directory`` (what a manifest's ``files`` holds)."""
    return {name: storage.sha256_file(os.path.join(directory, name)) for name in names}


def read_manifest(path: str, fmt: str, version: int, what: str, hint: str = "") -> Dict[str, Any]:
    """The JSON mapping at ``path``, refused unless its ``format`` / ``format_version`` match."""
    if not storage.exists(path):
        raise ArtifactError(f"{os.path.dirname(path)} is not {what} directory (no {os.path.basename(path)}){hint}")
    manifest = storage.read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise ArtifactError(f"{path} is not {what} manifest")
    if manifest.get("format_version") != version:
        raise ArtifactError(f"{path}: format version {manifest.get('format_version')} is not supported "
                            f"(expected {version})")
    return manifest


MAX_FILE_BYTES = 1 << 34
"""Largest file a manifest may name (16 GiB): a crafted manifest cannot make a reader fill memory."""


def _member(directory: str, rel: object, what: str) -> str:
    """``directory/rel`` for a plain relative name inside ``directory``; anything else (absolute,
    ``..``, empty, not a string) is refused, so a manifest cannot make a reader open other files."""
    parts = rel.split("/") if isinstance(rel, str) else []
    if not parts or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise ArtifactError(f"{what}: the manifest names {rel!r}, not a plain file name inside it")
    return os.path.join(directory, *parts)


def _check_regular(path: str, rel: str, what: str) -> None:
    """Refuses links, FIFOs, devices and directories: reading a FIFO would hang the reader."""
    if "://" in path:  # remote storage has only regular objects
        return
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"{what}: {rel} is not a regular file")


def read_verified(directory: str, expected: Dict[str, str], what: str,
                  allow_extra: Optional[Iterable[str]] = None) -> Dict[str, bytes]:
    """Every file of ``expected`` (``{relative path: sha256}``), read once and checked.

    Raises a one-line ArtifactError on a missing or changed file, and — unless
    ``allow_extra`` is given (names that may stand beside them) — on a file under
    ``directory`` that the manifest does not list. Nothing is returned unless all pass.
    """
    blobs: Dict[str, bytes] = {}
    if not isinstance(expected, dict):
        raise ArtifactError(f"{what}: the manifest's file list is malformed")
    for rel, digest in sorted(expected.items()):
        path = _member(directory, rel, what)
        if not storage.exists(path):
            raise ArtifactError(f"{what} is incomplete: missing {rel}")
        _check_regular(path, rel, what)
        with storage.open_file(path, "rb") as f:
            blob = f.read(MAX_FILE_BYTES + 1)
        if len(blob) > MAX_FILE_BYTES:
            raise ArtifactError(f"{what}: {rel} is larger than {MAX_FILE_BYTES} bytes")
        if sha256_bytes(blob) != digest:
            raise ArtifactError(f"{what}: {rel} does not match its sha256 in {MANIFEST_FILE} "
                                f"(sha256 differs: file changed or damaged)")
        blobs[rel] = blob
    if allow_extra is None:
        extra = sorted(set(list_files(directory)) - set(expected))
        if extra:
            raise ArtifactError(f"{what}: {extra[0]} is not listed in {MANIFEST_FILE}")
    return blobs


def check_new_file(out: str, overwrite: bool) -> None:
    """Raises :class:`UserError` unless ``out`` may be written as one file: absent, or a regular
    file with ``overwrite`` (``--overwrite``). A single output file carries no manifest that
    could prove who wrote it, so an existing one is replaced only when the user says so."""
    if not storage.exists(out):
        return
    if storage.isdir(out):
        raise UserError(f"refusing to write {out}: it is a directory (name a file)")
    if not overwrite:
        raise UserError(f"refusing to replace {out}: it exists (pass --overwrite to replace it)")


def check_replaceable(out: str, fmt: str) -> None:
    """Raises :class:`UserError` unless ``out`` is absent, an empty directory or an earlier
    artifact of format ``fmt`` (whose ``manifest.json`` says so): writing replaces it whole."""
    if not storage.exists(out):
        return
    manifest = os.path.join(out, MANIFEST_FILE)
    if storage.isdir(out) and not storage.ls(out):
        return
    if storage.isdir(out) and storage.exists(manifest):
        try:
            found = storage.read_json(manifest)
        except ArtifactError:
            found = None
        if isinstance(found, dict) and found.get("format") == fmt:
            return
    raise UserError(f"refusing to replace {out}: it exists and is not an earlier {fmt} artifact "
                    f"(choose a new directory)")
