"""``sidvid-rec serve EXPORT [--host 127.0.0.1] [--port 8000] [--max-batch 32] [--max-wait-ms 5]
[--max-body-bytes 1048576]``: an HTTP server over an export (:mod:`sidvid_rec.serve`).

``POST /recommend`` ``{"history": [raw ids], "timestamps": [...], "k": 10}`` answers what
``sidvid-rec retrieve`` prints for the same history; ``GET /healthz`` and ``GET /metrics``.
The export is verified against its manifest first: a tampered export is one line, exit 2.
On start one JSON line ``{"serving": "http://HOST:PORT", ...}`` is printed (``--port 0``: any
free port, named there).
"""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="serve an export over HTTP (POST /recommend, GET /healthz)")
    serve.add_argument("export_dir", help="directory written by `sidvid-rec export`")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    serve.add_argument("--max-batch", type=int, default=32,
                       help="most concurrent requests answered by one model call (default 32)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0,
                       help="longest a request waits for others to join its batch, ms (default 5)")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20,
                       help="larger request bodies get 413 (default 1 MiB)")
    serve.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn's log level (default warning; info logs every request)")
    serve.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from sidvid_rec.serve import serve

    return serve(args.export_dir, host=args.host, port=args.port, max_batch=args.max_batch,
                 max_wait_ms=args.max_wait_ms, max_body_bytes=args.max_body_bytes, log_level=args.log_level)
