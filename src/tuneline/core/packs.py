"""Packs: a stage's item files grouped into a bounded number of tar files, so DVC tracks
thousands of files, not one per image.

An item's pack is decided by its content id alone (`<data set>/<id[:pack_digits]>`, at most 256 per
data set at the default 2), so a new image touches one pack of every stage and leaves the others byte for byte as they
were. A pack is an uncompressed, deterministic tar (the webdataset layout: `<id>.<ext>` members;
`tar -xf` opens it); the manifest record of an item names its member with the byte offset and size,
so a reader seeks straight to it (`read_member`).

Packs live in the item store (`<store>/<stage>/packs/`), keyed by their members' item keys: the
output folder links them, DVC's link cache links them again, and the loose item files a stage
computed are deleted once packed (one copy of the bytes), as is a pack whose every item a newer
pack also holds (the pack a group had before an image was added to it). The store's index (`index.db`)
maps every packed item key to its pack and place, so a stored item stays found (`ItemStore.has`,
`ItemStore.read_bytes`) after its loose file is gone: a setting changed back reuses it.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import struct
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tuneline.core.fsutil import atomic_path, digest_json, link_or_copy

PACKS_DIR = "packs"
INDEX_FILE = "index.db"
# Every member the same: the same items give the same bytes on every machine (DVC, Prefect, Dask).
_MEMBER_MODE = 0o444


def pack_of(dataset: str, item_id: str, digits: int) -> str:
    """The pack (relative path without extension) that holds item `item_id` of `dataset`: the first `digits`
    hex digits of its id (params `pack_digits`), so at most 16**digits packs per data set."""
    return f"{dataset}/{item_id[:digits]}"


@dataclass(frozen=True)
class PackItem:
    """One member to put into a pack: `name` inside pack `pack` + `extension`, bytes of stored `key` + `suffix`."""

    pack: str
    name: str
    key: str
    suffix: str


def member_ref(pack_file: str, name: str, offset: int, size: int) -> dict[str, Any]:
    """A manifest's reference to one member (plain JSON)."""
    return {"pack": pack_file, "member": name, "offset": offset, "size": size}


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def read_member(folder: Path, ref: Mapping[str, Any]) -> bytes:
    """The bytes of a member referenced by a manifest record (`member_ref`), read at its offset."""
    path = Path(folder) / ref["pack"]
    data = _read_at(path, int(ref["offset"]), int(ref["size"]))
    if len(data) != int(ref["size"]):
        raise OSError(f"{path}: member {ref['member']} is cut short ({len(data)} of {ref['size']} bytes): "
                      "the pack changed after its manifest was written; run the stage that writes it again")
    return data


def member_header(folder: Path, ref: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON header of a packed safetensors member (its tensors' dtypes and shapes, `__metadata__`),
    read without its tensor data."""
    path, offset = Path(folder) / ref["pack"], int(ref["offset"])
    (length,) = struct.unpack("<Q", _read_at(path, offset, 8))
    return json.loads(_read_at(path, offset + 8, length))


def open_member(folder: Path, ref: Mapping[str, Any]) -> BinaryIO:
    """A member as a file object (PIL, safetensors' `load` take it or its bytes)."""
    return io.BytesIO(read_member(folder, ref))


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> dict[str, tuple[int, int]]:
    """Write an uncompressed, deterministic tar atomically; (offset, size) of each member's data."""
    places: dict[str, tuple[int, int]] = {}
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, _MEMBER_MODE
            archive.addfile(info, io.BytesIO(data))  # writes a copy of `info`: the offset is computed
            padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            places[name] = (archive.offset - padded, len(data))
    return places


class PackIndex:
    """Where each packed item key is: (pack key, member, offset, size), in SQLite beside the packs."""

    def __init__(self, stage_root: Path) -> None:
        self.packs_dir = Path(stage_root) / PACKS_DIR
        self._db: sqlite3.Connection | None = None

    def _connect(self, create: bool) -> sqlite3.Connection | None:
        if self._db is None:
            path = self.packs_dir / INDEX_FILE
            if not create and not path.is_file():
                return None
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=60)
            self._db.execute("CREATE TABLE IF NOT EXISTS members (pack TEXT, member TEXT, item TEXT, offset INTEGER,"
                             " size INTEGER, PRIMARY KEY (pack, member))")
            self._db.execute("CREATE INDEX IF NOT EXISTS by_item ON members (item)")
        return self._db

    def pack_path(self, pack_key: str) -> Path:
        return self.packs_dir / pack_key[:2] / f"{pack_key}.tar"

    def find(self, item: str) -> tuple[Path, int, int] | None:
        """(pack file, offset, size) of a packed item (`key + suffix`) whose pack still exists."""
        db = self._connect(create=False)
        if db is None:
            return None
        for pack_key, offset, size in db.execute("SELECT pack, offset, size FROM members WHERE item = ?", (item,)):
            path = self.pack_path(pack_key)
            if path.is_file():
                return path, offset, size
        return None

    def stored_items(self) -> set[str]:
        """Every indexed item (`key + suffix`) whose pack still exists."""
        db = self._connect(create=False)
        if db is None:
            return set()
        by_pack: dict[str, list[str]] = {}
        for pack_key, item in db.execute("SELECT pack, item FROM members"):
            by_pack.setdefault(pack_key, []).append(item)
        return {item for pack_key, items in by_pack.items() if self.pack_path(pack_key).is_file() for item in items}

    def members(self, pack_key: str) -> dict[str, tuple[int, int]]:
        db = self._connect(create=False)
        if db is None:
            return {}
        rows = db.execute("SELECT member, offset, size FROM members WHERE pack = ?", (pack_key,))
        return {member: (offset, size) for member, offset, size in rows}

    def add(self, pack_key: str, rows: Iterable[tuple[str, str, int, int]]) -> None:
        """Record a written pack's members: (member, item, offset, size)."""
        db = self._connect(create=True)
        assert db is not None
        with db:
            db.executemany("INSERT OR REPLACE INTO members VALUES (?, ?, ?, ?, ?)",
                           [(pack_key, member, item, offset, size) for member, item, offset, size in rows])

    def prune_superseded(self, written: Iterable[str]) -> int:
        """Delete the packs that `written` (packs just written) made redundant: each other pack sharing an
        item with them whose every item is also in another pack that exists and stays. That is the pack a
        group had before it gained an item (or before pack_digits changed): without this, every added image
        would leave a superseded copy of its pack in every stage's store. A pack holding an item found
        nowhere else is kept (an image removed may come back). Returns how many packs were deleted."""
        db = self._connect(create=False)
        if db is None:
            return 0
        written = list(written)
        keep, pruned = set(written), []
        candidates = {other for pack_key in written for (other,) in db.execute(
            "SELECT DISTINCT b.pack FROM members a JOIN members b ON a.item = b.item WHERE a.pack = ? AND b.pack != ?",
            (pack_key, pack_key))} - keep
        exists: dict[str, bool] = {}

        def stays(pack_key: str) -> bool:
            if pack_key not in exists:
                exists[pack_key] = self.pack_path(pack_key).is_file()
            return exists[pack_key] and pack_key not in pruned

        for candidate in sorted(candidates):
            covered: dict[str, bool] = {}
            for item, other in db.execute("SELECT a.item, b.pack FROM members a LEFT JOIN members b"
                                          " ON a.item = b.item AND b.pack != a.pack WHERE a.pack = ?", (candidate,)):
                covered[item] = covered.get(item, False) or (other is not None and stays(other))
            if covered and all(covered.values()):
                pruned.append(candidate)
        with db:
            for pack_key in pruned:
                # The file first: an interruption leaves index rows of a missing pack, which no lookup returns.
                self.pack_path(pack_key).unlink(missing_ok=True)
                db.execute("DELETE FROM members WHERE pack = ?", (pack_key,))
        return len(pruned)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def read_stored(stage_root: Path, index: PackIndex, key: str, suffix: str) -> bytes:
    """A stored item's bytes: its loose file (`<key[:2]>/<key><suffix>`), else its place in a pack."""
    loose = Path(stage_root) / key[:2] / f"{key}{suffix}"
    try:
        return loose.read_bytes()
    except FileNotFoundError:
        pass
    found = index.find(key + suffix)
    if found is None:
        raise FileNotFoundError(f"stored item {key}{suffix} is in neither {loose.parent} nor a pack")
    return _read_at(*found)


def pack_items(stage_root: Path, index: PackIndex, staging: Path, items: list[PackItem], extension: str
               ) -> dict[tuple[str, str], dict[str, Any]]:
    """Link into `staging` one pack per `PackItem.pack` (as `<pack><extension>`), writing the packs
    the store does not have yet; the manifest reference of every (pack, name).

    A pack's key is the digest of its members' names and item keys, so an unchanged group of items
    links the pack it had before and reads nothing. Loose item files that went into a new pack are
    deleted afterwards: the pack is their one copy, and the index finds them there; so is a pack the
    new ones superseded (PackIndex.prune_superseded).
    """
    groups: dict[str, list[PackItem]] = {}
    for item in items:
        groups.setdefault(item.pack, []).append(item)
    refs: dict[tuple[str, str], dict[str, Any]] = {}
    packed_loose: list[Path] = []
    written: list[str] = []
    for pack, members in groups.items():
        members.sort(key=lambda member: member.name)
        pack_key = digest_json({"format": "tar-1", "members": [[m.name, m.key + m.suffix] for m in members]})
        path = index.pack_path(pack_key)
        places = index.members(pack_key) if path.is_file() else {}
        if len(places) != len(members):
            places = write_tar(path, ((m.name, read_stored(stage_root, index, m.key, m.suffix)) for m in members))
            index.add(pack_key, [(m.name, m.key + m.suffix, *places[m.name]) for m in members])
            packed_loose.extend(Path(stage_root) / m.key[:2] / f"{m.key}{m.suffix}" for m in members)
            written.append(pack_key)
        pack_file = pack + extension
        link_or_copy(path, staging / pack_file)
        for member in members:
            refs[(pack, member.name)] = member_ref(pack_file, member.name, *places[member.name])
    for loose in packed_loose:
        # Only after every pack is written and indexed: an interruption before this leaves two
        # copies for a while, never none.
        try:
            os.unlink(loose)
        except FileNotFoundError:
            pass
    if written:
        index.prune_superseded(written)
    return refs
