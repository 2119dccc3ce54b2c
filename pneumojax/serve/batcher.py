"""Requests that arrive together share one device call: :class:`Batcher` gathers the items
submitted within a short window (at most ``max_batch``), hands them to one function on one
worker thread (the device's), and gives each caller its own result.

The event loop never waits on the device: it only queues items and resolves futures, so new
requests are read, decoded and queued while a batch runs, and they make up the next one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from typing import Any, Callable


@dataclasses.dataclass
class BatchStats:
    calls: int = 0  # device calls made
    items: int = 0  # items scored
    largest: int = 0  # the largest batch so far


class Batcher:
    """``fn(items) -> results`` (a list of the same length) over items submitted together.

    ``window_s``: how long the first item of a batch waits for others (0: only those already
    queued join it); ``max_batch``: the most items in one call. :meth:`start` and :meth:`stop`
    run on the event loop; :meth:`stop` finishes every item already submitted.
    """

    def __init__(self, fn: Callable[[list], list], max_batch: int, window_s: float):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        if window_s < 0:
            raise ValueError(f"the batch window must be >= 0 s, not {window_s}")
        self.fn, self.max_batch, self.window_s = fn, max_batch, window_s
        self.stats = BatchStats()
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._device = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="device")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Scores what is queued, then ends the worker."""
        if self._task is None:
            return
        await self._queue.put(None)
        await self._task
        self._task = None
        self._device.shutdown(wait=True)

    async def submit(self, item) -> Any:
        """The result of ``fn`` for ``item``, computed with whatever else arrives with it."""
        if self._task is None:
            raise RuntimeError("the batcher is not running")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch, stopping = await self._gather([first], loop.time() + self.window_s)
            items = [item for item, _ in batch]
            try:
                results = await loop.run_in_executor(self._device, self.fn, items)
            except Exception as error:  # every caller of this batch hears of it; serving goes on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.stats.calls += 1
            self.stats.items += len(items)
            self.stats.largest = max(self.stats.largest, len(items))
            for (_, future), result in zip(batch, results):
                if not future.done():  # a caller that went away has cancelled its future
                    future.set_result(result)
        while not self._queue.empty():  # submitted after stop(): nothing will score them
            leftover = self._queue.get_nowait()
            if leftover is not None and not leftover[1].done():
                leftover[1].set_exception(RuntimeError("the server is stopping"))

    async def _gather(self, batch: list, deadline: float) -> tuple[list, bool]:
        """Adds queued items to ``batch`` until it is full or the window has passed; True
        with it when the stop mark came."""
        loop = asyncio.get_running_loop()
        while len(batch) < self.max_batch:
            if self._queue.empty():
                wait = deadline - loop.time()
                if wait <= 0:
                    break
                try:
                    entry = await asyncio.wait_for(self._queue.get(), wait)
                except TimeoutError:
                    break
            else:
                entry = self._queue.get_nowait()
            if entry is None:
                return batch, True
            batch.append(entry)
        return batch, False
