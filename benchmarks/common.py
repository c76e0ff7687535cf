"""Shared pieces of the benchmark suite: machine facts, subprocess workers, memory probes,
phase timers, Markdown sections of ``RESULTS.md`` and plots.

Workers: every heavy measurement runs in a fresh ``python -m benchmarks.common MODULE FUNC
JSON`` process (:func:`call_worker`), so that its peak memory is its own and one crash does not
end the suite. The worker prints its result as one ``BENCH_RESULT {json}`` line.

Memory: Linux resets a process's peak RSS (``VmHWM``, also behind ``ru_maxrss``) when ``5`` is
written to ``/proc/self/clear_refs``; :func:`reset_peak_rss` does that right before the
measured part, so :func:`peak_rss_mb` is that part's peak, not the set-up's.
"""

import argparse
import contextlib
import datetime
import importlib
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_PREFIX = "BENCH_RESULT "


def shared_data_root() -> str:
    """``$SIDVID_SHARED_DATA`` or ``../shared/data`` next to the repository (as the tests)."""
    return os.environ.get("SIDVID_SHARED_DATA", os.path.join(REPO_ROOT, "..", "shared", "data"))


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:  # Linux only; the suite reports what it can elsewhere
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return float("nan")


def versions() -> Dict[str, str]:
    """Versions of the libraries the figures depend on (from the installed metadata: importing
    torchrec here would cost seconds)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name, dists in (("torch", ["torch"]), ("torchrec", ["torchrec"]), ("numpy", ["numpy"]),
                        ("faiss", ["faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss"])):
        out[name] = "absent"
        for dist in dists:
            try:
                out[name] = metadata.version(dist) + ("" if dist == name else f" ({dist})")
                break
            except metadata.PackageNotFoundError:
                continue
    return out


@dataclass
class RunInfo:
    """What every section states: machine, date, versions, threads, the exact command."""

    command: str
    threads: int
    device: str
    quick: bool
    versions: Dict[str, str] = field(default_factory=versions)

    def header(self, load_before: Sequence[float], load_after: Sequence[float], seconds: float) -> str:
        v = self.versions
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return (
            f"Command: `{self.command}`{' (quick mode: fewer points and steps)' if self.quick else ''}  \n"
            f"Machine: {cpu_model()}, {os.cpu_count()} cores, {memory_gib():.0f} GiB, {platform.machine()}, "
            f"{self.threads} intra-op thread(s), device {self.device}; load average (1/5/15 min) "
            f"{_load(load_before)} before, {_load(load_after)} after; section wall time {seconds:.0f} s  \n"
            f"Date: {date}; python {v['python']}, torch {v['torch']}, torchrec {v['torchrec']}, "
            f"faiss {v['faiss']}, numpy {v['numpy']}"
        )


def _load(load: Sequence[float]) -> str:
    return " / ".join(f"{x:.1f}" for x in load)


# ----------------------------------------------------------------------------- memory


def _status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_mb() -> float:
    """Resident set size now (MB)."""
    kib = _status_kib("VmRSS")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def reset_peak_rss() -> bool:
    """Resets the peak RSS to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS since the process start or the last :func:`reset_peak_rss` (MB)."""
    kib = _status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


# ----------------------------------------------------------------------------- timing


def synchronize(device: str) -> None:
    """Waits for queued CUDA work (timers on a GPU must not measure launch time only)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class PhaseClock:
    """Exclusive wall time per named phase; nested phases are subtracted from their parent.

    Example::

        clock = PhaseClock()
        with clock.phase("loss"):
            with clock.phase("embedding"):   # counted in "embedding" only
                ...
    """

    def __init__(self, device: str = "cpu") -> None:
        self.totals: Dict[str, float] = {}
        self._children: List[float] = []
        self._device = device

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        synchronize(self._device)
        start = time.perf_counter()
        self._children.append(0.0)
        try:
            yield
        finally:
            synchronize(self._device)
            elapsed = time.perf_counter() - start
            child = self._children.pop()
            self.add(name, elapsed - child)
            if self._children:
                self._children[-1] += elapsed

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` timed as phase ``name`` on every call."""
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return fn(*args, **kwargs)
        return timed

    def take(self) -> Dict[str, float]:
        """The totals so far, then zero."""
        out, self.totals = self.totals, {}
        return out


# ----------------------------------------------------------------------------- workers


class WorkerError(RuntimeError):
    """A worker process failed; the message is the last line of its error output."""


def worker_env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    if threads > 0:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TQDM_DISABLE", "1")
    return env


def call_worker(module: str, func: str, kwargs: Dict[str, Any], threads: int, timeout: float) -> Dict[str, Any]:
    """Runs ``benchmarks.<module>.<func>(**kwargs)`` in a fresh process; returns its dict."""
    cmd = [sys.executable, "-m", "benchmarks.common", module, func, json.dumps(kwargs)]
    try:
        done = subprocess.run(cmd, cwd=REPO_ROOT, env=worker_env(threads), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise WorkerError(f"{module}.{func} ran past its {timeout:.0f} s limit")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    lines = [l for l in (done.stderr or done.stdout).strip().splitlines() if l.strip()]
    raise WorkerError(f"{module}.{func} exited {done.returncode}: {lines[-1] if lines else 'no output'}")


def _worker_main(argv: List[str]) -> int:
    module, func, kwargs = argv[0], argv[1], json.loads(argv[2])
    # torch and FAISS take their thread counts from OMP_NUM_THREADS (set by worker_env)
    result = getattr(importlib.import_module(f"benchmarks.{module}"), func)(**kwargs)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------- Markdown


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def num(x: Optional[float], digits: int = 0) -> str:
    """``12,345`` / ``1.23``; ``-`` for a missing value."""
    if x is None or x != x:  # None or NaN
        return "-"
    return f"{x:,.{digits}f}"


def section_markers(name: str) -> tuple:
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with the ``bench:name`` block replaced by ``body`` (appended when absent)."""
    begin, end = section_markers(name)
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    return text.rstrip("\n") + "\n\n" + block + "\n"


def update_results(path: str, sections: Dict[str, str]) -> None:
    """Replaces (or appends) each named generated section of ``path``; the rest stays as is."""
    text = "# Benchmark results\n"
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    for name, body in sections.items():
        text = replace_section(text, name, body)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".results-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def add_report_args(parser: argparse.ArgumentParser, section: str) -> None:
    """``--report`` (format finished runs only) and ``--record RESULTS_MD`` (write them to ``section``)."""
    parser.add_argument("--report", action="store_true", help="print the tables of finished runs only")
    parser.add_argument("--record", default=None, metavar="RESULTS_MD",
                        help=f"with --report: also write the tables to this file's `{section}` section")


def emit_report(text: str, record: Optional[str], section: str) -> None:
    """Prints a study's tables and, with ``record``, writes them to its RESULTS.md section."""
    print(text)
    if record:
        update_results(record, {section: text})


# ----------------------------------------------------------------------------- plots


def figure(ncols: int = 1, width: float = 5.5, height: float = 4.0):
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
