"""The embedded demo data: two small captioned data sets with different aspect ratios.

`python -m tuneline.demo data/raw` (re)writes them deterministically. The files are
also committed under data/raw/ so a fresh clone runs without this step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (235, 200, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}


def _gradient(size: tuple[int, int], color: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    width, height = size
    ramp = np.linspace(0.85, 1.15, height)[:, None, None]
    noise = rng.normal(0, 4, (height, width, 3))
    pixels = np.clip(np.array(color)[None, None, :] * ramp + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _shapes(dest: Path, rng: np.random.Generator) -> None:
    """Landscape pictures of one coloured circle or square on a plain background."""
    sizes = [(640, 448), (768, 512), (600, 400), (704, 448), (640, 480), (720, 480), (800, 512), (640, 426)]
    for index, size in enumerate(sizes):
        color = list(COLORS)[index % len(COLORS)]
        background = list(BACKGROUNDS)[index % len(BACKGROUNDS)]
        shape = "circle" if index % 2 == 0 else "square"
        image = _gradient(size, BACKGROUNDS[background], rng)
        draw = ImageDraw.Draw(image)
        radius = int(min(size) * rng.uniform(0.2, 0.3))
        cx, cy = int(size[0] * rng.uniform(0.35, 0.65)), int(size[1] * rng.uniform(0.35, 0.65))
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
        stem = dest / f"shape_{index:02d}"
        image.save(stem.with_suffix(".jpg"), quality=90)
        if index % 4 != 3:  # a quarter has no sidecar caption: the caption stage fills them
            stem.with_suffix(".txt").write_text(f"a {color} {shape} on a {background} background\n", "utf-8")


def _stripes(dest: Path, rng: np.random.Generator) -> None:
    """Portrait pictures of coloured stripes; one PNG with transparency."""
    sizes = [(448, 640), (512, 768), (400, 600), (448, 704), (480, 640), (480, 720)]
    for index, size in enumerate(sizes):
        first, second = list(COLORS)[index % 4], list(COLORS)[(index + 1) % 4]
        width, height = size
        period = int(rng.integers(24, 64))
        rows = (np.arange(height) // period) % 2
        pixels = np.where(rows[:, None, None] == 0, COLORS[first], COLORS[second]).astype(np.uint8)
        pixels = np.broadcast_to(pixels, (height, width, 3)).copy()
        stem = dest / f"stripes_{index:02d}"
        if index == 5:
            alpha = np.full((height, width), 255, np.uint8)
            alpha[:, : width // 4] = 0  # a transparent band: composited on ingest.background
            Image.fromarray(np.dstack([pixels, alpha]), "RGBA").save(stem.with_suffix(".png"))
        else:
            Image.fromarray(pixels, "RGB").save(stem.with_suffix(".jpg"), quality=90)
        if index % 3 != 2:
            stem.with_suffix(".txt").write_text(f"{first} and {second} horizontal stripes\n", "utf-8")


def make_demo_data(dest: Path, seed: int = 0) -> Path:
    """Write data sets `shapes` (landscape) and `stripes` (portrait) under `dest`."""
    rng = np.random.default_rng(seed)
    for name, make in (("shapes", _shapes), ("stripes", _stripes)):
        folder = Path(dest) / name
        folder.mkdir(parents=True, exist_ok=True)
        make(folder, rng)
    return Path(dest)


if __name__ == "__main__":
    print(make_demo_data(Path(sys.argv[1] if len(sys.argv) > 1 else "data/raw")))
