"""Exclusive locks between processes of one project: one writer per stage output at a time.

flock is released by the kernel when its holder dies, so a killed stage never leaves a lock
behind; the holder writes its PID into the lock file so a second process can name it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path


class LockHeld(RuntimeError):
    """Another process holds the lock (the message names it and its PID)."""


def _holder(handle) -> str:
    handle.seek(0)
    text = handle.read().decode("utf-8", "replace").strip()
    return text or "unknown"


@contextlib.contextmanager
def exclusive(path: Path, what: str, wait: bool, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the body.

    Held by another process: with `wait`, block until it is free (after telling `on_wait`
    who holds it); without, raise LockHeld naming the holder's PID.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            if not wait:
                raise LockHeld(f"{what} is in use by another process ({holder}); wait for it to finish "
                               f"or stop it (lock file {path})") from None
            if on_wait is not None:
                on_wait(f"waiting for {what}: in use by another process ({holder})")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            handle.truncate(0)
            handle.write(f"PID {os.getpid()}\n".encode())
            handle.flush()
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
