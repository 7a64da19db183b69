"""Captions a person edited: `data/caption_edits/<data set>/<id>.txt`, an input of the caption stage.

Why an input folder, not the output. DVC links its cached files into the workspace (the repo's
`.dvc/config` asks for hard links, else copies), which keeps one copy of derived data on disk but
makes every output read-only: `data/captioned/<data set>/<id>.txt` is DVC's cached copy itself. An
edit there would change that copy under its old hash (root ignores the read-only bit). The edits
folder is the user's: git tracks it, DVC lists it as a dependency of `caption`, so an edit reruns
caption (and the text embeddings of that one item), and `dvc checkout` never touches it.

An edit wins in every caption mode and is used verbatim (no trigger word is added). An empty file
asks for the automatic caption again. Edits are keyed by item id, the source image's content: a
replaced image starts afresh, a renamed one keeps its edit.

Two older ways still work, and each moves the edit into the folder:
- a caption edited in place in `data/captioned` (it differs from what the same folder's manifest
  recorded): saved to the folder; and when DVC's cache holds the caption the stage wrote (the
  object named by its md5) with other bytes, the edit went through a link into that object: it
  gets back the bytes its name says;
- an edit an older tuneline kept in the item store (`<store_dir>/caption-edits/<id>.txt`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneline.core.fsutil import atomic_write_text
from tuneline.core.manifest import read_manifest
from tuneline.stages.caption.text import normalize_caption, read_caption_file

LEGACY_STORE_DIR = "caption-edits"  # <store_dir>/caption-edits/<id>.txt, before the edits folder


@dataclass
class CaptionEdits:
    """The edits folder: `<root>/<data set>/<id>.txt`."""

    root: Path
    moved_in_place: int = 0  # edits found in the output folder and moved here this run
    moved_from_store: int = 0  # edits an older tuneline kept in the item store, moved here
    originals: list[bytes] = field(default_factory=list)  # what the stage wrote where edits were made
    repaired: int = 0  # DVC cache objects given back their bytes
    conflicts: list[str] = field(default_factory=list)  # edited in place and in the folder: the folder's kept

    _files: set[str] | None = field(default=None, repr=False)  # `<data set>/<id>.txt` of every edit file

    def path(self, dataset: str, item_id: str) -> Path:
        return self.root / dataset / f"{item_id}.txt"

    def _listed(self) -> set[str]:
        # One listing of the folder per run: a failed open per item would cost a data set's worth of syscalls.
        if self._files is None:
            self._files = ({path.relative_to(self.root).as_posix() for path in self.root.rglob("*.txt")}
                           if self.root.is_dir() else set())
        return self._files

    def get(self, dataset: str, item_id: str) -> str | None:
        if f"{dataset}/{item_id}.txt" not in self._listed():
            return None
        return read_caption_file(self.path(dataset, item_id)) or None  # an emptied file is no edit

    def save(self, dataset: str, item_id: str, text: str) -> None:
        atomic_write_text(self.path(dataset, item_id), text + "\n" if text else "")
        self._listed().add(f"{dataset}/{item_id}.txt")

    def orphans(self, records: list[dict[str, Any]]) -> list[str]:
        """Edit files (relative to the folder) that match no item: their image was replaced or removed."""
        if not self.root.is_dir():
            return []
        known = {f"{record['dataset']}/{record['id']}.txt" for record in records}
        found = (path.relative_to(self.root).as_posix() for path in self.root.rglob("*.txt"))
        return sorted(path for path in found if path not in known)


def collect_in_place_edits(out_dir: Path, edits: CaptionEdits) -> None:
    """Move every caption of the previous output that differs from its manifest into the edits folder
    (an emptied one too: it asks for the automatic caption), remembering what the stage had written."""
    try:
        previous = read_manifest(out_dir)
    except FileNotFoundError:
        return
    for record in previous:
        if not record.get("caption_file"):
            continue
        written = normalize_caption(record["caption"])
        text = read_caption_file(Path(out_dir) / record["caption_file"])
        if text is None or text == written:
            continue
        folder_edit = read_caption_file(edits.path(record["dataset"], record["id"]))
        if folder_edit is not None and folder_edit != written:
            # Both changed since the last run: the folder's edit is the one kept, the other is named.
            edits.conflicts.append(record["caption_file"])
        else:
            edits.save(record["dataset"], record["id"], text)
            edits.moved_in_place += 1
        edits.originals.append((record["caption"] + "\n").encode("utf-8"))  # as the stage writes it


def repair_dvc_cache(root: Path, edits: CaptionEdits) -> None:
    """Give DVC's cache objects of the edited captions back the bytes their md5 names, where an edit
    in place went through a link into them. Imports DVC only when there is something to check."""
    if not edits.originals or not (Path(root) / ".dvc").is_dir():
        return
    from dvc.repo import Repo

    repo = Repo(str(root))
    try:
        for data in edits.originals:
            oid = hashlib.md5(data).hexdigest()
            path = Path(repo.cache.local.oid_to_path(oid))
            if path.is_file() and hashlib.md5(path.read_bytes()).hexdigest() != oid:
                _write_in_place(path, data)
                edits.repaired += 1
    finally:
        repo.close()


def _write_in_place(path: Path, data: bytes) -> None:
    """The bytes of every link of `path` (the one inode) back to `data`; the file's mode is kept."""
    mode = os.stat(path).st_mode
    os.chmod(path, mode | 0o200)
    try:
        with open(path, "r+b") as handle:
            handle.write(data)
            handle.truncate()
    finally:
        os.chmod(path, mode)


def move_store_edits(store_dir: Path, records: list[dict[str, Any]], edits: CaptionEdits) -> None:
    """Edits an older tuneline kept in `<store_dir>/caption-edits/<id>.txt`, moved into the folder
    beside their item (an edit already in the folder wins)."""
    legacy = Path(store_dir) / LEGACY_STORE_DIR
    if not legacy.is_dir():
        return
    for record in records:
        old = legacy / f"{record['id']}.txt"
        if not old.is_file():
            continue
        if not edits.path(record["dataset"], record["id"]).is_file():
            edits.save(record["dataset"], record["id"], read_caption_file(old) or "")
            edits.moved_from_store += 1
        old.unlink()
