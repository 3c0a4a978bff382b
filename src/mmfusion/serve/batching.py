"""Dynamic batching: many concurrent requests -> few model calls (one asyncio batcher per encoder).

    batcher = DynamicBatcher(fn, max_batch=32, max_delay_ms=5, queue_size=256, timeout_s=10)
    result = await batcher.submit(item)          # from any coroutine on one event loop

`fn(items: list) -> sequence of results` (one per item, same order) runs in a worker thread, so the event
loop keeps accepting requests while the model computes. A group closes when it holds `max_batch` items or
when its oldest item has waited `max_delay_ms`; items that arrive while the model runs form the next group.

Overload is explicit, never silent: a full queue raises `Overloaded(reason="queue_full")` at once, and an
item not answered within `timeout_s` raises `Overloaded(reason="timeout")` (the server turns both into 503
with Retry-After). The queue is a deque plus an Event, not `asyncio.wait_for(queue.get())`, which on Python
3.11 can take an item off the queue and then drop it when the timeout fires at the same moment.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class Overloaded(Exception):
    """The batcher cannot take or finish this item in time. `reason`: "queue_full" | "timeout"."""

    def __init__(self, reason: str, retry_after_s: float, message: str):
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass
class _Item:
    value: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """Group concurrent `submit` calls into calls of `fn` on lists of at most `max_batch` items.

    Counters: `executions` (calls of fn), `items` (items computed), `batch_sizes` (Counter size -> calls),
    `rejected` (Counter reason -> count), `queue_depth` (items waiting now).
    """

    def __init__(
        self,
        fn: Callable[[list[Any]], Sequence[Any]],
        max_batch: int = 32,
        max_delay_ms: float = 5.0,
        queue_size: int = 256,
        timeout_s: float = 10.0,
        name: str = "batcher",
    ):
        if max_batch < 1 or queue_size < 1 or max_delay_ms < 0 or timeout_s <= 0:
            raise ValueError(
                f"{name}: need max_batch >= 1, queue_size >= 1, max_delay_ms >= 0, timeout_s > 0; got "
                f"{max_batch}, {queue_size}, {max_delay_ms}, {timeout_s}"
            )
        self.fn = fn
        self.max_batch = max_batch
        self.max_delay_s = max_delay_ms / 1000.0
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self.name = name
        self.executions = 0
        self.items = 0
        self.batch_sizes: Counter[int] = Counter()
        self.rejected: Counter[str] = Counter()
        self.busy_s = 0.0  # wall time inside fn
        self._pending: deque[_Item] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"mmfusion-{name}")
        self._lock = threading.Lock()  # guards (re)starting the worker from different loops

    # ---- public --------------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def retry_after_s(self) -> float:
        """A hint for clients: the time to work off the current queue at the observed per-call time."""
        per_call = self.busy_s / self.executions if self.executions else 0.05
        return max(1.0, math.ceil(per_call * (len(self._pending) / self.max_batch + 1)))

    async def submit(self, value: Any) -> Any:
        """Queue one item and wait for its own result (or its own exception from fn)."""
        self._ensure_worker()
        if len(self._pending) >= self.queue_size:
            self.rejected["queue_full"] += 1
            raise Overloaded(
                "queue_full",
                self.retry_after_s(),
                f"{self.name}: queue full ({self.queue_size} waiting); retry later",
            )
        loop = asyncio.get_running_loop()
        item = _Item(value, loop.create_future())
        self._pending.append(item)
        # wake the worker only when it has something to decide: the first item of a group (it starts the
        # delay) or a full group (it stops waiting); waking it per item cost a task and a timer each
        if len(self._pending) == 1 or len(self._pending) >= self.max_batch:
            assert self._wakeup is not None
            self._wakeup.set()
        # the timeout resolves the item's future with the error (the worker then skips it), so no wait_for /
        # shield task per item
        expiry = loop.call_later(self.timeout_s, self._expire, item)
        try:
            return await item.future
        finally:
            expiry.cancel()

    def _expire(self, item: _Item) -> None:
        if item.future.done():
            return
        self.rejected["timeout"] += 1
        item.future.set_exception(
            Overloaded(
                "timeout",
                self.retry_after_s(),
                f"{self.name}: no result within {self.timeout_s:g} s; the server is overloaded, retry later",
            )
        )

    async def close(self) -> None:
        """Stop the worker; items still queued get an Overloaded error (none is left unanswered)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        self._fail_pending("closed")
        self._executor.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, Any]:
        return {
            "executions": self.executions,
            "items": self.items,
            "queue_depth": self.queue_depth,
            "batch_sizes": dict(sorted(self.batch_sizes.items())),
            "rejected": dict(self.rejected),
        }

    # ---- worker --------------------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._task is not None and self._loop is loop and not self._task.done():
                return
            if self._loop is not loop:  # a new event loop (e.g. a new test client): start over on it
                self._fail_pending("restarted")
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._run(), name=f"mmfusion-{self.name}")

    def _fail_pending(self, why: str) -> None:
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done() and not item.future.get_loop().is_closed():
                item.future.set_exception(Overloaded(why, 1.0, f"{self.name}: batcher {why}; retry"))

    async def _run(self) -> None:
        assert self._wakeup is not None
        wakeup = self._wakeup
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                wakeup.clear()
                await wakeup.wait()
            # wait for more items until the group is full or its oldest item's delay is used up
            deadline = self._pending[0].enqueued + self.max_delay_s
            while len(self._pending) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                wakeup.clear()
                try:
                    await asyncio.wait_for(wakeup.wait(), remaining)  # waits on an Event: nothing to lose
                except asyncio.TimeoutError:
                    break
            group: list[_Item] = []
            while self._pending and len(group) < self.max_batch:
                item = self._pending.popleft()
                if not item.future.done():  # skip items whose caller timed out already
                    group.append(item)
            if not group:
                continue
            values = [it.value for it in group]
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.fn, values)
            except asyncio.CancelledError:  # closing: answer the group before stopping
                for it in group:
                    if not it.future.done():
                        it.future.set_exception(Overloaded("closed", 1.0, f"{self.name}: batcher closed"))
                raise
            except Exception as e:  # every caller of the group gets the error, none is left waiting
                for it in group:
                    if not it.future.done():
                        it.future.set_exception(e)
                continue
            finally:
                self.busy_s += time.perf_counter() - start
                self.executions += 1
                self.items += len(group)
                self.batch_sizes[len(group)] += 1
            if len(results) != len(group):
                err = RuntimeError(f"{self.name}: fn returned {len(results)} results for {len(group)} items")
                for it in group:
                    if not it.future.done():
                        it.future.set_exception(err)
                continue
            for it, r in zip(group, results):
                if not it.future.done():
                    it.future.set_result(r)


__all__ = ["DynamicBatcher", "Overloaded"]
