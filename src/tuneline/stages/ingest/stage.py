"""Stage `ingest`: every image the scan stage listed, checked, with its sidecar caption and mask.

The output is a manifest of usable images (pointing at the user's files, which are
not copied) and a list of rejected files with plain reasons. The expensive part, a
decode of each file, is cached per file content in the item store (probe.py, the stage's
CODE), so a rerun only decodes new or edited files; the files' digests come from the scan
(data/scanned). This module rebuilds the output from the records on every run.
"""

from __future__ import annotations

import codecs
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline.config import Params
from tuneline.core.fsutil import rebuilt_dir
from tuneline.core.images import IMAGE_EXTENSIONS, SIDECAR_EXTENSIONS, oriented_size
from tuneline.core.manifest import MANIFEST, REJECTED, read_manifest, write_jsonl
from tuneline.core.parallel import map_with_progress
from tuneline.core.report import StageReport
from tuneline.core.store import ItemStore
from tuneline.stages.ingest.memo import IngestMemo
from tuneline.stages.ingest.probe import STAGE, exact_pixels, probe_file, probe_key

ITEM_ID_LENGTH = 24


def decode_sidecar(raw: bytes) -> tuple[str | None, bool]:
    """A sidecar file's caption (whitespace collapsed; None when empty), and whether its bytes were not
    clean UTF-8 (undecodable bytes replaced). UTF-16 with a BOM and UTF-8 with a BOM are read too."""
    not_utf8 = False
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = raw.decode("utf-16", errors="replace")
    else:
        raw = raw.removeprefix(codecs.BOM_UTF8)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            not_utf8 = True
    text = " ".join(text.split())
    return (text or None), not_utf8


def not_utf8_warning(sidecar: Path) -> str:
    return f"{sidecar}: not UTF-8; undecodable bytes were replaced with U+FFFD"


MASK_STEM_SUFFIX = "_mask"  # <stem>_mask.png beside <stem>.<ext>: that image's loss mask, never an image itself
MASK_EXTENSION = ".png"


def suffix_of(path: str) -> str:
    """The file name's extension, lower case with its dot ('' without one), as Path.suffix gives it."""
    name = path.rpartition("/")[2]
    stem, dot, suffix = name.rpartition(".")
    return f".{suffix.lower()}" if dot and stem and suffix else ""


def is_mask_file(path: str) -> bool:
    return path.rpartition(".")[0].endswith(MASK_STEM_SUFFIX) and suffix_of(path) in IMAGE_EXTENSIONS


def mask_file_of(image: str) -> str:
    return f"{image.rpartition('.')[0]}{MASK_STEM_SUFFIX}{MASK_EXTENSION}"


def sidecar_of(image: str) -> str:
    return f"{image.rpartition('.')[0]}.txt"


@dataclass
class Inputs:
    """What the scan listed, sorted by kind: images (data set, path, digest) in path order,
    masks (path -> data set, digest) and the sidecar captions that exist (path -> digest)."""

    images: list[tuple[str, str, str]]
    masks: dict[str, tuple[str, str]]
    sidecars: dict[str, str]


def sort_inputs(scanned: list[dict[str, Any]], report: StageReport) -> Inputs:
    """Sort the scan stage's records into images, masks and sidecars; reject the rest with a reason.
    Paths stay as the scan wrote them (relative to the project root)."""
    inputs = Inputs([], {}, {})
    for record in scanned:
        path, dataset = record["path"], record["dataset"]
        if "problem" in record:
            report.reject(path, record["problem"], dataset=dataset)
            continue
        suffix = suffix_of(path)
        if is_mask_file(path):
            inputs.masks[path] = (dataset, record["digest"])
        elif suffix in IMAGE_EXTENSIONS:
            inputs.images.append((dataset, path, record["digest"]))
        elif suffix in SIDECAR_EXTENSIONS:
            inputs.sidecars[path] = record["digest"]
        else:
            report.reject(path, f"unsupported file type: {suffix or 'no extension'}", dataset=dataset)
    return inputs


def shared_sidecar_warnings(inputs: Inputs) -> list[str]:
    """One warning per `<stem>.txt` that captions several images (good.jpg and good.png)."""
    by_sidecar: dict[str, list[str]] = defaultdict(list)
    for _, path, _ in inputs.images:
        by_sidecar[sidecar_of(path)].append(path)
    return [f"{sidecar} captions {len(images)} images with the same stem "
            f"({', '.join(p.rpartition('/')[2] for p in images)}): applied to each of them; rename one to give it "
            "its own caption"
            for sidecar, images in sorted(by_sidecar.items()) if len(images) > 1 and sidecar in inputs.sidecars]


def mask_of(path: str, record: dict[str, Any], inputs: Inputs, root: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the image's loss mask record, or None; a rejection reason, or None). A `<stem>_mask.png` beside the
    image wins over its alpha channel; the mask file must have the image's size (after EXIF orientation)."""
    from PIL import Image

    mask_path = mask_file_of(path)
    if mask_path in inputs.masks:
        try:  # the header only: the pixels are read at bucket time
            with Image.open(root / mask_path) as image:
                size = oriented_size(image)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            return None, f"mask {mask_path} is not a readable image: {error}"
        if size != (record["width"], record["height"]):
            return None, (f"mask {mask_path} is {size[0]}x{size[1]}, the image is "
                          f"{record['width']}x{record['height']}: a mask must have its image's size")
        return {"source": "file", "file": mask_path, "digest": inputs.masks[mask_path][1]}, None
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
        self.by_fingerprint: dict[str, list[tuple[str, str, dict[str, Any], Path]]] = defaultdict(list)
        self.updated: dict[str, dict[str, Any]] = {}  # probe key -> its record, now with its exact pixel digest

    def _exact(self, digest: str, path: Path, record: dict[str, Any]) -> str:
        had = record["fingerprint_exact"] or "exact_pixel_digest" in record
        value = exact_pixels(self.store, digest, path, record, self.max_pixels)
        if not had:
            self.updated[probe_key(digest)] = record
        return value

    def original_of(self, digest: str, path: Path, source: str, record: dict[str, Any]) -> tuple[str, str] | None:
        """(rejection reason, source kept in place of this one), or None if this one is the first."""
        if digest in self.by_bytes:
            return f"duplicate: same bytes as {self.by_bytes[digest]}", self.by_bytes[digest]
        self.by_bytes[digest] = source
        candidates = self.by_fingerprint[record["fingerprint"]]
        for other_digest, other_source, other_record, other_path in candidates:
            if self._exact(digest, path, record) == self._exact(other_digest, other_path, other_record):
                return f"duplicate: same pixels as {other_source}", other_source
        candidates.append((digest, source, record, path))
        return None


def probe_all(inputs: Inputs, keys: list[str], memo: IngestMemo, store: ItemStore, root: Path, workers: int | None,
              max_pixels: int) -> tuple[list[dict[str, Any]], set[int]]:
    """Every image's probe record (from the memo, else the store, else a decode in worker processes), and
    the indices decoded in this run. Records found only in the store, or stored by this run, go into the
    memo; a verdict the store does not keep (one that depends on settings or permissions) does not."""
    known = memo.records(keys)
    records: list[dict[str, Any]] = []
    pending: list[int] = []
    for index, key in enumerate(keys):
        record = known.get(key) or store.read_json(key)
        if record is None:
            pending.append(index)
        records.append(record or {})  # a placeholder until the worker answers below
    tasks = [(str(root / inputs.images[i][1]), inputs.images[i][2], str(store.root.parent), max_pixels)
             for i in pending]
    computed: set[int] = set()
    unstored: set[int] = set()
    for index, (record, was_computed, stored) in zip(
        pending, map_with_progress(probe_file, tasks, workers, "ingest: checking images")
    ):
        records[index] = record
        if was_computed:
            computed.add(index)
        if not stored:
            unstored.add(index)
    memo.put_records({key: records[i] for i, key in enumerate(keys) if key not in known and i not in unstored})
    return records, computed


def sidecar_captions(inputs: Inputs, memo: IngestMemo, root: Path) -> dict[str, tuple[str | None, str | None]]:
    """{sidecar path: (caption, warning)} of every sidecar beside an image, decoded once per content
    (the memo keeps each sidecar's caption by its sha256)."""
    wanted = {sidecar_of(source) for _, source, _ in inputs.images} & inputs.sidecars.keys()
    known = memo.captions(inputs.sidecars[path] for path in wanted)
    read: dict[str, tuple[str | None, bool]] = {}
    captions = {}
    for path in sorted(wanted):
        digest = inputs.sidecars[path]
        if digest not in known and digest not in read:
            try:
                read[digest] = decode_sidecar((root / path).read_bytes())
            except (FileNotFoundError, IsADirectoryError):  # gone since the scan: no caption
                continue
        text, not_utf8 = known.get(digest) or read[digest]
        captions[path] = (text, not_utf8_warning(root / path) if not_utf8 else None)
    memo.put_captions(read)
    return captions


def run(params: Params, root: Path, scanned_dir: Path, out_dir: Path, metrics_dir: Path | None = None, *,
        tracker: Any = None) -> StageReport:
    """Ingest the files the scan stage listed in `scanned_dir`; write `out_dir/manifest.jsonl` and
    `rejected.jsonl`."""
    started = time.perf_counter()
    root = Path(root)
    check_inputs(params, root)
    config = params.ingest
    report = StageReport(STAGE)
    store_dir = root / params.store_dir
    store = ItemStore(store_dir, STAGE)

    inputs = sort_inputs(read_manifest(Path(scanned_dir)), report)
    found_count = len(inputs.images) + len(report.rejected)  # images plus files rejected on sight
    keys = [probe_key(digest) for _, _, digest in inputs.images]
    with IngestMemo(store.root) as memo:
        records, computed = probe_all(inputs, keys, memo, store, root, config.workers, config.max_pixels)
        captions = sidecar_captions(inputs, memo, root)

    report.warnings.extend(shared_sidecar_warnings(inputs))
    duplicates = _Duplicates(store, config.max_pixels)
    manifest = []
    kept: dict[str, dict[str, Any]] = {}  # source -> its manifest record
    for index, (dataset, source, digest) in enumerate(inputs.images):
        record = records[index]
        assert record is not None
        path = root / source
        reason = _rejection(record, config.min_size, config.max_pixels)
        original = None
        if reason is None:
            found = duplicates.original_of(digest, path, source, record)
            if found is not None:
                reason, original = found
        mask = None
        if reason is None:
            mask, reason = mask_of(source, record, inputs, root)
        caption, warning = captions.get(sidecar_of(source), (None, None))
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
            "key": keys[index],
        }
        if mask is not None:  # only then: the records of images without a mask stay as they were
            kept[source]["mask"] = mask
        manifest.append(kept[source])
    claimed = {mask_file_of(source) for _, source, _ in inputs.images}
    for mask_path, (dataset, _) in sorted(inputs.masks.items()):
        if mask_path not in claimed:
            report.reject(mask_path, "mask file without an image: a mask is named after "
                          f"its image, <stem>{MASK_STEM_SUFFIX}{MASK_EXTENSION} beside <stem>.png/.jpg/...",
                          dataset=dataset)

    if duplicates.updated:  # exact pixel digests computed this run: the next run reads them from the memo
        with IngestMemo(store.root) as memo:
            memo.put_records(duplicates.updated)
    with rebuilt_dir(out_dir) as staging:
        write_jsonl(staging / MANIFEST, manifest)
        write_jsonl(staging / REJECTED, report.rejected)
    per_dataset: dict[str, int] = defaultdict(int)
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
