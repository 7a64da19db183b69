"""Reading user images: checks with plain reasons, and normalisation to 8-bit sRGB RGB.

Decoding never holds more than one full-size copy of an image, and JPEGs can be
decoded at a reduced scale ("draft") when the result is much smaller than the file.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageColor, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
SIDECAR_EXTENSIONS = frozenset({".txt"})

# EXIF orientations 5-8 rotate by 90 degrees: width and height swap.
_SWAPS_SIDES = {5, 6, 7, 8}
_ORIENTATION_TAG = 0x0112

ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageRejected(Exception):
    """An image that cannot be used; the message is the plain reason shown to the user."""

    # False where the verdict depends on settings or permissions, not only on the bytes.
    cacheable = True


class TooManyPixels(ImageRejected):
    cacheable = False


class Unreadable(ImageRejected):
    cacheable = False


@dataclass(frozen=True)
class Probe:
    """What ingest learns about one image file."""

    width: int  # after EXIF orientation
    height: int
    format: str
    mode: str
    orientation: int
    has_alpha: bool
    fingerprint: str | None  # digest of normalised pixels, possibly of a reduced decode
    fingerprint_exact: bool  # True when the fingerprint covers the full-size pixels


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open (header only) with the plain reasons for files that are not usable images."""
    try:
        size = os.path.getsize(path)
    except OSError as error:
        raise Unreadable(f"unreadable: {error.strerror or error}") from error
    if size == 0:
        raise ImageRejected("zero-byte file")
    pillow_limit = Image.MAX_IMAGE_PIXELS
    try:
        # Pillow's own guard (89 MP) would override a larger max_pixels: the configured limit decides,
        # checked below from the header, before anything is decoded.
        Image.MAX_IMAGE_PIXELS = None
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except UnidentifiedImageError as error:
        raise ImageRejected(f"not an image despite the extension {Path(path).suffix!r}") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:  # a plugin's own check
        raise TooManyPixels(f"too many pixels: exceeds max_pixels {max_pixels / 1e6:.1f} MP "
                            f"(decompression-bomb guard; {error})") from error
    except PermissionError as error:
        raise Unreadable(f"unreadable: {error.strerror}") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageRejected(f"corrupt header: {error}") from error
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise TooManyPixels(
            f"too many pixels: {width}x{height} = {width * height / 1e6:.1f} MP exceeds "
            f"max_pixels {max_pixels / 1e6:.1f} MP (decompression-bomb guard)"
        )
    return image


def orientation_of(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # noqa: BLE001 - broken EXIF is common; treat as upright
        return 1


def oriented_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    return (height, width) if orientation_of(image) in _SWAPS_SIDES else (width, height)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _load(image: Image.Image) -> None:
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageRejected(f"truncated or corrupt image data: {error}") from error


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float grayscale to 8-bit L by scaling, not clipping."""
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(array * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        top = 1.0 if array.max(initial=0) <= 1.0 else 255.0
        return Image.fromarray(np.clip(array * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    return image


_SRGB = None


def _to_srgb(image: Image.Image) -> Image.Image:
    """Convert RGB/CMYK images with an embedded non-sRGB ICC profile to sRGB."""
    global _SRGB
    profile = image.info.get("icc_profile")
    if not profile or image.mode not in ("RGB", "CMYK"):
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        if "srgb" in ImageCms.getProfileDescription(source).lower():
            return image
        _SRGB = _SRGB or ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        return ImageCms.profileToProfile(image, source, _SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image  # a broken profile: fall back to the plain conversion below


def normalize(image: Image.Image, background: str | None) -> Image.Image:
    """Upright 8-bit sRGB RGB. With background=None transparent images stay RGBA."""
    if orientation_of(image) != 1:
        image = ImageOps.exif_transpose(image)
    image = _to_8bit(image)
    if image.mode == "P" or (image.mode in ("L", "RGB", "1") and "transparency" in image.info):
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    image = _to_srgb(image)
    if image.mode == "RGBA":
        if background is None:
            return image
        flat = Image.new("RGB", image.size, ImageColor.getrgb(background)[:3])
        flat.paste(image, mask=image.getchannel("A"))
        return flat
    return image if image.mode == "RGB" else image.convert("RGB")


def _pixel_digest(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _draft(image: Image.Image, width: int, height: int) -> bool:
    """Ask the JPEG decoder for at least (width, height) in file orientation; True if reduced."""
    if image.format != "JPEG":
        return False
    full = image.size
    image.draft(image.mode, (max(1, width), max(1, height)))
    return image.size != full


def probe(path: Path, max_pixels: int) -> Probe:
    """Check one file and fingerprint its pixels.

    JPEGs are fully entropy-decoded at 1/8 scale: that still finds truncated files,
    at a fraction of the cost. Such a fingerprint is not exact; duplicates it
    suggests are confirmed with `exact_pixel_digest`.
    """
    image = _open(path, max_pixels)
    width, height = oriented_size(image)
    orientation = orientation_of(image)
    file_format, mode, has_alpha = image.format or "?", image.mode, _has_alpha(image)
    reduced = _draft(image, math.ceil(image.size[0] / 8), math.ceil(image.size[1] / 8))
    _load(image)
    pixels = normalize(image, background=None)
    return Probe(
        width=width,
        height=height,
        format=file_format,
        mode=mode,
        orientation=orientation,
        has_alpha=has_alpha,
        fingerprint=_pixel_digest(pixels),
        fingerprint_exact=not reduced,
    )


def exact_pixel_digest(path: Path, max_pixels: int) -> str:
    """Digest of the full-size normalised pixels (transparent pixels kept as RGBA)."""
    image = _open(path, max_pixels)
    _load(image)
    return _pixel_digest(normalize(image, background=None))


# The resampling filters by params name (bucket.resample).
RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}


def resize_and_crop(image: Image.Image, resized: Sequence[int], box: Sequence[int], resample: str) -> Image.Image:
    """The bucket stage's resize to `resized` and crop to `box`: an image's, and its loss mask's, the same way."""
    return image.resize(tuple(resized), RESAMPLE[resample], reducing_gap=3.0).crop(tuple(box))


def load_normalized(path: Path, background: str, min_size: tuple[int, int] | None, max_pixels: int) -> Image.Image:
    """Decode upright RGB, reduced (JPEG draft) as far as it stays >= min_size (width, height)."""
    # No `with`: closing a PIL image frees its pixels, and normalize may return it as is.
    image = _open(path, max_pixels)
    if min_size is not None:
        want_w, want_h = min_size
        if orientation_of(image) in _SWAPS_SIDES:
            want_w, want_h = want_h, want_w
        _draft(image, want_w, want_h)
    _load(image)
    return normalize(image, background)
