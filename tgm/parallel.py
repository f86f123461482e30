"""Per-file work of the data stages (ingest, validate, prepare) spread over a process pool.

Files go out in chunks and their results come back in input order, so a stage's outputs are the same, byte for
byte, whatever the number of workers: TGM_DATA_WORKERS (default: every core). It is an environment variable,
not a parameter, because it changes how fast a stage runs and never what it writes: DVC must not rerun a stage
when it changes.
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
    workers = workers or data_workers()
    chunks = [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]
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
