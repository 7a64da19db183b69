"""manifest.jsonl / rejected.jsonl: one JSON record per line, the contract between stages."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tuneline.core.fsutil import atomic_path, canonical_json

MANIFEST = "manifest.jsonl"
REJECTED = "rejected.jsonl"


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(canonical_json(record) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_manifest(stage_dir: Path) -> list[dict[str, Any]]:
    """The records of a stage output folder; a clear error if the stage has not run."""
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the stage that writes {stage_dir} first")
    return read_jsonl(path)
