"""The bucket stage's output folder and report: the image packs, the manifest, buckets.json and the
distribution table, assembled from the store. Nothing here decides a stored image's bytes or key, so
it is outside the stage's CODE: changing the output layout re-crops nothing. The loss masks
(tuneline.core.masks, keyed by that module's own code version) are made here, after the crops, and
packed beside them (`<pack>.mask.tar`): they decide no crop's bytes or key."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tuneline.config import Params
from tuneline.core.fsutil import atomic_write_json, rebuilt_dir
from tuneline.core.manifest import MANIFEST, REJECTED, write_jsonl
from tuneline.core.masks import (BUCKET_MASK_SUFFIX, MASK_PACK_EXTENSION, bucket_mask_key,
                                 render_bucket_mask)
from tuneline.core.packs import PackItem, pack_of
from tuneline.core.params import format_resolution
from tuneline.core.report import StageReport
from tuneline.core.store import ItemStore
from tuneline.stages.bucket.aspect import CropPlan

SUFFIX = ".png"
PACK_EXTENSION = ".tar"


def write_output(out_dir: Path, report: StageReport, *, root: Path, params: Params, planned: list[tuple[dict[str, Any], CropPlan]],
                 keys: list[str], failed: dict[int, str], store: ItemStore, started: float,
                 metrics_dir: Path | None) -> StageReport:
    """Rebuild `out_dir`: the packs of the stored crops (tuneline.core.packs), manifest.jsonl in content
    order, rejected.jsonl and buckets.json; finish the report."""
    manifest = []
    failed = dict(failed)
    mask_keys = store_masks(root, params, planned, failed, store, report)
    with rebuilt_dir(out_dir) as staging:
        for i in sorted(failed):
            report.reject(planned[i][0]["source"], failed[i], dataset=planned[i][0]["dataset"])
        kept = [i for i in range(len(planned)) if i not in failed]
        member = {i: (pack_of(planned[i][0]["dataset"], planned[i][0]["id"], params.pack_digits),
                      f"{planned[i][0]['id']}{SUFFIX}") for i in kept}
        images = store.pack(staging, [PackItem(*member[i], keys[i], SUFFIX) for i in kept], PACK_EXTENSION)
        masks = store.pack(staging, [PackItem(*member[i], mask_keys[i], BUCKET_MASK_SUFFIX) for i in kept
                                     if i in mask_keys], MASK_PACK_EXTENSION)
        for i in kept:
            item, plan = planned[i]
            manifest.append({
                # No source path: what later stages depend on must not change when a file is renamed
                # (data/ingested/manifest.jsonl maps ids to files).
                **{k: item[k] for k in ("id", "digest", "dataset", "caption", "caption_source")},
                "image": images[member[i]],
                "original_size": [item["width"], item["height"]],
                "bucket": list(plan.bucket),
                "resized_size": list(plan.resized),
                # SDXL's crops_coords_top_left is (top, left) in resized-image pixels.
                "crop_top_left": [plan.top, plan.left],
                "key": keys[i],
            })
            if i in mask_keys:  # only then: the records of items without a mask stay as they were
                manifest[-1].update({"mask": masks[member[i]], "mask_key": mask_keys[i],
                                     "mask_source": item["mask"]["source"]})
        report.reused = len(manifest) - report.computed
        # Content order, not path order: a rename leaves every later stage's input identical.
        position = {dataset.folder: index for index, dataset in enumerate(params.datasets)}
        manifest.sort(key=lambda record: (position[record["dataset"]], record["id"]))
        summary = bucket_summary(manifest, params)
        write_jsonl(staging / MANIFEST, manifest)
        write_jsonl(staging / REJECTED, report.rejected)
        atomic_write_json(staging / "buckets.json", summary)
    report.extra["buckets"] = len(summary["buckets"])
    report.extra["distribution"] = {b["resolution"]: b["count"] for b in summary["buckets"]}
    report.tables.append(distribution_table(summary))
    report.seconds = time.perf_counter() - started
    if metrics_dir is not None:
        report.write_metrics(metrics_dir)
    return report


def store_masks(root: Path, params: Params, planned: list[tuple[dict[str, Any], CropPlan]], failed: dict[int, str],
                store: ItemStore, report: StageReport) -> dict[int, str]:
    """The cropped mask's key of every item with a mask (tuneline.core.masks), computing those the store lacks;
    an item whose mask cannot be made joins `failed`. Keyed apart from the crops: a mask edit re-crops no image."""
    from tuneline.core.parallel import map_with_progress

    config = params.bucket
    keys = {i: bucket_mask_key(item, plan.resized, plan.box, config.resample)
            for i, (item, plan) in enumerate(planned) if i not in failed and "mask" in item}
    missing = [i for i, key in keys.items() if not store.has(key, BUCKET_MASK_SUFFIX)]
    tasks = []
    for i in missing:
        item, plan = planned[i]
        mask = item["mask"]
        mask_file = str(root / mask["file"]) if mask["source"] == "file" else None
        tasks.append((str(root / item["source"]), mask, mask_file, mask["digest"] if mask_file else item["digest"],
                      plan.resized, plan.box, config.resample, str(store.path(keys[i], BUCKET_MASK_SUFFIX)),
                      params.ingest.max_pixels))
    for i, reason in zip(missing, map_with_progress(render_bucket_mask, tasks, config.workers, "bucket: masks")):
        if reason is not None:
            failed[i] = reason
            del keys[i]
    if keys:  # only then: reports of data without masks stay as they were
        report.extra["masks"] = len(keys)
        report.extra["masks_computed"] = sum(1 for i in missing if i in keys)
    return keys


def bucket_summary(manifest: list[dict[str, Any]], params: Params) -> dict[str, Any]:
    """Per bucket: resolution, image count, batch size, images per data set."""
    per_bucket: dict[tuple[int, int], Counter[str]] = defaultdict(Counter)
    for record in manifest:
        per_bucket[tuple(record["bucket"])][record["dataset"]] += 1
    buckets = []
    for size in sorted(per_bucket, key=lambda s: (s[0] / s[1], s)):
        datasets = per_bucket[size]
        buckets.append({
            "resolution": format_resolution(size),
            "width": size[0],
            "height": size[1],
            "aspect": round(size[0] / size[1], 3),
            "count": sum(datasets.values()),
            "batch_size": params.bucket.batch_size_for(size),
            "datasets": dict(sorted(datasets.items())),
        })
    return {"images": len(manifest), "buckets": buckets}


def distribution_table(summary: dict[str, Any]) -> Any:
    """The bucket distribution (bucket_summary) as a table for the screen."""
    from rich.table import Table

    table = Table(title=f"buckets ({summary['images']} images)")
    for column in ("bucket", "aspect", "images", "batch", "data sets"):
        table.add_column(column, justify="right" if column in ("aspect", "images", "batch") else "left")
    for bucket in summary["buckets"]:
        bar = "█" * max(1, round(30 * bucket["count"] / max(1, summary["images"])))
        datasets = ", ".join(f"{k}:{v}" for k, v in bucket["datasets"].items())
        table.add_row(bucket["resolution"], f"{bucket['aspect']:.2f}", f"{bucket['count']} {bar}",
                      str(bucket["batch_size"]), datasets)
    return table
