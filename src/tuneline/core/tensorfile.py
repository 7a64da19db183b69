"""Byte-identical safetensors files for identical content.

safetensors writes its `__metadata__` map in hash order, which differs from process to
process: two saves of the same weights give different bytes, so every digest of the file
(DVC, cache keys, the export's provenance) sees a change that is not there. `canonicalize`
rewrites the header with its keys sorted; the tensor data is untouched.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tuneline.core.fsutil import atomic_path

_ALIGN = 8  # safetensors pads the header with spaces to a multiple of 8 bytes


def canonical_header(header: dict) -> bytes:
    ordered = {key: header[key] for key in sorted(header)}
    if "__metadata__" in ordered:
        ordered["__metadata__"] = dict(sorted(ordered["__metadata__"].items()))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return text + b" " * (-len(text) % _ALIGN)


def canonical_bytes(data: bytes) -> bytes:
    """A safetensors file held in memory (safetensors' `save`), with its header in canonical order."""
    (length,) = struct.unpack("<Q", data[:8])
    header = canonical_header(json.loads(data[8:8 + length]))
    return struct.pack("<Q", len(header)) + header + data[8 + length:]


def save_tensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors' save_file, atomic, with a canonical header (a multi-GB file is not copied)."""
    from safetensors.torch import save_file

    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata or None)
        canonicalize(tmp, in_place=True)
    return Path(path)


def canonicalize(path: Path, in_place: bool = False) -> Path:
    """Rewrite `path` with a sorted header, when it is not sorted already: atomically, or with
    `in_place` (a file no reader trusts yet) by overwriting the header where its length allows."""
    path = Path(path)
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        raw = handle.read(length)
        header = canonical_header(json.loads(raw))
        if header == raw:
            return path
        if in_place and len(header) == length:  # the usual case: the same keys in another order
            with open(path, "r+b") as out:
                out.seek(8)
                out.write(header)
            return path
        with atomic_path(path) as tmp, open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            while chunk := handle.read(1 << 24):
                out.write(chunk)
    return path


def check_header(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """Refuse non-string header values instead of letting safetensors fail deep inside."""
    metadata = dict(metadata or {})
    bad = {key: type(value).__name__ for key, value in metadata.items()
           if not isinstance(key, str) or not isinstance(value, str)}
    if bad:
        raise TypeError(f"safetensors metadata must be str -> str; not strings: {bad}")
    return metadata
