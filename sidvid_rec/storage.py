"""File access through iopath, with atomic writes.

Every path in the package goes through :data:`path_manager`, so artifacts can live on any
storage for which an iopath handler is registered (local disk by default). Writers never
leave half-written files: they write to a temporary sibling and rename it into place. A
failed write (full disk, read-only or missing parent, a file where a directory should be)
is an :class:`~sidvid_rec.errors.ArtifactError` naming the target, with the target
untouched; temporaries a killed writer left behind are removed by the next write of the
same target.
"""

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from typing import Any, Dict, Iterator, IO, Optional

from iopath.common.file_io import PathManager

from sidvid_rec.errors import ArtifactError, ConfigError

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


def expand_setting(value: str, key: str) -> str:
    """:func:`expand` of the directory setting ``key``; an empty value is refused.

    ``expand("")`` is the working directory, so an empty setting would silently write there.
    """
    if not value.strip():
        raise ConfigError(f"{key} is empty: set a directory (the default is ~/.cache/sidvid_rec)")
    return expand(value)


def mkdirs(path: str) -> None:
    """Creates ``path`` and its parents; failure is an :class:`ArtifactError` naming ``path``."""
    with _reported(path, "create directory"):
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


# ----------------------------------------------------------------------------- temporaries

# A temporary older than this is stale whoever wrote it: every writer here holds its
# temporary for seconds to minutes, so a day leaves a wide margin for slow disks.
STALE_AFTER_S = 24 * 3600


def _host_key() -> str:
    """6 hex digits naming the process table this process's PID belongs to.

    A PID in a temporary's name can only be checked for liveness by a process that sees the
    same process table: same host, same boot, same PID namespace (containers sharing a
    directory can see the same hostname but different PIDs).
    """
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:6]


def _temp_sibling(path: str) -> str:
    """``.NAME.tmp-PID-HOST-RANDOM`` next to ``path``: the writer's PID and process table
    let a later write tell a temporary of a killed writer from one still being written."""
    head, tail = os.path.split(path.rstrip("/"))
    return os.path.join(head, f".{tail}.tmp-{os.getpid()}-{_host_key()}-{uuid.uuid4().hex[:8]}")


def _temp_pattern(tail: str) -> "re.Pattern[str]":
    """Names of the temporaries of target ``tail``: this module's, with or without the
    ``.old`` suffix of a replaced directory, and the PID-less ones of earlier versions."""
    return re.compile(rf"\.{re.escape(tail)}\.tmp-(?:(\d+)-([0-9a-f]{{6}})-)?[0-9a-f]{{8}}(\.old)?")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OSError, OverflowError):  # not a PID this system can have
        return False
    with contextlib.suppress(OSError, IndexError):  # a zombie is dead, only not reaped yet
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _is_stale(entry: str, pid: Optional[str], host: Optional[str], now: float) -> bool:
    """Whether the temporary ``entry`` belongs to no live writer: older than
    :data:`STALE_AFTER_S`, or written from this process table by a PID that is gone."""
    try:
        age = now - os.lstat(entry).st_mtime
    except OSError:  # gone already: its writer finished
        return False
    if age > STALE_AFTER_S:
        return True
    return pid is not None and host == _host_key() and not _pid_alive(int(pid))


def _clean_stale(path: str) -> None:
    """Removes the temporaries of ``path`` left by writers that were killed (SIGKILL, OOM,
    power loss), so that they do not pile up; others' targets are never touched.

    A stale ``.old`` while ``path`` is missing is the previous artifact of a writer killed
    between its two renames, the only copy left: it is put back at ``path``, not removed.
    Local paths only (a remote listing gives no PIDs nor reliable times).
    """
    if "://" in path:
        return
    head, tail = os.path.split(path.rstrip("/"))
    try:
        names = sorted(os.listdir(head or "."))
    except OSError:  # no parent yet, or unreadable: the write itself reports what matters
        return
    pattern, now = _temp_pattern(tail), time.time()
    for name in names:
        match = pattern.fullmatch(name)
        entry = os.path.join(head, name)
        if match is None or not _is_stale(entry, match.group(1), match.group(2), now):
            continue
        with contextlib.suppress(OSError):  # best effort: the write must not fail over litter
            if match.group(3) and not os.path.lexists(path):
                os.replace(entry, path)
            else:
                remove_tree(entry)


# ----------------------------------------------------------------------------- write errors


class _WriteFailure(ArtifactError):
    """Writing ``path`` failed with the OS error ``cause``; an enclosing :func:`atomic_dir`
    reports a failure inside its temporary against its own target instead."""

    def __init__(self, path: str, cause: OSError, verb: str = "write") -> None:
        super().__init__(f"cannot {verb} {path}: {_reason(path, cause)}")
        self.path = path
        self.cause = cause


def _reason(path: str, e: OSError) -> str:
    """The OS's reason, naming the file in the way when a parent is not a directory, and the
    file the error is about when it is neither ``path`` nor one of its temporaries."""
    if e.errno == errno.ENOTDIR and "://" not in path:
        parent = os.path.dirname(path.rstrip("/"))
        while parent and not os.path.lexists(parent) and parent != os.path.dirname(parent):
            parent = os.path.dirname(parent)
        if parent and os.path.lexists(parent) and not os.path.isdir(parent):
            return f"{parent} is not a directory"
    reason = e.strerror or str(e) or type(e).__name__
    if e.filename and not _within(str(e.filename), path):
        reason += f": {e.filename}"
    return reason.replace("\n", " ")


def _within(name: str, path: str) -> bool:
    """Whether ``name`` is ``path``, one of its temporaries or inside either."""
    head, tail = os.path.split(path.rstrip("/"))
    temp_prefix = os.path.join(head, f".{tail}.tmp-")
    return name.rstrip("/") == path.rstrip("/") or name.startswith((path.rstrip("/") + "/", temp_prefix))


@contextlib.contextmanager
def _reported(path: str, verb: str = "write") -> Iterator[None]:
    """Turns an :class:`OSError` (and a nested writer's failure inside ``path`` or its
    temporaries) into one :class:`ArtifactError` about ``path``."""
    try:
        yield
    except _WriteFailure as e:
        if e.path != path and _within(e.path, path):
            raise _WriteFailure(path, e.cause, verb) from e.cause
        raise
    except OSError as e:
        raise _WriteFailure(path, e, verb) from e


# ----------------------------------------------------------------------------- atomic writers


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Opens a temporary sibling of ``path`` for writing; renames it to ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched; an OS error
    (full disk, read-only or missing parent) is raised as an :class:`ArtifactError`.
    """
    if "r" in mode or "a" in mode:
        raise ValueError("atomic_open is for writing only")
    parent = os.path.dirname(path.rstrip("/"))
    with _reported(path):
        if parent:  # not mkdirs: a failure is reported against ``path``, what the caller writes
            path_manager.mkdirs(parent)
        _clean_stale(path)
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
            with contextlib.suppress(OSError):  # cleanup must not mask the write's own error
                if path_manager.exists(tmp):
                    path_manager.rm(tmp)


def write_json(path: str, obj: Any) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path: str) -> Any:
    if not exists(path):
        raise ArtifactError(f"missing file: {path}")
    with open_file(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ArtifactError(f"{path} is not a JSON text file (it is not UTF-8)")
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})")
    except RecursionError:
        raise ArtifactError(f"{path} is not valid JSON (nested too deeply)")


def read_json_object(path: str) -> Dict[str, Any]:
    """:func:`read_json` of a file that must hold a JSON object (manifests, stamps, records)."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise ArtifactError(f"{path} is not a JSON object")
    return value


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yields a temporary directory that replaces ``path`` as a whole on success.

    Used for multi-file artifacts (semantic IDs, exports, checkpoints): readers see either
    the old directory or the complete new one, never a mixture. Local paths only use
    ``os.replace``; other iopath backends fall back to copy-then-remove. An OS error while
    writing (full disk, read-only or missing parent) is raised as an :class:`ArtifactError`
    about ``path``, with the temporary removed and ``path`` untouched.
    """
    path = path.rstrip("/")
    tmp = _temp_sibling(path)
    try:
        with _reported(path):
            _clean_stale(path)  # first: frees the space a killed writer held
            mkdirs(tmp)
            yield tmp
            _swap_in(tmp, path)
    finally:
        if exists(tmp):
            remove_tree(tmp)


def _swap_in(tmp: str, path: str) -> None:
    """Renames the finished directory ``tmp`` to ``path``, moving an existing ``path`` aside
    first and removing it last (it is put back if the second rename fails)."""
    old = None
    if exists(path):
        old = _temp_sibling(path) + ".old"
        replace(path, old)
    try:
        replace(tmp, path)
    except BaseException:
        if old is not None:
            replace(old, path)
        raise
    if old is not None:
        remove_tree(old)


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
