"""Aspect-ratio bucket geometry: which buckets exist, which one an image goes to, the crop.

Pure functions on sizes; no image is touched here.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from tuneline.stages.bucket.config import BucketSettings

Size = tuple[int, int]  # (width, height)


def generate_buckets(settings: BucketSettings) -> list[Size]:
    """The bucket list: explicit, or every (w, h) on the divisible_by grid whose area is
    at most resolution**2 and as close to it as the grid allows, within the aspect limits."""
    if settings.resolutions:
        return sorted(set(settings.resolutions))
    step, area = settings.divisible_by, settings.resolution**2
    buckets = set()
    width = step
    while width * step <= area:
        height = (area // width) // step * step
        if height >= step and settings.min_aspect <= width / height <= settings.max_aspect:
            buckets.add((width, height))
        width += step
    if not buckets:
        side = max(step, settings.resolution // step * step)
        buckets.add((side, side))
    return sorted(buckets)


def _log_aspect(size: Size) -> float:
    return math.log(size[0] / size[1])


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is closest (in log space, so 2:1 and 1:2 are equally
    far from 1:1); ties go to the larger bucket."""
    target = _log_aspect(size)
    return min(buckets, key=lambda b: (abs(_log_aspect(b) - target), -b[0] * b[1], b))


def own_bucket(size: Size, step: int) -> Size:
    """For no_upscale: the image's own size rounded down to the grid."""
    return (max(step, size[0] // step * step), max(step, size[1] // step * step))


def assign_bucket(size: Size, settings: BucketSettings, buckets: list[Size]) -> Size:
    bucket = nearest_bucket(size, buckets)
    if settings.no_upscale and size[0] * size[1] < bucket[0] * bucket[1]:
        return own_bucket(size, settings.divisible_by)
    return bucket


@dataclass(frozen=True)
class CropPlan:
    """Resize the upright image to `resized`, then crop `bucket` at (left, top)."""

    bucket: Size
    resized: Size
    left: int
    top: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.left, self.top, self.left + self.bucket[0], self.top + self.bucket[1])


def _item_rng(seed: int, item: str) -> random.Random:
    # Depends only on the seed and the item, never on order or on the other items.
    return random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{item}".encode()).digest()[:8], "big"))


def plan_crop(size: Size, bucket: Size, mode: str, seed: int, item: str) -> CropPlan:
    """Scale to cover the bucket (aspect kept), then crop the overhang."""
    width, height = size
    scale = max(bucket[0] / width, bucket[1] / height)
    resized = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
    spare_w, spare_h = resized[0] - bucket[0], resized[1] - bucket[1]
    if mode == "random":
        rng = _item_rng(seed, item)
        left, top = rng.randint(0, spare_w), rng.randint(0, spare_h)
    else:
        left, top = spare_w // 2, spare_h // 2
    return CropPlan(bucket=bucket, resized=resized, left=left, top=top)


def merge_small_buckets(counts: dict[Size, int], batch_size_of) -> dict[Size, Size]:
    """Map each bucket holding fewer images than its batch size to the nearest bucket by
    aspect ratio, smallest first, until every remaining bucket is full enough or one is left.
    Returns {small bucket: bucket it goes to} (chains resolved)."""
    counts = dict(counts)
    moved: dict[Size, Size] = {}
    while len(counts) > 1:
        small = [b for b, n in counts.items() if n < batch_size_of(b)]
        if not small:
            break
        source = min(small, key=lambda b: (counts[b], b))
        others = [b for b in counts if b != source]
        target = nearest_bucket(source, others)
        counts[target] += counts.pop(source)
        moved[source] = target
        for key, value in moved.items():
            if value == source:
                moved[key] = target
    return moved
