"""The bucketed images as autoencoder training items: square random crops, grouped by bucket.

The first `holdout` images of each data set (by id) are kept out of training: they are the
fixed evaluation set (PSNR/SSIM, reconstruction sheets).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline.core.manifest import read_manifest
from tuneline.core.packs import open_member
from tuneline.core.params import ParamsError
from tuneline.train.sampler import SampleRef


@dataclass(frozen=True)
class ImageItem:
    index: int
    record: dict[str, Any]
    bucket: tuple[int, int]


def load_pixels(path: Path) -> Any:
    """An image file as a (3, H, W) float tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


class ImageData:
    """The bucket stage's output as crops for the trainer core (digest, batching, batch)."""

    text_cache = False

    def __init__(self, params: Any, bucketed_dir: Path) -> None:
        config = params.autoencoder
        self.dir = Path(bucketed_dir)
        records = read_manifest(self.dir)
        known = {dataset.folder for dataset in params.datasets}
        records = [r for r in records if r["dataset"] in known]
        if not records:
            raise ParamsError(f"{self.dir}: no bucketed images to train the autoencoder on (run bucket first)")
        held, train = [], []
        for dataset in sorted({r["dataset"] for r in records}):
            mine = sorted((r for r in records if r["dataset"] == dataset), key=lambda r: r["id"])
            keep = min(config.holdout, len(mine) - 1)  # at least one image of each data set trains
            held += mine[:keep]
            train += mine[keep:]
        smallest = min(min(r["bucket"]) for r in records)
        # Square batches: one crop side for every bucket, at most the smallest bucket's side.
        self.crop = min(config.crop_size, smallest // 8 * 8)
        self.batch_size = config.batch_size
        self.items = [ImageItem(i, r, tuple(r["bucket"])) for i, r in enumerate(train)]
        self.holdout = held

    def sample_refs(self) -> list[SampleRef]:
        return [SampleRef(item.index, item.bucket, 1) for item in self.items]

    def batch_size_for(self, bucket: tuple[int, int]) -> int:
        return self.batch_size

    def batching(self) -> dict[str, int]:
        return {"crop": self.crop, "batch_size": self.batch_size}

    def digest(self) -> str:
        from tuneline.core.fsutil import digest_json

        return digest_json([[i.record["id"], i.record["digest"], i.record["bucket"]] for i in self.items]
                           + [["holdout", r["id"]] for r in self.holdout])

    def batch(self, indices: list[int], generator: Any, python_rng: random.Random, device: Any) -> dict[str, Any]:
        """Random square crops of the items (the crop positions come from `python_rng`: exact resume)."""
        import torch

        crops = []
        for index in indices:
            item = self.items[index]
            pixels = load_pixels(open_member(self.dir, item.record["image"]))
            top = python_rng.randrange(pixels.shape[1] - self.crop + 1)
            left = python_rng.randrange(pixels.shape[2] - self.crop + 1)
            crops.append(pixels[:, top:top + self.crop, left:left + self.crop])
        return {"pixels": torch.stack(crops).to(device), "ids": [self.items[i].record["id"] for i in indices]}

    def holdout_pixels(self) -> dict[str, list[tuple[str, Any]]]:
        """Per data set: (id, centre crop) of each held-out image."""
        result: dict[str, list[tuple[str, Any]]] = {}
        for record in self.holdout:
            pixels = load_pixels(open_member(self.dir, record["image"]))
            top, left = (pixels.shape[1] - self.crop) // 2, (pixels.shape[2] - self.crop) // 2
            result.setdefault(record["dataset"], []).append(
                (record["id"], pixels[:, top:top + self.crop, left:left + self.crop]))
        return result
