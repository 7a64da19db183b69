"""The `ingest` params section."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from tuneline.core.params import Color, Section


class IngestConfig(Section):
    """Stage `ingest`: find, check and normalise the raw images."""

    min_size: int = Field(
        256, ge=1, description="Reject images whose shorter side is below this many pixels."
    )
    max_pixels: int = Field(
        100_000_000,
        ge=1,
        description="Reject images with more pixels than this without decoding them "
        "(decompression-bomb guard).",
    )
    background: Color = Field(
        "white", description="Colour that transparent images are composited on ('white', '#808080', ...)."
    )
    workers: Optional[int] = Field(None, ge=1, description="Worker processes; null uses every core.")
