"""Load test of ``sidvid-rec serve``: N concurrent clients (asyncio + httpx) send a fixed number of
``POST /recommend`` requests, a fraction of them malformed; reports p50/p99 latency and
requests/s, and checks that every malformed request got its 4xx and every well-formed one a 200
with ``k`` items.

The server is the real one (``python -m sidvid_rec.cli serve EXPORT --port 0`` in a subprocess);
without ``--export`` a tiny model is trained on the bundled ml-latest-small and exported first
(about a minute). Clients and server share the machine, so on a small one the figures are those
of the pair.

Usage::

    python -m benchmarks.bench_serve --clients 1,8,64 --requests 10000 --malformed 0.1
    python -m benchmarks.bench_serve --export runs/demo/export --clients 64 --max-batch 64

Well-formed requests: a history of 1..50 catalogue items (half of them with timestamps), k=10.
Malformed ones cycle through: empty history, an unknown item id, k=0, k as a string, fewer
timestamps than items, an unknown field, broken JSON, and a body over ``--max-body-bytes`` (413).
"""

import argparse
import asyncio
import json
import math
import os
import random
import select
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["data.max_len=50", "model.dim=32", "model.dqk=16", "model.dv=16", "model.num_blocks=2",
        "loss.num_negatives=64", "train.batch_size=128", "train.epochs=1", "train.max_steps=20",
        "eval.batch_size=610"]


def build_export(root: str) -> str:
    """Trains the tiny model on the bundled data set and exports it; returns the export directory."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run, out = os.path.join(root, "run"), os.path.join(root, "export")
    for argv in (["train", "--run-dir", run, f"data.cache_dir={os.path.join(root, 'cache')}", *TINY],
                 ["export", run, "--out", out]):
        subprocess.run([sys.executable, "-m", "sidvid_rec.cli", *argv], cwd=REPO, env=env, check=True,
                       stdout=subprocess.DEVNULL)
    return out


class Server:
    """``sidvid-rec serve`` in a subprocess on 127.0.0.1, any free port."""

    def __init__(self, export: str, max_batch: int, max_wait_ms: float, max_body_bytes: int, threads: int) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads),
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidvid_rec.cli", "serve", export, "--port", "0", "--max-batch", str(max_batch),
             "--max-wait-ms", str(max_wait_ms), "--max-body-bytes", str(max_body_bytes)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 180)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("{"):
            self.stop()
            raise SystemExit(f"bench_serve: the server did not start: {self.proc.stderr.read()[-2000:]}")
        self.info = json.loads(line)
        self.url = self.info["serving"]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


MALFORMED = ("empty_history", "unknown_id", "k_zero", "k_string", "timestamps_short", "extra_field", "bad_json",
             "too_large")


def make_requests(raw_ids: List[Any], n: int, malformed: float, body_limit: int,
                  seed: int = 0) -> List[Tuple[str, bytes, int]]:
    """``(kind, body, expected status)`` for ``n`` requests: ``round(n * malformed)`` malformed ones
    (kinds in turn) at random positions, the rest well-formed."""
    rng = random.Random(seed)
    bad_at = set(rng.sample(range(n), round(n * malformed)))
    out: List[Tuple[str, bytes, int]] = []
    turn = 0
    for i in range(n):
        history = rng.sample(raw_ids, rng.randint(1, 50))
        good: Dict[str, Any] = {"history": history, "k": 10}
        if rng.random() < 0.5:
            good["timestamps"] = sorted(rng.randint(900_000_000, 1_500_000_000) for _ in history)
        if i not in bad_at:
            out.append(("ok", json.dumps(good).encode(), 200))
            continue
        kind = MALFORMED[turn % len(MALFORMED)]
        turn += 1
        if kind == "empty_history":
            body, status = json.dumps({"history": [], "k": 10}).encode(), 422
        elif kind == "unknown_id":
            body, status = json.dumps(dict(good, history=history + ["no-such-item"], timestamps=None)).encode(), 422
        elif kind == "k_zero":
            body, status = json.dumps(dict(good, k=0)).encode(), 422
        elif kind == "k_string":
            body, status = json.dumps(dict(good, k="10")).encode(), 422
        elif kind == "timestamps_short":
            body, status = json.dumps(dict(good, timestamps=[1] * (len(history) + 1))).encode(), 422
        elif kind == "extra_field":
            body, status = json.dumps(dict(good, user="u1")).encode(), 422
        elif kind == "bad_json":
            body, status = json.dumps(good).encode()[:-1], 422
        else:  # too_large
            body, status = json.dumps({"history": [raw_ids[0]] * (body_limit // 2)}).encode(), 413
        out.append((kind, body, status))
    return out


def percentile(values: List[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least ``q``% of the values at or below it."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


async def load(server: "Server", requests: List[Tuple[str, bytes, int]], clients: int) -> Dict[str, Any]:
    import httpx

    queue: "asyncio.Queue[Tuple[str, bytes, int]]" = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    latencies: Dict[str, List[float]] = {"ok": [], "bad": []}
    failures: List[str] = []
    headers = {"content-type": "application/json"}

    async def client(http: "httpx.AsyncClient") -> None:
        while True:
            try:
                kind, body, expected = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            start = time.perf_counter()
            r = await http.post("/recommend", content=body, headers=headers)
            elapsed = time.perf_counter() - start
            latencies["ok" if kind == "ok" else "bad"].append(elapsed)
            if r.status_code != expected:
                failures.append(f"{kind}: {r.status_code} (expected {expected}) {r.text[:200]}")
            elif kind == "ok" and len(r.json()["items"]) != 10:
                failures.append(f"ok: {len(r.json()['items'])} items")
            elif kind != "ok" and "error" not in r.json():
                failures.append(f"{kind}: no error message")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
        before = (await http.get("/metrics")).json()
        start, server_cpu, client_cpu = time.perf_counter(), server.cpu_seconds(), time.process_time()
        await asyncio.gather(*[client(http) for _ in range(clients)])
        wall = time.perf_counter() - start
        server_cpu, client_cpu = server.cpu_seconds() - server_cpu, time.process_time() - client_cpu
        after = (await http.get("/metrics")).json()
    every = latencies["ok"] + latencies["bad"]
    batches = after["batches"] - before["batches"]
    answered = after["requests"] - before["requests"]
    return {
        "clients": clients, "requests": len(requests), "well_formed": len(latencies["ok"]),
        "malformed": len(latencies["bad"]), "wall_s": round(wall, 2), "requests_per_s": round(len(requests) / wall, 1),
        "p50_ms": round(1000 * percentile(every, 50), 2), "p99_ms": round(1000 * percentile(every, 99), 2),
        "ok_p50_ms": round(1000 * percentile(latencies["ok"], 50), 2),
        "ok_p99_ms": round(1000 * percentile(latencies["ok"], 99), 2),
        "batches": batches, "mean_batch": round(answered / batches, 2) if batches else 0.0,
        "largest_batch": after["largest_batch"],
        "model_busy": round((after["model_seconds"] - before["model_seconds"]) / wall, 3),
        "server_cpu_per_request_ms": round(1000 * server_cpu / len(requests), 2),
        "client_cpu_per_request_ms": round(1000 * client_cpu / len(requests), 2), "rejected": after["rejected"] - before["rejected"],
        "failures": len(failures), "failure_examples": failures[:5],
    }


def markdown(rows: List[Dict[str, Any]]) -> str:
    lines = ["| clients | requests (malformed) | requests/s | p50 ms | p99 ms | well-formed p50 / p99 ms | "
             "model calls | mean batch | model thread busy | CPU ms/request server / client | wrong answers |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} ({r['malformed']}) | {r['requests_per_s']} | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {r['ok_p50_ms']} / {r['ok_p99_ms']} | {r['batches']} | {r['mean_batch']} | "
                     f"{100 * r['model_busy']:.0f}% | {r['server_cpu_per_request_ms']} / {r['client_cpu_per_request_ms']} | "
                     f"{r['failures']} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", default=None, help="export directory (default: train and export a tiny model)")
    parser.add_argument("--clients", default="1,8,64", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=10_000, help="requests per concurrency level")
    parser.add_argument("--malformed", type=float, default=0.1, help="fraction of malformed requests")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-body-bytes", type=int, default=65536)
    parser.add_argument("--server-threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        export = args.export or build_export(tmp)
        with open(os.path.join(export, "items.json")) as f:
            raw_ids = json.load(f)["raw_ids"][1:]
        server = Server(export, args.max_batch, args.max_wait_ms, args.max_body_bytes, args.server_threads)
        rows = []
        try:
            for clients in [int(c) for c in args.clients.split(",")]:
                requests = make_requests(raw_ids, args.requests, args.malformed, args.max_body_bytes, seed=clients)
                rows.append(asyncio.run(load(server, requests, clients)))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            server.stop()
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "server": server.info, "rows": rows}, f, indent=1)
    return 1 if any(r["failures"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
