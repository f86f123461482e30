"""Adaptive batching inside the serving process: concurrent requests share one forward pass.

While a batch runs, new requests queue up; when it finishes, the queued rows (at most `max_batch_size`, whole
requests only) form the next batch. A request that finds the model idle runs at once, with no timer to wait out,
and under load the batches grow by themselves. A request still queued after `max_latency_ms` is refused with
Overloaded, which the service answers with a 503, rather than left to pile up.

Why not a separate BentoML model service with `batchable=True`: on a small CPU machine the hop to it (an HTTP
call, pickling, its own event loop polling for batches every millisecond) cost more than the model itself;
benchmarks/serve_load.py, run alternately on the same machine, measured 91-104 images/s at 32 clients that way
against 132-135 with this batcher.
"""

from __future__ import annotations

import asyncio
import collections
import time
import typing as t
from dataclasses import dataclass, field

import anyio.to_thread
import numpy as np


class Overloaded(Exception):
    """A request waited longer than the batcher's max latency before its turn came."""


@dataclass
class _Job:
    rows: np.ndarray
    future: asyncio.Future
    queued_at: float = field(default_factory=time.monotonic)


class MicroBatcher:
    def __init__(
        self,
        fn: t.Callable[[np.ndarray], np.ndarray],
        max_batch_size: int,
        max_latency_ms: float,
        lane: anyio.CapacityLimiter,
        on_batch: t.Callable[[int], None] | None = None,
    ):
        """`fn` maps (N, ...) rows to (N, ...) results in a worker thread, holding `lane` (the limiter that
        keeps torch work one call at a time); `on_batch` hears each batch's size."""
        if max_batch_size < 1 or max_latency_ms <= 0:
            raise ValueError(
                f"max_batch_size must be >= 1 and max_latency_ms > 0, got {max_batch_size}, {max_latency_ms}"
            )
        self.fn, self.max_batch_size, self.max_latency_s = fn, max_batch_size, max_latency_ms / 1000
        self.lane, self.on_batch = lane, on_batch
        self._queue: collections.deque[_Job] = collections.deque()
        self._worker: asyncio.Task | None = None

    async def __call__(self, rows: np.ndarray) -> np.ndarray:
        """Results for `rows`, computed in whichever batch they land in. A request larger than max_batch_size
        runs as a batch of its own."""
        job = _Job(rows, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await job.future

    def _next_batch(self) -> list[_Job]:
        jobs, size, too_old = [], 0, time.monotonic() - self.max_latency_s
        while self._queue and (not jobs or size + len(self._queue[0].rows) <= self.max_batch_size):
            job = self._queue.popleft()
            if job.future.done():  # its caller went away (client disconnected)
                continue
            if job.queued_at < too_old:
                job.future.set_exception(
                    Overloaded(
                        f"the request waited over {self.max_latency_s * 1000:.0f} ms for the model; try again later"
                    )
                )
                continue
            jobs.append(job)
            size += len(job.rows)
        return jobs

    async def _drain(self) -> None:
        while self._queue:
            jobs = self._next_batch()
            if not jobs:
                continue
            batch = np.concatenate([job.rows for job in jobs])
            try:
                out = await anyio.to_thread.run_sync(self.fn, batch, limiter=self.lane)
            except Exception as exc:  # noqa: BLE001 - every caller in the batch gets the error
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            start = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(out[start : start + len(job.rows)])
                start += len(job.rows)
