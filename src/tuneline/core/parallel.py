"""Run a function over items in worker processes, with a progress bar; the same bar for a stage's own
loops (render's images: `progress_bar`) and for training steps (`StepBar`)."""

from __future__ import annotations

import contextlib
import os
import time
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
    progress = _progress(description)
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


def _progress(description: str, *extra: Any, enabled: bool = True) -> Progress:
    """Every tuneline bar: description, bar, done/total, time left (then `extra` columns); gone when done."""
    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), *extra,
                    console=console, transient=True, disable=not enabled)


@contextlib.contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[], None]]:
    """A bar over `total` units of a loop this process runs; yields the function that counts one done."""
    with _progress(description) as progress:
        bar = progress.add_task(description, total=total)
        yield lambda: progress.advance(bar)


def counted(function: Callable[[Any], T], advance: Callable[[], None]) -> Callable[[Any], T]:
    """`function`, counting one unit done on each call (a per-item callback, like a path to save to)."""
    def call(item: Any) -> T:
        result = function(item)
        advance()
        return result

    return call


class StepBar:
    """The training steps' bar: done/total (total None: open-ended, by epochs), time left, and the last
    loss, lr and seconds per step. Shown by one process: `enabled` False on the others. Where the output
    is no terminal (a Prefect run's log), a bar does not draw: a plain line every PLAIN_EVERY_S says the same."""

    PLAIN_EVERY_S = 30.0

    def __init__(self, description: str, total: int | None, done: int, enabled: bool) -> None:
        self._description, self._total, self._done = description, total, done
        self._plain = enabled and not console.is_terminal
        self._said = time.monotonic()
        self._progress = _progress(description, TextColumn("{task.fields[note]}"), enabled=enabled)
        self._task = self._progress.add_task(description, total=total, completed=done, note="")
        self._progress.start()

    def advance(self) -> None:
        self._done += 1
        self._progress.advance(self._task)

    def note(self, **values: str) -> None:
        note = " ".join(f"{key} {value}" for key, value in values.items())
        self._progress.update(self._task, note=note)
        if self._plain and time.monotonic() - self._said >= self.PLAIN_EVERY_S:
            self._said = time.monotonic()
            total = "?" if self._total is None else self._total
            console.print(f"{self._description}: step {self._done}/{total} {note}", markup=False, highlight=False)

    def close(self) -> None:
        self._progress.stop()
