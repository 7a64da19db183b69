"""A fast lossless PNG writer for 8-bit RGB images.

Pillow's encoder tries several row filters per row in scalar code, which at
compress level 1 costs more than the deflate itself: it was 55% of the bucket
stage's time at 1024 px. Here every row gets the "Up" filter in one numpy
subtraction and zlib does the rest. The file is a standard PNG (any reader
decodes it, pixels are identical) and about the same size as Pillow's.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FILTER_UP = 2


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png_rgb(image: Image.Image, level: int = 1) -> bytes:
    """Encode an RGB image as PNG bytes with the Up filter and zlib at `level`."""
    if image.mode != "RGB":
        raise ValueError(f"encode_png_rgb needs an RGB image, got mode {image.mode}")
    width, height = image.size
    rows = np.asarray(image).reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), np.uint8)
    filtered[:, 0] = _FILTER_UP
    filtered[0, 1:] = rows[0]  # the row above the first one counts as zeros
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 wraps modulo 256, as PNG wants
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit truecolour, no interlace
    return (_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(filtered.tobytes(), level))
            + _chunk(b"IEND", b""))


def write_png_rgb(image: Image.Image, path: Path, level: int = 1) -> None:
    Path(path).write_bytes(encode_png_rgb(image, level))
