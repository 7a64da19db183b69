"""Run a function over items in worker processes, with a progress bar."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tuneline.core.report import console

T = TypeVar("T")
THREAD_BATCH = 1024


def worker_count(requested: int | None, items: int) -> int:
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(requested or available, items))


def map_with_progress(
    function: Callable[..., T], tasks: Sequence[tuple[Any, ...]], workers: int | None, description: str,
    threads: bool = False,
) -> Iterator[T]:
    """Yield function(*task) for each task, in order. One worker runs in this process; `threads` for
    work that releases the GIL (hashing, file reads), where a worker process would only add its start."""
    if not tasks:
        return
    count = worker_count(workers, len(tasks))
    progress = Progress(
        TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
        transient=True,
    )
    with progress:
        bar = progress.add_task(description, total=len(tasks))
        if count == 1:
            for task in tasks:
                yield function(*task)
                progress.advance(bar)
            return
        if threads:  # a thread pool's map submits every task at once: batches keep its futures few
            with ThreadPoolExecutor(max_workers=count) as threads_pool:
                for start in range(0, len(tasks), THREAD_BATCH):
                    for result in threads_pool.map(function, *zip(*tasks[start:start + THREAD_BATCH])):
                        yield result
                        progress.advance(bar)
            return
        # Small chunks keep memory flat (each worker holds one image at a time) and the bar live.
        chunk = max(1, min(16, len(tasks) // (count * 8)))
        with ProcessPoolExecutor(max_workers=count) as pool:
            for result in pool.map(function, *zip(*tasks), chunksize=chunk):
                yield result
                progress.advance(bar)
