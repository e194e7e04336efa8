"""A small process pool whose items each get a hard time limit.

`concurrent.futures` cannot stop one stuck task, and math-verify's own timeouts use SIGALRM, which
neither works outside the main thread nor interrupts long C calls (a huge integer power, say). Here
every worker is a separate Python process fed one item at a time; a worker that overruns its item's
limit is killed and replaced, and that item alone is reported as timed out. The limit is on the item's
own work — the worker's CPU time, measured from when the item is sent — so a busy machine does not turn
a slow item into a timeout; workers import and warm up before they take items, and die with their parent.

Workers are plain subprocesses (`python -m intgen.workers module:function`) that speak JSON lines on
stdin/stdout: untrusted text travels as data, never as pickle, and the caller's `__main__` is never
re-imported (multiprocessing's spawn and forkserver do that, which breaks scripts without a
`if __name__ == "__main__"` guard).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

# Address-space cap per worker: a memory bomb in model output becomes a MemoryError, not an OOM kill.
DEFAULT_MEMORY_LIMIT_BYTES = 4 * 1024**3

_START_TIMEOUT_S = 120.0
POLL_S = 0.1
# An item is also given up when it has been off the CPU this many times its limit (a swapping machine).
WALL_FACTOR = 20.0
MIN_WALL_S = 60.0
# Each worker imports sympy (~100 MB); more than this rarely pays off for grading.
MAX_DEFAULT_WORKERS = 8
TIMEOUT = "timeout"
WORKER_DIED = "worker_died"


@dataclass(frozen=True)
class Failure:
    """Why an item produced no result: `timeout`, `worker_died` or `error:<ExceptionType>`."""

    reason: str


def serve(target: str, memory_limit: int | None, parent: int = 0) -> None:
    """Worker loop: one JSON item per stdin line, one JSON result per stdout line. The worker dies with its
    parent, and warms up (imports, first call) before it says it is ready, so no item's time limit pays for it."""
    if parent:
        _die_with(parent)
    if memory_limit:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    module_name, name = target.split(":")
    module = importlib.import_module(module_name)
    fn = getattr(module, name)
    warm_up = getattr(module, "warm_up", None)
    if warm_up is not None:
        warm_up()
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the protocol
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            result = {"ok": fn(json.loads(line))}
        except BaseException as exc:  # the function's own errors are data for the caller
            result = {"error": type(exc).__name__}
        out.write(json.dumps(result) + "\n")
        out.flush()


def _die_with(parent: int) -> None:
    """End this process when `parent` ends, even in the middle of a long computation: Linux's parent-death
    signal where there is one, and everywhere a watchdog thread that notices the parent is gone."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the signal was set up
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used; None where it cannot be read (not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return None


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _worker_env() -> dict[str, str]:
    # The worker imports intgen by name: make that work from a source checkout too.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": package_root + (os.pathsep + path if path else "")}


_SPAWNER = ThreadPoolExecutor(1, thread_name_prefix="intgen-spawner")


def _spawn(target: str, memory_limit: int | None) -> _Worker:
    """A worker started from one long-lived thread: Linux's parent-death signal fires when the *thread* that
    started a process ends, and pools are used from the driver's executor threads, which come and go."""
    return _SPAWNER.submit(_Worker, target, memory_limit).result()


class _Worker:
    def __init__(self, target: str, memory_limit: int | None) -> None:
        self.target = target
        self.process = subprocess.Popen(
            [sys.executable, "-m", "intgen.workers", target, str(memory_limit or 0), str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=_worker_env(),
            text=True,
            encoding="utf-8",
            errors="surrogatepass",
        )
        self.ready = False  # set once the worker has imported its function and warmed up
        self.index = -1  # the item being worked on
        self.sent = 0.0  # when the item was sent (monotonic seconds)
        self.cpu_at_send: float | None = None  # the worker's CPU time then
        self.limit = 0.0

    def start(self, index: int, item: Any, limit: float) -> None:
        self.index, self.limit = index, limit
        self.sent, self.cpu_at_send = time.monotonic(), cpu_seconds(self.process.pid)
        self.send(item)

    def spent(self) -> float:
        """Seconds of the current item's own work: CPU time where it can be read (so that a loaded machine
        does not turn slow items into timeouts), wall time elsewhere."""
        cpu = cpu_seconds(self.process.pid)
        if cpu is None or self.cpu_at_send is None:
            return time.monotonic() - self.sent
        return cpu - self.cpu_at_send

    def overdue(self) -> bool:
        """Over its limit in work, or stuck off the CPU for far longer than any item takes."""
        wall = time.monotonic() - self.sent
        return self.spent() >= self.limit or wall >= max(WALL_FACTOR * self.limit, MIN_WALL_S)

    def stream(self) -> Any:
        return self.process.stdout

    def confirm_ready(self) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.endswith("\n") or not json.loads(line).get("ready"):
            raise RuntimeError(
                f"a worker process for {self.target} failed to start (exit code {self.process.poll()})"
            )
        self.ready = True

    def send(self, item: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(item) + "\n")
        self.process.stdin.flush()

    def receive(self) -> Any:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.endswith("\n"):
            return Failure(WORKER_DIED)
        message = json.loads(line)
        return message["ok"] if "ok" in message else Failure(f"error:{message['error']}")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except OSError:
                pass


class HardTimeoutPool:
    """Runs `module:function` on JSON-able items in `workers` processes, `timeout` seconds per item at most.

    Results come back in input order; an item that timed out or whose worker died comes back as a
    `Failure`. Workers are started on first use and kept for later calls. Thread-safe: calls from
    several threads are served one after another.
    """

    def __init__(
        self, target: str, workers: int | None = None, memory_limit: int | None = DEFAULT_MEMORY_LIMIT_BYTES
    ) -> None:
        self.target = target
        self.size = default_size(workers)
        self.memory_limit = memory_limit
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.restarts = 0

    def map(self, items: Sequence[Any], timeout: float) -> list[Any]:
        with self._lock:
            return self._map(items, timeout)

    def _map(self, items: Sequence[Any], timeout: float) -> list[Any]:
        results: list[Any] = [None] * len(items)
        pending = deque(range(len(items)))
        while len(self._workers) < min(self.size, len(items)):
            self._workers.append(_spawn(self.target, self.memory_limit))
        idle = [w for w in self._workers if w.ready]
        starting = {w.stream(): w for w in self._workers if not w.ready}
        busy: dict[Any, _Worker] = {}

        def finish(worker: _Worker, result: Any) -> None:
            results[worker.index] = result
            if isinstance(result, Failure) and result.reason in (TIMEOUT, WORKER_DIED):
                worker.kill()
                fresh = _spawn(self.target, self.memory_limit)
                self._workers[self._workers.index(worker)] = fresh
                self.restarts += 1
                starting[fresh.stream()] = fresh
            else:
                idle.append(worker)

        while pending or busy:
            while pending and idle:
                worker = idle.pop()
                index = pending.popleft()
                try:
                    worker.start(index, items[index], timeout)
                    busy[worker.stream()] = worker
                except OSError:
                    worker.index = index
                    finish(worker, Failure(WORKER_DIED))
            if not busy and not starting:
                continue
            # CPU time cannot be waited on: look again every POLL_S while items are running
            ready = wait(list(busy) + list(starting), timeout=POLL_S if busy else _START_TIMEOUT_S)
            if not ready and not busy:
                raise RuntimeError(f"worker processes for {self.target} did not start in {_START_TIMEOUT_S} s")
            for stream in ready:
                if stream in starting:
                    worker = starting.pop(stream)
                    worker.confirm_ready()
                    idle.append(worker)
                else:
                    worker = busy.pop(stream)
                    finish(worker, worker.receive())
            for stream, worker in list(busy.items()):
                if worker.overdue():
                    del busy[stream]
                    finish(worker, Failure(TIMEOUT))
        return results

    def close(self) -> None:
        with self._lock:
            for worker in self._workers:
                worker.kill()
            self._workers = []

    def __enter__(self) -> HardTimeoutPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_size(workers: int | None) -> int:
    """`workers`, or one per CPU core up to MAX_DEFAULT_WORKERS."""
    return max(1, workers or min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS))


_shared: dict[tuple[str, int], HardTimeoutPool] = {}
_shared_lock = threading.Lock()


def shared_pool(target: str, workers: int | None = None) -> HardTimeoutPool:
    """One long-lived pool per (target, size), closed at interpreter exit."""
    size = default_size(workers)
    with _shared_lock:
        pool = _shared.get((target, size))
        if pool is None:
            pool = _shared[(target, size)] = HardTimeoutPool(target, size)
        return pool


@atexit.register
def _close_shared() -> None:
    for pool in _shared.values():
        pool.close()


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]) or None, int(sys.argv[3]) if len(sys.argv) > 3 else 0)
