"""`sidvid-rec serve`: the real HTTP server (a subprocess on 127.0.0.1, any free port) over a
tiny trained export, talked to with httpx."""

import asyncio
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from sidvid_rec.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["data.max_len=20", "model.dim=18", "model.dqk=8", "model.dv=8", "model.num_blocks=1",
        "loss.num_negatives=16", "train.batch_size=128", "train.epochs=1", "train.max_steps=3", "eval.batch_size=610",
        "train.device=cpu"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    run, out = root / "run", root / "export"
    assert main(["train", "--run-dir", str(run), f"data.cache_dir={root / 'cache'}", *TINY]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    return out


def _serve_cmd(export, *args):
    return [sys.executable, "-m", "sidvid_rec.cli", "serve", str(export), "--port", "0", *args]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


class Server:
    """``sidvid-rec serve`` in a subprocess; ``url`` from the JSON line it prints once listening."""

    def __init__(self, export, *args, timeout=120):
        self.proc = subprocess.Popen(_serve_cmd(export, *args), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready or self.proc.poll() is not None:
                self.stop()
                raise AssertionError(f"server did not start: {self.proc.stderr.read()[-2000:]}")
            line = self.proc.stdout.readline()
            if line.startswith("{"):
                break
        self.started = json.loads(line)
        self.url = self.started["serving"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(export_dir):
    srv = Server(export_dir, "--max-batch", "16", "--max-wait-ms", "50")
    yield srv
    rc = srv.stop()  # uvicorn shuts down gracefully, then re-raises SIGTERM: the conventional -15
    err = srv.proc.stderr.read()
    assert rc in (0, -signal.SIGTERM) and "Traceback" not in err, (rc, err[-2000:])


def _raw_ids(export_dir):
    return json.loads((export_dir / "items.json").read_text())["raw_ids"][1:]


def _histories(export_dir):
    raw = _raw_ids(export_dir)
    return [
        {"history": raw[:5], "k": 10},
        {"history": [raw[7], raw[3], raw[100], raw[42]], "k": 5,
         "timestamps": [1_000_000, 1_000_100, 1_000_500, 1_002_000]},
        {"history": [raw[9]], "k": 1},
        {"history": raw[50:90], "k": 20, "timestamps": list(range(1_100_000, 1_100_040)), "query_time": 1_200_000},
        {"history": [str(raw[11]), raw[12]], "k": 3},  # raw ids may come as strings
    ]


def test_healthz_names_the_export(server, export_dir):
    health = httpx.get(f"{server.url}/healthz", timeout=30).json()
    assert health["ok"] is True and health["mode"] == "id" and health["items"] == len(_raw_ids(export_dir))
    assert health["sha256"] == hashlib.sha256((export_dir / "manifest.json").read_bytes()).hexdigest()
    assert server.started["sha256"] == health["sha256"]


def test_answers_equal_retrieve(server, export_dir, capsys):
    from sidvid_rec.export.serving import load_export

    model = load_export(str(export_dir))
    bodies = _histories(export_dir)
    expected = [{"items": model.retrieve(b["history"], k=b["k"], timestamps=b.get("timestamps"),
                                         query_time=b.get("query_time")).items} for b in bodies]

    with httpx.Client(base_url=server.url, timeout=60) as client:  # one at a time
        assert [client.post("/recommend", json=b).json() for b in bodies] == expected

    async def together():  # concurrently: answered in shared batches, each still its own answer
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*[client.post("/recommend", json=b) for b in bodies * 3])
    responses = asyncio.run(together())
    assert all(r.status_code == 200 for r in responses)
    assert [r.json() for r in responses] == expected * 3

    # ... and what the CLI's retrieve prints for the same arguments.
    b = bodies[1]
    capsys.readouterr()
    assert main(["retrieve", str(export_dir), "--history", ",".join(map(str, b["history"])), "--k", str(b["k"]),
                 "--timestamps", ",".join(map(str, b["timestamps"]))]) == 0
    assert json.loads(capsys.readouterr().out) == expected[1]


def test_malformed_requests_get_their_4xx(server, export_dir):
    raw = _raw_ids(export_dir)
    ok = {"history": raw[:3], "k": 5}
    cases = [
        ({"history": []}, 422, "history: List should have at least 1 item"),
        ({"k": 5}, 422, "history: Field required"),
        ({"history": [raw[0], 999_999_999, "nope"]}, 422, "2 item id(s) not in this export's catalogue"),
        (dict(ok, k=0), 422, "k: Input should be greater than or equal to 1"),
        (dict(ok, k=1001), 422, "k: Input should be less than or equal to 1000"),
        (dict(ok, k="5"), 422, "k: Input should be a valid integer"),
        (dict(ok, k=2.5), 422, "k: Input should be a valid integer"),
        (dict(ok, timestamps=[1, 2]), 422, "timestamps has 2 entries for 3 history items"),
        (dict(ok, timestamps=["1", "2", "3"]), 422, "timestamps.0: Input should be a valid integer"),
        (dict(ok, timestamps=[1, 2, 2 ** 70]), 422, "timestamps.2: Input should be less than or equal to"),
        (dict(ok, history="1,2,3"), 422, "history: Input should be a valid list"),
        ({"history": [True, raw[0]]}, 422, "history.0"),
        ({"history": [[1], raw[0]]}, 422, "history.0"),
        (dict(ok, decoder="beam"), 422, "decoder: applies to COBRA exports; this export is mode id"),
        (dict(ok, decoder="greedy"), 422, "decoder: Input should be"),
        (dict(ok, extra=1), 422, "extra: Extra inputs are not permitted"),
        ([1, 2, 3], 422, "Input should be a valid dictionary"),
    ]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        before = client.get("/metrics").json()
        for body, status, message in cases:
            r = client.post("/recommend", json=body)
            assert r.status_code == status, (body, r.status_code, r.text)
            err = r.json()
            assert message in err["error"] and "\n" not in err["error"], (body, err)
        r = client.post("/recommend", content=b'{"history": [1, 2', headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"].startswith("body (character 17): JSON decode error"), r.text
        r = client.post("/recommend", content=json.dumps({"history": raw[:3] * 200_000}), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "larger than 1048576 bytes" in r.json()["error"], r.text

        def chunks():  # no Content-Length: the limit is enforced while the body streams in
            yield b'{"history": ['
            for _ in range(300):
                yield b"1," * 2000
            yield b"1]}"
        r = client.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert client.get("/metrics").json()["rejected"] - before["rejected"] == len(cases) + 3
        assert client.post("/recommend", json=ok).status_code == 200  # still serving
        assert client.get("/nowhere").status_code == 404


def test_concurrent_requests_are_batched(server, export_dir):
    raw = _raw_ids(export_dir)
    bodies = [{"history": raw[i:i + 1 + i % 7], "k": 10} for i in range(48)]

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=64)) as client:
            before = (await client.get("/metrics")).json()
            responses = await asyncio.gather(*[client.post("/recommend", json=b) for b in bodies])
            after = (await client.get("/metrics")).json()
            return before, responses, after

    before, responses, after = asyncio.run(burst())
    assert all(r.status_code == 200 and len(r.json()["items"]) == 10 for r in responses)
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests == len(bodies)
    assert batches < requests and after["largest_batch"] > 1, after
    assert after["largest_batch"] <= 16


def _refused(argv):
    proc = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout == ""  # nothing announced as serving
    return err[0]


def test_tampered_export_is_refused_at_start(export_dir, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(export_dir, tampered)
    blob = bytearray((tampered / "item_vectors.safetensors").read_bytes())
    blob[-1] ^= 0x01
    (tampered / "item_vectors.safetensors").write_bytes(bytes(blob))
    err = _refused(_serve_cmd(tampered))
    assert err.startswith("sidvid-rec serve: error:") and "item_vectors.safetensors does not match its sha256" in err
    assert "not an export directory" in _refused(_serve_cmd(tmp_path))
    assert "--max-batch must be at least 1, got 0" in _refused(_serve_cmd(export_dir, "--max-batch", "0"))


def test_the_listening_socket_is_tcp_nodelay_capable():
    """asyncio sets TCP_NODELAY only on sockets created with proto IPPROTO_TCP; without it each
    response waits ~40 ms (Nagle's algorithm against the client's delayed ACK)."""
    import socket

    from sidvid_rec.serve import _listen

    sock = _listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_a_taken_port_is_one_line(server, export_dir):
    port = server.url.rsplit(":", 1)[1]
    err = _refused([sys.executable, "-m", "sidvid_rec.cli", "serve", str(export_dir), "--port", port])
    assert f"cannot listen on 127.0.0.1:{port}" in err
