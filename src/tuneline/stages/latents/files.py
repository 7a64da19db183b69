"""The stored files' bytes (safetensors, metadata as JSON strings), written atomically in a
background thread."""

from __future__ import annotations

import json
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tuneline.core.fsutil import atomic_write_bytes
from tuneline.core.tensorfile import canonical_bytes

# Computed results waiting to be written; bounds memory when the encoder outruns the disk.
MAX_PENDING_WRITES = 64


def safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    # Canonical header: safetensors orders the metadata differently in every process, and the same latents
    # must be the same bytes wherever they are computed (shards, Dask workers, DVC and the flow).
    return canonical_bytes(save({name: t.contiguous() for name, t in tensors.items()}, metadata=text))


class Writer:
    """Atomic store writes in a background thread, at most MAX_PENDING_WRITES behind."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="latents-write")
        self._pending: deque[Future[None]] = deque()

    def write(self, path: Path, tensors: dict[str, Any], metadata: dict[str, Any]) -> None:
        self._pending.append(self._pool.submit(lambda: atomic_write_bytes(path, safetensors_bytes(tensors, metadata))))
        while len(self._pending) > MAX_PENDING_WRITES:
            self._pending.popleft().result()

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)
