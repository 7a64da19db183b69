"""Stage `ingest`: find every image of every data set, check it, read its sidecar caption.

The output is a manifest of usable images (pointing at the user's files, which are
not copied) and a list of rejected files with plain reasons. The expensive part, a
decode of each file, is cached per file content in the item store, so a rerun only
decodes new or edited files.
"""

from __future__ import annotations

import codecs
import os
import stat
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tuneline.config import Params
from tuneline.core.codeversion import code_version
from tuneline.stages.ingest import CODE
from tuneline.core.fsutil import digest_json, file_digest, rebuilt_dir, relative_to_root
from tuneline.core.images import (IMAGE_EXTENSIONS, SIDECAR_EXTENSIONS, ImageRejected, exact_pixel_digest,
                                  oriented_size, probe)
from tuneline.core.manifest import MANIFEST, REJECTED, write_jsonl
from tuneline.core.parallel import map_with_progress
from tuneline.core.report import StageReport
from tuneline.core.store import FileDigests, ItemStore

STAGE = "ingest"
CODE_VERSION = code_version(CODE)  # changes with the code that makes the items
ITEM_ID_LENGTH = 24


def probe_key(digest: str) -> str:
    return digest_json({"stage": STAGE, "code": CODE_VERSION, "bytes": digest})


def _probe_file(path: str, digest: str | None, store_dir: str, max_pixels: int) -> tuple[str | None, dict[str, Any], bool]:
    """Worker: hash one file and probe it unless the store knows its bytes already.

    Returns (digest, record, computed). A verdict that depends on settings or
    permissions is not stored.
    """
    try:
        digest = digest or file_digest(Path(path))
    except OSError as error:
        return None, {"ok": False, "reason": f"unreadable: {error.strerror or error}"}, False
    store = ItemStore(Path(store_dir), STAGE)
    key = probe_key(digest)
    known = store.read_json(key)
    if known is not None:  # a touched, renamed or copied file: same bytes, no new decode
        return digest, known, False
    try:
        record: dict[str, Any] = {"ok": True, **asdict(probe(Path(path), max_pixels))}
    except ImageRejected as rejected:
        record = {"ok": False, "reason": str(rejected)}
        if not rejected.cacheable:
            return digest, record, True
    store.write_json(key, record)
    return digest, record, True


def read_sidecar(image_path: Path) -> tuple[str | None, str | None]:
    """The caption in `<stem>.txt` beside an image, and a warning if it was not clean UTF-8."""
    sidecar = image_path.with_suffix(".txt")
    if not sidecar.is_file():
        return None, None
    raw = sidecar.read_bytes()
    warning = None
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = raw.decode("utf-16", errors="replace")
    else:
        raw = raw.removeprefix(codecs.BOM_UTF8)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            warning = f"{sidecar}: not UTF-8; undecodable bytes were replaced with U+FFFD"
    text = " ".join(text.split())
    return (text or None), warning


def _walk(folder: Path, dataset: str, root: Path, report: StageReport) -> list[Path]:
    """Every entry under `folder` except hidden ones, following symlinked folders (each real
    folder once: a link back up the tree is reported, not followed forever)."""
    entries: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            report.reject(relative_to_root(Path(dirpath), root), f"skipped: the folder {real} was already "
                          "searched through another path (a symbolic link loop or a second link)", dataset=dataset)
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        entries.extend(Path(dirpath) / name for name in filenames if not name.startswith("."))
    return sorted(entries)


MASK_STEM_SUFFIX = "_mask"  # <stem>_mask.png beside <stem>.<ext>: that image's loss mask, never an image itself
MASK_EXTENSION = ".png"


def is_mask_file(path: Path) -> bool:
    return path.stem.endswith(MASK_STEM_SUFFIX) and path.suffix.lower() in IMAGE_EXTENSIONS


def mask_file_of(image: Path) -> Path:
    return image.with_name(f"{image.stem}{MASK_STEM_SUFFIX}{MASK_EXTENSION}")


def discover(params: Params, root: Path, report: StageReport,
             masks: dict[Path, str] | None = None) -> list[tuple[str, Path]]:
    """(data set folder, file) for every image candidate, in a stable order; mask files
    (`<stem>_mask.png`) go into `masks` (file -> data set folder) instead."""
    found = []
    for dataset in params.datasets:
        for path in _walk(root / dataset.path, dataset.folder, root, report):
            suffix = path.suffix.lower()
            if is_mask_file(path):
                if masks is not None:
                    masks[path] = dataset.folder
                continue
            try:
                mode = os.stat(path).st_mode
            except OSError:
                report.reject(relative_to_root(path, root), "unreadable: broken symbolic link", dataset=dataset.folder)
                continue
            if suffix in IMAGE_EXTENSIONS and not stat.S_ISREG(mode):
                # Reading a FIFO would block forever; a device or socket is no image either.
                report.reject(relative_to_root(path, root), "not a regular file (a FIFO, socket or device)",
                              dataset=dataset.folder)
            elif suffix in IMAGE_EXTENSIONS:
                found.append((dataset.folder, path))
            elif suffix not in SIDECAR_EXTENSIONS:
                report.reject(relative_to_root(path, root), f"unsupported file type: {suffix or 'no extension'}",
                              dataset=dataset.folder)
    return found


def shared_sidecar_warnings(files: list[tuple[str, Path]], root: Path) -> list[str]:
    """One warning per `<stem>.txt` that captions several images (good.jpg and good.png)."""
    by_sidecar: dict[Path, list[Path]] = defaultdict(list)
    for _, path in files:
        by_sidecar[path.with_suffix(".txt")].append(path)
    return [f"{relative_to_root(sidecar, root)} captions {len(images)} images with the same stem "
            f"({', '.join(p.name for p in images)}): applied to each of them; rename one to give it its own caption"
            for sidecar, images in sorted(by_sidecar.items()) if len(images) > 1 and sidecar.is_file()]


def mask_of(path: Path, record: dict[str, Any], masks: dict[Path, str], digests: FileDigests,
            root: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the image's loss mask record, or None; a rejection reason, or None). A `<stem>_mask.png` beside the
    image wins over its alpha channel; the mask file must have the image's size (after EXIF orientation)."""
    from PIL import Image

    mask_path = mask_file_of(path)
    if mask_path in masks:
        try:  # the header only: the pixels are read at bucket time
            with Image.open(mask_path) as image:
                size = oriented_size(image)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            return None, f"mask {relative_to_root(mask_path, root)} is not a readable image: {error}"
        if size != (record["width"], record["height"]):
            return None, (f"mask {relative_to_root(mask_path, root)} is {size[0]}x{size[1]}, the image is "
                          f"{record['width']}x{record['height']}: a mask must have its image's size")
        mask = {"source": "file", "file": relative_to_root(mask_path, root), "digest": digests.digest(mask_path)}
        return mask, None
    if record["has_alpha"]:
        return {"source": "alpha"}, None
    return None, None


def check_inputs(params: Params, root: Path) -> None:
    """Configuration errors that must stop the stage before any work."""
    from tuneline.preflight import preflight

    preflight(params, root, stages=("ingest",))


class _Duplicates:
    """Finds exact duplicates: same bytes, or same pixels after normalising."""

    def __init__(self, store: ItemStore, max_pixels: int) -> None:
        self.store, self.max_pixels = store, max_pixels
        self.by_bytes: dict[str, str] = {}
        self.by_fingerprint: dict[str, list[tuple[str, str, dict[str, Any]]]] = defaultdict(list)

    def _exact(self, digest: str, path: Path, record: dict[str, Any]) -> str:
        if record["fingerprint_exact"]:
            return record["fingerprint"]
        if "exact_pixel_digest" not in record:
            # Only files whose reduced-decode fingerprints collide pay for a full decode.
            record["exact_pixel_digest"] = exact_pixel_digest(path, self.max_pixels)
            self.store.write_json(probe_key(digest), record)
        return record["exact_pixel_digest"]

    def original_of(self, digest: str, path: Path, source: str, record: dict[str, Any]) -> tuple[str, str] | None:
        """(rejection reason, source kept in place of this one), or None if this one is the first."""
        if digest in self.by_bytes:
            return f"duplicate: same bytes as {self.by_bytes[digest]}", self.by_bytes[digest]
        self.by_bytes[digest] = source
        candidates = self.by_fingerprint[record["fingerprint"]]
        for other_digest, other_source, other_record in candidates:
            other_path = Path(other_record["_path"])
            if self._exact(digest, path, record) == self._exact(other_digest, other_path, other_record):
                return f"duplicate: same pixels as {other_source}", other_source
        candidates.append((digest, source, {**record, "_path": str(path)}))
        return None


def run(params: Params, root: Path, out_dir: Path, metrics_dir: Path | None = None, *,
        tracker: Any = None) -> StageReport:
    """Ingest every data set of `params`; write `out_dir/manifest.jsonl` and `rejected.jsonl`."""
    started = time.perf_counter()
    root = Path(root)
    check_inputs(params, root)
    config = params.ingest
    report = StageReport(STAGE)
    store_dir = root / params.store_dir
    store = ItemStore(store_dir, STAGE)
    file_digests = FileDigests(store_dir / "file-digests.sqlite")

    masks: dict[Path, str] = {}
    files = discover(params, root, report, masks)
    found_count = len(files) + len(report.rejected)  # images plus files rejected on sight
    results: dict[int, tuple[str | None, dict[str, Any]]] = {}
    computed: set[int] = set()
    tasks = []
    for index, (_, path) in enumerate(files):
        digest = file_digests.cached(path)
        record = store.read_json(probe_key(digest)) if digest else None
        if record is not None:
            results[index] = (digest, record)
        else:
            tasks.append((str(path), digest, str(store_dir), config.max_pixels))
    pending = [index for index in range(len(files)) if index not in results]
    for index, (digest, record, was_computed) in zip(
        pending, map_with_progress(_probe_file, tasks, config.workers, "ingest: checking images")
    ):
        results[index] = (digest, record)
        if was_computed:
            computed.add(index)
        if digest is not None:
            file_digests.remember(files[index][1], digest)

    report.warnings.extend(shared_sidecar_warnings(files, root))
    duplicates = _Duplicates(store, config.max_pixels)
    manifest = []
    kept: dict[str, dict[str, Any]] = {}  # source -> its manifest record
    for index, (dataset, path) in enumerate(files):
        digest, record = results[index]
        source = relative_to_root(path, root)
        reason = _rejection(record, config.min_size, config.max_pixels)
        original = None
        if reason is None:
            found = duplicates.original_of(digest, path, source, record)
            if found is not None:
                reason, original = found
        mask = None
        if reason is None:
            mask, reason = mask_of(path, record, masks, file_digests, root)
        caption, warning = read_sidecar(path)
        if reason is not None:
            report.reject(source, reason, dataset=dataset)
            if original is not None and caption:
                _carry_caption(kept[original], source, caption, report)
            continue
        if warning:
            report.warnings.append(warning)
        if index in computed:
            report.computed += 1
        else:
            report.reused += 1
        kept[source] = {
            "id": digest[:ITEM_ID_LENGTH],
            "digest": digest,
            "dataset": dataset,
            "source": source,
            "width": record["width"],
            "height": record["height"],
            "format": record["format"],
            "has_alpha": record["has_alpha"],
            "background": config.background if record["has_alpha"] else None,
            "caption": caption,
            "caption_source": "sidecar" if caption else None,
            "key": probe_key(digest),
        }
        if mask is not None:  # only then: the records of images without a mask stay as they were
            kept[source]["mask"] = mask
        manifest.append(kept[source])
    file_digests.close()
    claimed = {mask_file_of(path) for _, path in files}
    for mask_path, dataset in sorted(masks.items()):
        if mask_path not in claimed:
            report.reject(relative_to_root(mask_path, root), "mask file without an image: a mask is named after "
                          f"its image, <stem>{MASK_STEM_SUFFIX}{MASK_EXTENSION} beside <stem>.png/.jpg/...",
                          dataset=dataset)

    with rebuilt_dir(out_dir) as staging:
        write_jsonl(staging / MANIFEST, manifest)
        write_jsonl(staging / REJECTED, report.rejected)
    per_dataset = defaultdict(int)
    for item in manifest:
        per_dataset[item["dataset"]] += 1
    report.extra.update({
        "files_found": found_count,
        "duplicates": sum(1 for r in report.rejected if r["reason"].startswith("duplicate")),
        "captions_from_sidecars": sum(1 for item in manifest if item["caption"]),
        "datasets": dict(per_dataset),
    })
    masked = sum(1 for item in manifest if "mask" in item)
    if masked:  # only then: reports of data without masks stay as they were
        report.extra["masks"] = masked
    report.seconds = time.perf_counter() - started
    if metrics_dir is not None:
        report.write_metrics(metrics_dir)
    return report


def _carry_caption(kept: dict[str, Any], duplicate: str, caption: str, report: StageReport) -> None:
    """A duplicate dropped with a sidecar caption: its caption moves to the copy that is kept,
    unless that copy has its own (then the twin's is reported, not silently lost)."""
    if not kept["caption"]:
        kept["caption"], kept["caption_source"] = caption, "sidecar"
        report.warnings.append(f"{duplicate} duplicates {kept['source']}: kept {kept['source']} with "
                               f"{duplicate}'s sidecar caption")
    elif kept["caption"] != caption:
        report.warnings.append(f"{duplicate} duplicates {kept['source']}: kept {kept['source']}'s caption; "
                               f"{duplicate}'s differs and is not used")


def _rejection(record: dict[str, Any], min_size: int, max_pixels: int) -> str | None:
    if not record["ok"]:
        return record["reason"]
    width, height = record["width"], record["height"]
    if min(width, height) < min_size:
        return f"too small: {width}x{height}, shorter side is below min_size {min_size}"
    if width * height > max_pixels:
        return (f"too many pixels: {width}x{height} = {width * height / 1e6:.1f} MP exceeds max_pixels "
                f"{max_pixels / 1e6:.1f} MP (decompression-bomb guard)")
    return None
