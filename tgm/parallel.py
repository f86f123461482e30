"""Per-file work of the data stages (ingest, validate, prepare) spread over a process pool or a Dask cluster.

Files go out in chunks and their results come back in input order, so a stage's outputs are the same, byte for
byte, whatever runs them. Two environment variables choose, not parameters, because they change how fast a stage
runs and never what it writes (DVC must not rerun a stage when they change):

- TGM_DATA_WORKERS: processes on this machine (default: every core).
- TGM_DASK_ADDRESS: a Dask scheduler (tcp://host:8786). Each chunk becomes a Prefect task run by Prefect's
  DaskTaskRunner on that cluster, in a flow run `tgm-data-chunks` that the Prefect UI shows. The workers need
  tgm installed and the images at the same paths (a shared file system): see docs/scale.md.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tgm.errors import UserError

T = TypeVar("T")
R = TypeVar("R")

CHUNK = 256  # files per task: large enough that pickling and scheduling cost little next to decoding them


def data_workers() -> int:
    value = os.environ.get("TGM_DATA_WORKERS", "")
    if not value:
        return os.cpu_count() or 1
    try:
        workers = int(value)
    except ValueError:
        raise UserError(f"TGM_DATA_WORKERS={value!r} is not an integer") from None
    if workers < 1:
        raise UserError(f"TGM_DATA_WORKERS={workers} must be at least 1")
    return workers


def _chunk(fn: Callable[[T], R], items: list[T]) -> list[R]:
    return [fn(x) for x in items]


def map_in_order(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """[fn(x) for x in items], computed by `workers` processes (default data_workers()) when there is enough work.

    `fn` must be picklable: a module-level function, or a functools.partial of one.
    """
    items = list(items)
    chunks = [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]
    address = os.environ.get("TGM_DASK_ADDRESS", "")
    if address and workers is None and chunks:
        return [r for part in _on_dask(fn, chunks, address) for r in part]
    workers = workers or data_workers()
    if workers == 1 or len(chunks) < 2:
        return _chunk(fn, items)
    # forkserver, not fork: a stage may hold threads (logging, libraries) that a forked child would inherit
    # mid-flight. The server imports fn's module once; each worker is a cheap fork of it.
    ctx = multiprocessing.get_context("forkserver")
    module = getattr(getattr(fn, "func", fn), "__module__", None)
    if module:
        ctx.set_forkserver_preload([module])
    with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=ctx) as pool:
        return [r for part in pool.map(_chunk, [fn] * len(chunks), chunks) for r in part]


def _on_dask(fn: Callable[[T], R], chunks: list[list[T]], address: str) -> list[list[R]]:
    """Each chunk as a Prefect task on the Dask cluster at `address`; results in chunk order."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect_dask import DaskTaskRunner

    # Inputs are file lists and results are rows: nothing worth caching or persisting between runs.
    chunk_task = task(_chunk, name="tgm-data-chunk", cache_policy=NO_CACHE, persist_result=False, retries=2)

    @flow(name="tgm-data-chunks", task_runner=DaskTaskRunner(address=address), persist_result=False)
    def data_chunks() -> list[list[R]]:
        futures = [chunk_task.submit(fn, chunk) for chunk in chunks]
        return [f.result() for f in futures]

    return data_chunks()
