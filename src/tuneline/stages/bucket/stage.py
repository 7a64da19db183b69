"""Stage `bucket`: resize and crop every ingested image into its aspect-ratio bucket.

Each item's result is keyed by what decides its pixels (source digest, bucket, resize,
crop box, filter, background for transparent images, decoder settings), so changing a
bucket setting recomputes only the images whose plan it changes.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from tuneline.stages.bucket.output import write_output
from tuneline.stages.bucket.aspect import CropPlan, Size, assign_bucket, generate_buckets, merge_small_buckets, plan_crop
from tuneline.config import Params
from tuneline.core.codeversion import code_version
from tuneline.stages.bucket import CODE
from tuneline.core.params import format_resolution
from tuneline.core.fsutil import atomic_path, digest_json, file_digest
from tuneline.core.images import ImageRejected, load_normalized, resize_and_crop
from tuneline.core.manifest import read_manifest
from tuneline.core.parallel import map_with_progress
from tuneline.core.png import write_png_rgb
from tuneline.core.report import StageReport
from tuneline.core.store import ItemStore

STAGE = "bucket"
CODE_VERSION = code_version(CODE)  # changes with the code that makes the items
# Lossless; level 1 writes ~5x faster than the default with files ~20% larger.
PNG_COMPRESS_LEVEL = 1


def draft_scale(item: dict[str, Any], plan: CropPlan, draft: bool) -> int:
    """The JPEG decoder's reduction (1, 2, 4 or 8) for this plan: the largest that still
    decodes at least the resized size, so Lanczos always does the last step. Mirrors
    Pillow's JpegImageFile.draft; 1 means a full decode."""
    if not draft or item["format"] != "JPEG":
        return 1
    fits = min(item["width"] // plan.resized[0], item["height"] // plan.resized[1])
    return next((scale for scale in (8, 4, 2) if fits >= scale), 1)  # fits is 0 when upscaling


def item_key(item: dict[str, Any], plan: CropPlan, resample: str, draft: bool) -> str:
    # The draft scale, not the switch: turning draft off recomputes only images it reduced.
    return digest_json({
        "stage": STAGE,
        "code": CODE_VERSION,
        "source": item["digest"],
        "background": item["background"],  # None unless the image has transparency
        "resized": plan.resized,
        "box": plan.box,
        "resample": resample,
        "draft_scale": draft_scale(item, plan, draft),
    })


def _render(source: str, expected_digest: str, plan: CropPlan, resample: str, scale: int,
            background: str | None, output: str, max_pixels: int) -> str | None:
    """Worker: decode, resize, crop, write lossless PNG atomically. Returns a rejection reason or None."""
    path = Path(source)
    try:
        if file_digest(path) != expected_digest:
            return "source changed since ingest: run the ingest stage again"
        image = load_normalized(path, background or "white", plan.resized if scale > 1 else None, max_pixels)
        image = resize_and_crop(image, plan.resized, plan.box, resample)
    except (ImageRejected, FileNotFoundError) as error:
        return f"unreadable at bucket time: {error}"
    with atomic_path(Path(output)) as tmp:
        write_png_rgb(image, tmp, PNG_COMPRESS_LEVEL)
    return None


def plan_items(params: Params, items: list[dict[str, Any]], report: StageReport) -> list[tuple[dict, CropPlan]]:
    """Assign buckets (data set overrides applied), resolve small buckets, plan every crop."""
    config = params.bucket
    buckets_of = {d.folder: generate_buckets(params.bucket_settings_for(d)) for d in params.datasets}
    settings_of = {d.folder: params.bucket_settings_for(d) for d in params.datasets}
    assigned = []
    for item in items:
        if item["dataset"] not in settings_of:
            report.reject(item["source"], f"data set {item['dataset']!r} is not in params.yaml any more",
                          dataset=item["dataset"])
            continue
        size = (item["width"], item["height"])
        assigned.append((item, assign_bucket(size, settings_of[item["dataset"]], buckets_of[item["dataset"]])))

    counts = Counter(bucket for _, bucket in assigned)
    small = {b: n for b, n in counts.items() if n < config.batch_size_for(b)}
    moved: dict[Size, Size] = {}
    if small and config.small_buckets == "merge":
        moved = merge_small_buckets(counts, config.batch_size_for)
    planned = []
    for item, bucket in assigned:
        if config.small_buckets == "drop" and bucket in small:
            report.reject(item["source"], f"small bucket: {format_resolution(bucket)} holds {small[bucket]} "
                          f"image(s), fewer than its batch size {config.batch_size_for(bucket)} "
                          "(bucket.small_buckets: drop)", dataset=item["dataset"])
            continue
        final = moved.get(bucket, bucket)
        mode = settings_of[item["dataset"]].crop
        planned.append((item, plan_crop((item["width"], item["height"]), final, mode, config.seed, item["digest"])))
    report.extra["merged_buckets"] = {format_resolution(s): format_resolution(t) for s, t in moved.items()}
    for bucket, count in sorted(small.items()):
        target = moved.get(bucket)
        fate = f"merged into {format_resolution(target)}" if target else (
            "dropped" if config.small_buckets == "drop" else "kept (nowhere to merge)")
        report.warnings.append(f"bucket {format_resolution(bucket)} holds {count} image(s), fewer than its "
                               f"batch size {config.batch_size_for(bucket)}: {fate}")
    return planned


def run(params: Params, root: Path, ingested_dir: Path, out_dir: Path,
        metrics_dir: Path | None = None, *, tracker: Any = None) -> StageReport:
    """Bucket every item of `ingested_dir` into the store; `out_dir` gets their packs, manifest.jsonl and
    buckets.json (`output.py`)."""
    started = time.perf_counter()
    root = Path(root)
    config = params.bucket
    report = StageReport(STAGE)
    items = read_manifest(ingested_dir)
    store_dir = root / params.store_dir
    store = ItemStore(store_dir, STAGE)
    planned = plan_items(params, items, report)

    keys = [item_key(item, plan, config.resample, config.draft) for item, plan in planned]
    missing = [i for i, key in enumerate(keys) if not store.has(key, ".png")]
    tasks = []
    for i in missing:
        item, plan = planned[i]
        tasks.append((str(root / item["source"]), item["digest"], plan, config.resample,
                      draft_scale(item, plan, config.draft),
                      item["background"], str(store.path(keys[i], ".png")), params.ingest.max_pixels))
    failed: dict[int, str] = {}
    for i, reason in zip(missing, map_with_progress(_render, tasks, config.workers, "bucket: resizing")):
        if reason is not None:
            failed[i] = reason
    report.computed = len(missing) - len(failed)

    return write_output(out_dir, report, root=root, params=params, planned=planned, keys=keys, failed=failed,
                        store=store, started=started, metrics_dir=metrics_dir)
