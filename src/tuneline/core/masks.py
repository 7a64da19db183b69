"""Loss masks (train.masked_loss): an image's alpha channel or a `<stem>_mask.png` beside it (white = train,
black = ignore), found by ingest (the record's `mask`), resized and cropped by the bucket stage exactly as its
image (an 8-bit grayscale PNG), and area-averaged to the latent grid by the latents stage (a float16 [1, h, w]
safetensors file).

Masks are stored beside, never inside, the images' and latents' items: their keys are their own (the mask's
digest, the crop, the grid, this module's code version), so a mask edit recomputes that mask alone and no crop
or latent, and the crops' and latents' keys are the ones they had before masks existed. The stages' output
modules call this one after the stage's own items are stored, and pack the masks into `<pack>.mask.tar`
beside the item packs (tuneline.core.packs).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tuneline.core.codeversion import code_version
from tuneline.core.fsutil import atomic_path, atomic_write_bytes, digest_json, file_digest
from tuneline.core.images import ImageRejected, load_normalized, resize_and_crop
from tuneline.core.packs import member_header
from tuneline.core.tensorfile import canonical_bytes

# What decides a stored mask's bytes: this module and the decoder's normalisation.
CODE = ("core/masks.py", "core/images.py", "core/tensorfile.py")
BUCKET_MASK_SUFFIX = "_mask.png"
LATENT_MASK_SUFFIX = ".mask.safetensors"
MASK_PACK_EXTENSION = ".mask.tar"
LATENT_MASK_FORMAT = "tuneline-latent-mask"
def bucket_mask_key(item: dict[str, Any], resized: Sequence[int], box: Sequence[int], resample: str) -> str:
    """The key of one item's cropped mask: where the mask comes from (the mask file's digest, or the image's for
    its alpha channel), the resize and crop box, the filter and the code. The file's path is not in it (a rename
    recomputes nothing)."""
    mask = item["mask"]
    return digest_json({
        "stage": "bucket",
        "item": "mask",
        "code": code_version(CODE),
        "source": mask["source"],
        "digest": mask["digest"] if mask["source"] == "file" else item["digest"],
        "resized": list(resized),
        "box": list(box),
        "resample": resample,
    })


def load_mask(source: Path, mask: dict[str, Any], mask_file: Path | None, max_pixels: int) -> Image.Image:
    """The full-size, upright mask (mode L) of an ingested item: its image's alpha channel or its mask file (its
    luminance; transparent parts of a mask file count as black)."""
    if mask["source"] == "alpha":
        image = load_normalized(source, None, None, max_pixels)  # type: ignore[arg-type]  # None keeps RGBA
        if image.mode != "RGBA":
            raise ImageRejected("the image has no alpha channel any more: run the ingest stage again")
        return image.getchannel("A")
    assert mask_file is not None
    return load_normalized(mask_file, "black", None, max_pixels).convert("L")


def render_bucket_mask(source: str, mask: dict[str, Any], mask_file: str | None, expected_digest: str,
                       resized: tuple[int, int], box: tuple[int, int, int, int], resample: str, output: str,
                       max_pixels: int) -> str | None:
    """Worker: load, resize and crop one mask, write it as a grayscale PNG atomically; a rejection reason or None."""
    try:
        checked = Path(mask_file) if mask_file else Path(source)
        if file_digest(checked) != expected_digest:
            return f"{'mask' if mask_file else 'source'} changed since ingest: run the ingest stage again"
        image = resize_and_crop(load_mask(Path(source), mask, Path(mask_file) if mask_file else None, max_pixels),
                          resized, box, resample)
    except (ImageRejected, FileNotFoundError) as error:
        return f"mask unreadable at bucket time: {error}"
    with atomic_path(Path(output)) as tmp:
        image.save(tmp, format="PNG", compress_level=1)
    return None


def area_downsample(mask: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """A (H, W) float mask averaged over the pixels each cell of the (h, w) grid covers (a latent position sees
    an f x f patch when the VAE downsamples by f); a grid that does not divide the image falls back to Pillow's
    box filter, the same average with fractional edge weights."""
    height, width = mask.shape
    h, w = int(grid[0]), int(grid[1])
    if height % h == 0 and width % w == 0:
        return mask.reshape(h, height // h, w, width // w).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)
    image = Image.fromarray(mask.astype(np.float32), mode="F")
    return np.asarray(image.resize((w, h), Image.Resampling.BOX), dtype=np.float32)


def latent_mask_key(bucket_key: str, grid: Sequence[int]) -> str:
    """The key of one item's mask at latent resolution: the cropped mask's key, the grid and the code."""
    return digest_json({"stage": "latents", "item": "mask", "code": code_version(CODE), "mask": bucket_key,
                        "grid": [int(g) for g in grid]})


def latent_mask_bytes(png: bytes, grid: Sequence[int]) -> tuple[bytes, float]:
    """(safetensors bytes of the mask at latent resolution: `mask`, float16 [1, h, w] in 0..1; its mean)."""
    from safetensors.numpy import save

    with Image.open(io.BytesIO(png)) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    cells = area_downsample(pixels, grid)
    coverage = float(cells.mean())
    data = save({"mask": cells[None].astype(np.float16)},
                metadata={"format": LATENT_MASK_FORMAT, "coverage": repr(round(coverage, 6))})
    return canonical_bytes(data), coverage  # safetensors orders the metadata differently in every process


def write_latent_mask(path: Path, png: bytes, grid: Sequence[int]) -> float:
    """Store one latent-resolution mask (`latent_mask_bytes`) atomically; its mean."""
    data, coverage = latent_mask_bytes(png, grid)
    atomic_write_bytes(path, data)
    return coverage


def stored_coverage(folder: Path, ref: dict[str, Any]) -> float:
    """The mean of a packed latent mask (`latent_mask_bytes`), from its safetensors header alone."""
    return float(member_header(folder, ref)["__metadata__"]["coverage"])
