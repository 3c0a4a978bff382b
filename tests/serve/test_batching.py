import asyncio
import math
import threading
import time

import pytest

from mmfusion.serve.batching import DynamicBatcher, Overloaded


def run(coro):
    return asyncio.run(coro)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("n,b", [(10, 4), (8, 8), (1, 32), (33, 32)])
def test_n_simultaneous_requests_take_ceil_n_over_b_executions(n, b):
    calls = []

    def fn(items):
        calls.append(list(items))
        return [x * 10 for x in items]

    async def main():
        batcher = DynamicBatcher(fn, max_batch=b, max_delay_ms=50, queue_size=256, timeout_s=5)
        out = await asyncio.gather(*(batcher.submit(i) for i in range(n)))
        await batcher.close()
        return batcher, out

    batcher, out = run(main())
    assert out == [i * 10 for i in range(n)]  # each request got its own result, in its own order
    assert batcher.executions == len(calls) == math.ceil(n / b)
    assert all(len(c) <= b for c in calls) and sorted(x for c in calls for x in c) == list(range(n))
    assert sum(batcher.batch_sizes.values()) == batcher.executions and batcher.items == n


@pytest.mark.timeout(20)
def test_requests_arriving_within_the_delay_share_a_call_and_later_ones_do_not():
    def fn(items):
        return [f"r{x}" for x in items]

    async def main():
        batcher = DynamicBatcher(fn, max_batch=16, max_delay_ms=100, queue_size=64, timeout_s=5)

        async def late(x, delay):
            await asyncio.sleep(delay)
            return await batcher.submit(x)

        out = await asyncio.gather(late(0, 0), late(1, 0.02), late(2, 0.04))
        assert batcher.executions == 1  # all three inside the first item's 100 ms window
        out2 = await batcher.submit(3)
        await batcher.close()
        return batcher, out + [out2]

    batcher, out = run(main())
    assert out == ["r0", "r1", "r2", "r3"] and batcher.executions == 2


@pytest.mark.timeout(20)
def test_an_exception_in_fn_reaches_every_caller_of_the_group():
    def fn(items):
        raise ValueError("model broke")

    async def main():
        batcher = DynamicBatcher(fn, max_batch=4, max_delay_ms=20, queue_size=8, timeout_s=5)
        res = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
        await batcher.close()
        return res

    res = run(main())
    assert all(isinstance(r, ValueError) for r in res)


@pytest.mark.timeout(20)
def test_full_queue_and_timeout_are_explicit_overloads_and_nothing_is_lost():
    release = threading.Event()

    def slow(items):
        release.wait(5)
        return list(items)

    async def main():
        batcher = DynamicBatcher(slow, max_batch=1, max_delay_ms=0, queue_size=2, timeout_s=0.5)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(6)]
        res = await asyncio.gather(*tasks, return_exceptions=True)
        release.set()
        await batcher.close()
        return batcher, res

    batcher, res = run(main())
    reasons = [r.reason for r in res if isinstance(r, Overloaded)]
    assert "queue_full" in reasons and "timeout" in reasons
    assert len(res) == 6 and all(isinstance(r, (int, Overloaded)) for r in res)  # every caller answered
    assert all(r.retry_after_s >= 1 for r in res if isinstance(r, Overloaded))
    assert batcher.rejected["queue_full"] + batcher.rejected["timeout"] == len(reasons)


@pytest.mark.timeout(20)
def test_an_item_that_timed_out_in_the_queue_is_answered_once_and_never_computed():
    release, seen = threading.Event(), []

    def fn(items):
        seen.append(list(items))
        release.wait(5)
        return list(items)

    async def main():
        batcher = DynamicBatcher(fn, max_batch=1, max_delay_ms=0, queue_size=8, timeout_s=0.3)
        first = asyncio.create_task(batcher.submit("a"))  # the worker runs it and blocks in fn
        await asyncio.sleep(0.05)
        res = await asyncio.gather(first, batcher.submit("b"), return_exceptions=True)  # both time out
        release.set()
        late = await batcher.submit("c")  # the worker went on, skipping "b"
        await batcher.close()
        return batcher, res, late

    batcher, res, late = run(main())
    assert [r.reason for r in res] == ["timeout", "timeout"] and late == "c"
    assert seen == [["a"], ["c"]] and batcher.rejected["timeout"] == 2


@pytest.mark.timeout(20)
def test_model_runs_off_the_event_loop():
    def fn(items):
        time.sleep(0.2)
        return items

    async def main():
        batcher = DynamicBatcher(fn, max_batch=2, max_delay_ms=0, queue_size=8, timeout_s=5)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        await batcher.submit(1)
        t.cancel()
        await batcher.close()
        return ticks

    assert run(main()) >= 5  # the loop kept running while fn slept in the worker thread


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError):
        DynamicBatcher(lambda x: x, max_batch=0)
