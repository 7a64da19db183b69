"""The per-stage, content-addressed item store, and a stat cache of file digests.

Layout: `<store_dir>/<stage>/<key[:2]>/<key><suffix>`. A key is the digest of
everything that decides an item's result, so an existing entry is always valid and
a rerun computes only the keys that are missing. Entries are written atomically and
never modified, which is what makes hard-linking them into output folders safe.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from tuneline.core.fsutil import atomic_write_json, file_digest
from tuneline.core.packs import PackIndex, PackItem, pack_items, read_stored


def in_shard(key: str, shard: tuple[int, int] | None) -> bool:
    """True when `key` belongs to shard (index, count): int(key[:8], 16) % count == index.

    Every worker of a sharded stage (`--shard I/N`) computes only its own missing keys
    into the shared store; None (no sharding) takes every key.
    """
    if shard is None:
        return True
    index, count = shard
    return int(key[:8], 16) % count == index


class ItemStore:
    """Results of one stage, addressed by key: a loose file per item until it is packed
    (tuneline.core.packs), then its place in a pack."""

    def __init__(self, store_dir: Path, stage: str) -> None:
        self.root = Path(store_dir) / stage
        self.index = PackIndex(self.root)
        self._known: set[str] | None = None

    def path(self, key: str, suffix: str) -> Path:
        """Where a newly computed item is written (its loose file)."""
        return self.root / key[:2] / f"{key}{suffix}"

    def has(self, key: str, suffix: str) -> bool:
        name = key + suffix
        if self._known is None:
            self._known = self._stored_names()
        if name in self._known:  # an item never leaves the store (packing moves it), so a hit stays true
            return True
        # A miss is checked on disk: another process (a shard) may have stored it since.
        return self.path(key, suffix).is_file() or self.index.find(name) is not None

    def _stored_names(self) -> set[str]:
        """Every item the store holds now, loose or packed: one listing and one index query, where a
        check per item (a stat and a query each) would cost a whole data set's worth of round trips."""
        names: set[str] = set()
        try:
            folders = [entry for entry in os.scandir(self.root) if entry.is_dir() and len(entry.name) == 2]
        except FileNotFoundError:
            return names
        for folder in folders:
            names.update(os.listdir(folder.path))
        names.update(self.index.stored_items())
        return names

    def read_bytes(self, key: str, suffix: str) -> bytes:
        """The item's bytes, loose or packed."""
        return read_stored(self.root, self.index, key, suffix)

    def pack(self, staging: Path, items: list[PackItem], extension: str) -> dict[tuple[str, str], dict[str, Any]]:
        """Link the packs of `items` into `staging` (tuneline.core.packs.pack_items)."""
        return pack_items(self.root, self.index, staging, items, extension)

    def read_json(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.path(key, ".json").read_text("utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_json(self, key: str, record: dict[str, Any]) -> None:
        atomic_write_json(self.path(key, ".json"), record)


class FileDigests:
    """sha256 of files, cached by (path, size, mtime, inode) like git's index.

    Rehashing a large photo folder on every run would dominate an incremental rerun;
    a file whose stat is unchanged keeps its digest.
    """

    def __init__(self, db_path: Path) -> None:
        db_path = Path(db_path)
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(db_path, timeout=60)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, size INTEGER,"
            " mtime_ns INTEGER, inode INTEGER, digest TEXT)"
        )

    @staticmethod
    def _stat(path: Path) -> tuple[int, int, int]:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns, st.st_ino

    def snapshot(self) -> dict[str, tuple[int, int, int, str]]:
        """Every remembered file: {resolved path: (size, mtime_ns, inode, digest)}, read at once (one
        query, where a lookup per file would cost a round trip each)."""
        return {path: (size, mtime_ns, inode, digest)
                for path, size, mtime_ns, inode, digest in self._db.execute("SELECT * FROM digests")}

    def cached(self, path: Path) -> str | None:
        """The digest if the file is unchanged since it was last hashed, else None."""
        key = str(Path(path).resolve())
        row = self._db.execute(
            "SELECT size, mtime_ns, inode, digest FROM digests WHERE path = ?", (key,)
        ).fetchone()
        if row is None or tuple(row[:3]) != self._stat(path):
            return None
        return row[3]

    def remember(self, path: Path, digest: str, stat: tuple[int, int, int] | None = None) -> None:
        key = str(Path(path).resolve())
        size, mtime_ns, inode = stat or self._stat(path)
        self._db.execute(
            "INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?)", (key, size, mtime_ns, inode, digest)
        )

    def digest(self, path: Path) -> str:
        found = self.cached(path)
        if found is None:
            stat = self._stat(path)
            found = file_digest(path)
            self.remember(path, found, stat)
        return found

    def commit(self) -> None:
        self._db.commit()

    def close(self) -> None:
        self._db.commit()
        self._db.close()
