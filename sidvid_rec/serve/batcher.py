"""Micro-batching of concurrent requests onto one model thread.

Requests are put on an asyncio queue; one collector task takes the first waiting request,
then keeps taking more until it holds ``max_batch`` of them or ``max_wait_s`` has passed since
the first, and hands the whole batch to a single worker thread (one call of ``fn``). Results
are scattered back to each request's future in order. Because there is exactly one worker
thread, ``fn`` (torch) never runs concurrently with itself, and while it runs new requests
queue up for the next batch.
"""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Generic, List, Optional, Sequence, Tuple, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Collects submitted items into batches for ``fn``.

    Args:
        fn: ``items -> results`` (same length, same order), run in the worker thread; a result
            that is an ``Exception`` instance is raised to that item's caller alone, and an
            exception raised by ``fn`` goes to every caller of the batch.
        max_batch: most items per call of ``fn``.
        max_wait_s: longest a request waits for others to join its batch.
    """

    def __init__(self, fn: Callable[[List[T]], Sequence[Any]], max_batch: int, max_wait_s: float) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max(0.0, max_wait_s)
        self._queue: "Optional[asyncio.Queue[Tuple[T, asyncio.Future]]]" = None
        self._task: Optional[asyncio.Task] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self.requests = 0
        self.batches = 0
        self.largest_batch = 0
        self.model_seconds = 0.0

    async def start(self) -> None:
        """Starts the collector and the worker thread (inside the serving event loop)."""
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sidvid-model")
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        """Whether the collector is running (it stops only when the server does)."""
        return self._task is not None and not self._task.done()

    def run_in_worker(self, fn: Callable[[], R]) -> "asyncio.Future[R]":
        """Runs ``fn`` on the model thread (e.g. a warm-up call), between batches."""
        assert self._executor is not None, "start() first"
        return asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def submit(self, item: T) -> R:
        """``fn``'s result for ``item``, computed in some batch."""
        assert self._queue is not None, "start() first"
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    def _timed(self, items: List[T]) -> Sequence[Any]:
        start = time.perf_counter()
        try:
            return self._fn(items)
        finally:
            self.model_seconds += time.perf_counter() - start

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        assert queue is not None
        getter: Optional[asyncio.Future] = None
        while True:
            if getter is None:
                getter = asyncio.ensure_future(queue.get())
            pending = [await getter]
            getter = None
            deadline = loop.time() + self.max_wait_s
            while len(pending) < self.max_batch:
                try:
                    pending.append(queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                # Waiting without cancelling the getter on timeout: a cancelled queue.get() may
                # swallow an item; an unfinished one just becomes the next batch's first request.
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter}, timeout=remaining)
                if not done:
                    break
                pending.append(getter.result())
                getter = None
            live = [(item, fut) for item, fut in pending if not fut.done()]  # callers gone: skip
            if not live:
                continue
            self.batches += 1
            self.requests += len(live)
            self.largest_batch = max(self.largest_batch, len(live))
            try:
                results = await loop.run_in_executor(self._executor, self._timed, [item for item, _ in live])
            except Exception as e:  # noqa: BLE001  (delivered to every caller of the batch)
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), result in zip(live, results):
                if fut.done():
                    continue
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
