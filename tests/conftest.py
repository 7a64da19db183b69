"""Shared fixtures: a throw-away project root with data sets under data/raw."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image (gradients + noise): decodes like a real photo."""
    rng = np.random.default_rng(seed)
    width, height = size
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = rng.uniform(40, 200, 3)[None, None, :]
    pixels = base + 50 * np.sin(6 * x + rng.uniform(0, 6)) + 50 * np.cos(5 * y) + rng.normal(0, 3, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def save_photo(path: Path, size: tuple[int, int], seed: int = 0, **save_args: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(size, seed).save(path, **save_args)
    return path


class Project:
    """A project root in tmp_path: params.yaml + data/raw/<data set>/..."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.params_data: dict[str, Any] = {
            "datasets": [
                {"name": "alpha", "path": "data/raw/alpha"},
                {"name": "beta", "path": "data/raw/beta"},
            ],
            "ingest": {"min_size": 64, "workers": 1},
            "bucket": {"resolution": 128, "divisible_by": 32, "batch_size": 1, "workers": 1},
        }
        for dataset in ("alpha", "beta"):
            self.raw(dataset)

    def raw(self, dataset: str) -> Path:
        folder = self.root / "data" / "raw" / dataset
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def params(self, **sections: Any):
        from tuneline.config import validate_params

        data = {**self.params_data}
        for key, value in sections.items():
            data[key] = {**data[key], **value} if isinstance(value, dict) else value
        (self.root / "params.yaml").write_text(yaml.safe_dump(data), "utf-8")
        return validate_params(data)

    def ingest(self, params=None):
        from tuneline.ingest import run_ingest

        return run_ingest(params or self.params(), self.root, self.root / "data/ingested", self.root / "metrics")

    def bucket(self, params=None):
        from tuneline.bucket import run_bucket

        return run_bucket(params or self.params(), self.root, self.root / "data/ingested",
                          self.root / "data/bucketed", self.root / "metrics")

    def manifest(self, stage_dir: str) -> list[dict[str, Any]]:
        from tuneline.manifest import read_manifest

        return read_manifest(self.root / stage_dir)

    def rejected(self, stage_dir: str) -> list[dict[str, Any]]:
        from tuneline.manifest import read_jsonl

        return read_jsonl(self.root / stage_dir / "rejected.jsonl")


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)
