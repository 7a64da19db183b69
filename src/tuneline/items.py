"""`tuneline item`: one image as the stages see it, now that item files live in packs (tuneline.core.packs).

Finds an item by its raw file (`data/raw/shapes/photo.jpg`) or by `<data set>/<id>`, prints its bucket
and caption, writes its crop out (`--extract`), and starts a hand edit of its caption (`--edit`: the
current caption copied to `data/caption_edits/<data set>/<id>.txt`, the file the caption stage reads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneline.core import layout
from tuneline.core.fsutil import atomic_write_bytes
from tuneline.core.manifest import MANIFEST, read_jsonl
from tuneline.core.packs import read_member
from tuneline.stages.caption.edits import CaptionEdits


class ItemNotFound(LookupError):
    pass


def _records(root: Path, folder: str) -> list[dict[str, Any]]:
    path = root / folder / MANIFEST
    return read_jsonl(path) if path.is_file() else []


def find_item(root: Path, name: str) -> dict[str, Any]:
    """The latest stage record (captioned, else bucketed) of the item named by a raw file or `<data set>/<id>`."""
    root = Path(root)
    wanted = name.strip().removeprefix("./")
    ingested = {record["id"]: record for record in _records(root, layout.INGESTED)}
    ids = [item_id for item_id, record in ingested.items()
           if record.get("source") == wanted or f"{record['dataset']}/{item_id}" == wanted]
    for folder in (layout.CAPTIONED, layout.BUCKETED):
        for record in _records(root, folder):
            if record["id"] in ids or f"{record['dataset']}/{record['id']}" == wanted:
                return {**record, "folder": folder, "source": ingested.get(record["id"], {}).get("source")}
    if not ingested:
        raise ItemNotFound(f"{root / layout.INGESTED / MANIFEST} does not exist: run the ingest and bucket stages first")
    raise ItemNotFound(f"no bucketed item is {name!r}: give a raw image path (as in {layout.INGESTED}/{MANIFEST}, "
                       f"e.g. {next(iter(ingested.values()))['source']}) or <data set>/<id>")


def describe(record: dict[str, Any]) -> list[str]:
    width, height = record["bucket"]
    lines = [f"{record['dataset']}/{record['id']}  (from {record.get('source') or 'a file no longer in ' + layout.RAW})",
             f"  bucket {width}x{height}, original {record['original_size'][0]}x{record['original_size'][1]}, "
             f"crop top-left {tuple(record['crop_top_left'])}",
             f"  image: {record['folder']}/{record['image']['pack']} member {record['image']['member']}"]
    if "caption_source" in record and record["folder"] == layout.CAPTIONED:
        lines.append(f"  caption ({record['caption_source']}): {record['caption']}")
    return lines


def extract(root: Path, record: dict[str, Any], folder: Path) -> Path:
    """Write the item's bucketed crop to `folder/<id>.png`."""
    target = Path(folder) / f"{record['id']}.png"
    atomic_write_bytes(target, read_member(Path(root) / record["folder"], record["image"]))
    return target


def start_edit(root: Path, record: dict[str, Any]) -> tuple[Path, bool]:
    """(the hand-edit file of the item's caption, whether it was created now with the current caption)."""
    if record["folder"] != layout.CAPTIONED:
        raise ItemNotFound(f"{record['dataset']}/{record['id']} has no caption yet: run the caption stage first")
    edits = CaptionEdits(Path(root) / layout.CAPTION_EDITS)
    path = edits.path(record["dataset"], record["id"])
    if path.exists():
        return path, False
    edits.save(record["dataset"], record["id"], record["caption"])
    return path, True
