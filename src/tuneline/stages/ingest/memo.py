"""The ingest stage's stored probe records and sidecar captions, copied into one SQLite file that a run
reads in a few queries: a rerun over N images then opens no file per image. (Reading N probe records
and N sidecar captions one file each was most of a one-image change at 20,000 images once the page
cache had dropped them: 4 s of ingest's 4.3.)

Rows are keyed by content, a probe record by its probe key (the image's sha256 and probe.py's code
version), a caption by its sidecar file's sha256 (from the scan), so a row never goes stale. The item
store's records stay the source of truth: a key the memo lacks is read there and then copied in.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

MEMO_FILE = "memo.db"
_BATCH = 500  # keys per query: well under SQLite's limit of host parameters


class IngestMemo:
    def __init__(self, stage_root: Path) -> None:
        path = Path(stage_root) / MEMO_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=60)
        self._db.execute("CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY, record TEXT)")
        self._db.execute("CREATE TABLE IF NOT EXISTS captions (digest TEXT PRIMARY KEY, caption TEXT,"
                         " not_utf8 INTEGER)")

    def _select(self, table: str, column: str, keys: Iterable[str]) -> list[tuple[Any, ...]]:
        wanted = sorted(set(keys))
        rows: list[tuple[Any, ...]] = []
        for start in range(0, len(wanted), _BATCH):
            chunk = wanted[start:start + _BATCH]
            rows.extend(self._db.execute(f"SELECT * FROM {table} WHERE {column} IN ({','.join('?' * len(chunk))})",
                                         chunk))
        return rows

    def records(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """{probe key: record} of the keys the memo holds."""
        return {key: json.loads(record) for key, record in self._select("records", "key", keys)}

    def captions(self, digests: Iterable[str]) -> dict[str, tuple[str | None, bool]]:
        """{sidecar sha256: (caption, whether its bytes were not UTF-8)} of the digests the memo holds."""
        return {digest: (caption, bool(not_utf8)) for digest, caption, not_utf8 in
                self._select("captions", "digest", digests)}

    def put_records(self, records: Mapping[str, dict[str, Any]]) -> None:
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO records VALUES (?, ?)",
                                 [(key, json.dumps(record, sort_keys=True)) for key, record in records.items()])

    def put_captions(self, captions: Mapping[str, tuple[str | None, bool]]) -> None:
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO captions VALUES (?, ?, ?)",
                                 [(digest, caption, int(not_utf8)) for digest, (caption, not_utf8) in captions.items()])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "IngestMemo":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
