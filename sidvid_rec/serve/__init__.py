"""Online serving of an export over HTTP (``sidvid-rec serve``): FastAPI + uvicorn.

:func:`serve` verifies the export (every file against the manifest's sha256; a tampered or
incomplete export is refused before anything listens), binds the socket, prints one JSON line
``{"serving": "http://HOST:PORT", "export", "sha256", "mode", "items"}`` on stdout and answers
until SIGINT/SIGTERM. The app itself is :func:`sidvid_rec.serve.app.create_app`.

Imports fastapi/uvicorn only when called, so the training stack never needs them.
"""

import json
import os
import socket
import sys
from typing import Optional

from sidvid_rec import storage
from sidvid_rec.errors import ConfigError, UserError


def _listen(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {port}")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r} cannot be resolved ({e.strerror})")
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it Nagle's algorithm meets the client's delayed ACK (~40 ms per response).
    sock = socket.socket(info[0], socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})")
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(export_dir: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 32,
          max_wait_ms: float = 5.0, max_body_bytes: Optional[int] = None, log_level: str = "warning") -> int:
    """Loads and verifies ``export_dir``, then serves it until interrupted. Returns 0."""
    if max_batch < 1:
        raise ConfigError(f"--max-batch must be at least 1, got {max_batch}")
    if max_wait_ms < 0:
        raise ConfigError(f"--max-wait-ms must be >= 0, got {max_wait_ms}")
    from sidvid_rec.export.serving import load_export  # here: `sidvid-rec --help` must not load torch
    from sidvid_rec.serve.app import DEFAULT_MAX_BODY_BYTES, create_app

    body_limit = DEFAULT_MAX_BODY_BYTES if max_body_bytes is None else max_body_bytes
    if body_limit < 1:
        raise ConfigError(f"--max-body-bytes must be positive, got {body_limit}")
    directory = storage.expand(export_dir)
    # The manifest's own hash names the export (it holds the sha256 of every file); taken before
    # the files are verified against it, so what is served is what the hash names.
    manifest = os.path.join(directory, "manifest.json")
    sha = storage.sha256_file(manifest) if storage.exists(manifest) else ""
    model = load_export(directory)  # one-line ArtifactError (exit 2) on a missing, changed or extra file
    if storage.sha256_file(manifest) != sha:
        raise UserError(f"export {directory}: manifest.json changed while loading; try again")
    app = create_app(model, sha, max_batch=max_batch, max_wait_ms=max_wait_ms, max_body_bytes=body_limit)

    import uvicorn

    sock = _listen(host, port)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    print(json.dumps({"serving": f"http://{shown}:{bound[1]}", "export": directory, "sha256": sha,
                      "mode": model.mode, "items": model.num_items}), flush=True)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        print("sidvid-rec serve: error: the server did not start (see the log above)", file=sys.stderr)
        return 1
    return 0
