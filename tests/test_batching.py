"""tgm.batching.MicroBatcher: concurrent calls share forward passes, each caller gets its own rows back, errors
reach every caller of the failed batch, and a request that waited too long is refused."""

import asyncio
import threading
import time

import anyio
import numpy as np
import pytest

from tgm.batching import MicroBatcher, Overloaded


class Recorder:
    """A stand-in model (the real one is covered in test_service.py): row -> row * 10, slowly enough that
    calls pile up while it runs."""

    def __init__(self, seconds: float = 0.05, fail_on: int | None = None):
        self.seconds, self.fail_on, self.batches = seconds, fail_on, []
        self.running = threading.Lock()

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        assert self.running.acquire(blocking=False), "two batches ran at once"
        try:
            self.batches.append(rows[:, 0].tolist())
            time.sleep(self.seconds)
            if self.fail_on is not None and self.fail_on in rows[:, 0]:
                raise RuntimeError(f"row {self.fail_on} broke the model")
            return rows * 10
        finally:
            self.running.release()


def batcher(fn, max_batch_size=8, max_latency_ms=10_000, sizes=None):
    return MicroBatcher(
        fn, max_batch_size, max_latency_ms, anyio.CapacityLimiter(1), sizes.append if sizes is not None else None
    )


def test_concurrent_calls_share_batches_and_get_their_own_rows():
    model, sizes = Recorder(), []

    async def main():
        b = batcher(model, max_batch_size=8, sizes=sizes)
        return await asyncio.gather(*(b(np.array([[i], [100 + i]])) for i in range(12)))

    results = asyncio.run(main())
    for i, out in enumerate(results):
        assert out.tolist() == [[10 * i], [10 * (100 + i)]]
    # All 12 calls are queued before the first batch starts: 24 rows, whole calls only, at most 8 rows a batch.
    assert model.batches[0] == [0, 100, 1, 101, 2, 102, 3, 103]
    assert [len(b) for b in model.batches] == sizes == [8, 8, 8]


def test_a_request_larger_than_the_maximum_runs_alone():
    model = Recorder(seconds=0.0)

    async def main():
        return await batcher(model, max_batch_size=4)(np.arange(10).reshape(10, 1))

    assert asyncio.run(main()).ravel().tolist() == list(range(0, 100, 10))
    assert model.batches == [list(range(10))]


def test_an_error_reaches_every_caller_of_that_batch_and_no_other():
    model = Recorder(fail_on=5)

    async def main():
        b = batcher(model, max_batch_size=4)
        first = asyncio.ensure_future(b(np.array([[0]])))  # runs alone while the rest queue up
        await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(b(np.array([[i]]))) for i in range(1, 9)]
        return await asyncio.gather(first, *rest, return_exceptions=True)

    results = asyncio.run(main())
    assert model.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert [r.tolist() for r in results[:5]] == [[[0]], [[10]], [[20]], [[30]], [[40]]]
    assert all(isinstance(r, RuntimeError) and "row 5" in str(r) for r in results[5:])


def test_a_request_that_waited_past_the_latency_limit_is_refused():
    model = Recorder(seconds=0.2)

    async def main():
        b = batcher(model, max_latency_ms=50)
        first = asyncio.ensure_future(b(np.array([[1]])))
        await asyncio.sleep(0.01)
        late = asyncio.ensure_future(b(np.array([[2]])))  # queued behind a 200 ms batch
        return await asyncio.gather(first, late, return_exceptions=True)

    first, late = asyncio.run(main())
    assert first.tolist() == [[10]]
    assert isinstance(late, Overloaded) and "50 ms" in str(late)
    assert model.batches == [[1]]


def test_a_caller_that_went_away_is_skipped():
    model = Recorder(seconds=0.05)

    async def main():
        b = batcher(model)
        first = asyncio.ensure_future(b(np.array([[1]])))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(b(np.array([[2]])))
        kept = asyncio.ensure_future(b(np.array([[3]])))
        await asyncio.sleep(0.01)
        gone.cancel()
        return await asyncio.gather(first, kept)

    first, kept = asyncio.run(main())
    assert (first.tolist(), kept.tolist()) == ([[10]], [[30]])
    assert model.batches == [[1], [3]]


@pytest.mark.parametrize("size, latency", [(0, 100), (4, 0)])
def test_nonsense_settings_are_refused(size, latency):
    with pytest.raises(ValueError, match="max_batch_size"):
        batcher(Recorder(), max_batch_size=size, max_latency_ms=latency)
