"""The `bucket` params section, and the bucket settings each data set may override."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, create_model, field_validator, model_validator

from tuneline.core.params import Resolution, Section, format_resolution, parse_resolution


class BucketSettings(Section):
    """Aspect-ratio bucket settings; each data set may override any of them."""

    resolution: int = Field(
        1024,
        ge=64,
        description="Side of the square whose area generated buckets keep: 1024 gives the "
        "~1 megapixel buckets (1024x1024, 1152x896, ...) both families were trained at.",
    )
    resolutions: Optional[list[Resolution]] = Field(
        None,
        description="Explicit bucket list as 'WIDTHxHEIGHT' strings. When set, no buckets are "
        "generated from resolution/min_aspect/max_aspect.",
    )
    divisible_by: int = Field(64, ge=8, description="Bucket sides are multiples of this (64 is the common choice; at least the family's "
                              "render size multiple).")
    min_aspect: float = Field(0.5, gt=0, description="Smallest width/height ratio of a generated bucket.")
    max_aspect: float = Field(2.0, gt=0, description="Largest width/height ratio of a generated bucket.")
    no_upscale: bool = Field(
        False,
        description="Never enlarge: an image smaller than its bucket gets a bucket of its own "
        "size (rounded down to divisible_by) instead of being blown up.",
    )
    crop: Literal["center", "random"] = Field(
        "center", description="Where to crop the overhang after resizing: center, or random (seeded per image)."
    )

    @model_validator(mode="after")
    def _aspects_ordered(self) -> "BucketSettings":
        if self.min_aspect > self.max_aspect:
            raise ValueError(f"min_aspect ({self.min_aspect}) is larger than max_aspect ({self.max_aspect})")
        for width, height in self.resolutions or []:
            if width % self.divisible_by or height % self.divisible_by:
                raise ValueError(
                    f"resolution {width}x{height} is not a multiple of divisible_by={self.divisible_by}"
                )
        return self


# Per-data-set overrides: the same fields, all optional; unset means "use the bucket section".
BucketOverrides = create_model(
    "BucketOverrides",
    __base__=Section,
    **{
        name: (Optional[field.annotation], Field(None, description=field.description))
        for name, field in BucketSettings.model_fields.items()
    },
)


class BucketConfig(BucketSettings):
    """Stage `bucket`: resize and crop every image into its aspect-ratio bucket."""

    batch_size: int = Field(4, ge=1, description="Training batch size of every bucket not in batch_sizes.")
    batch_sizes: dict[str, int] = Field(
        default_factory=dict,
        description="Batch size per bucket, keyed 'WIDTHxHEIGHT' (e.g. {'1024x1024': 4, '1536x640': 2}).",
    )
    small_buckets: Literal["merge", "drop"] = Field(
        "merge",
        description="What happens to images of a bucket holding fewer images than its batch size: "
        "merge them into the nearest bucket by aspect ratio, or drop them (reported in rejected.jsonl).",
    )
    resample: Literal["lanczos", "bicubic", "bilinear", "box"] = Field(
        "lanczos", description="Resize filter."
    )
    seed: int = Field(0, description="Seed of random crops (each image's crop depends only on it and the image).")
    draft: bool = Field(
        True,
        description="Decode JPEGs at 1/2, 1/4 or 1/8 scale when the image is at least that many times larger "
        "than its resized size; the final resize stays Lanczos (faster, visually identical).",
    )
    workers: Optional[int] = Field(None, ge=1, description="Worker processes; null uses every core.")

    @field_validator("batch_sizes")
    @classmethod
    def _resolution_keys(cls, value: dict[str, int]) -> dict[str, int]:
        normalised = {}
        for key, size in value.items():
            if size < 1:
                raise ValueError(f"batch size of {key} must be >= 1, got {size}")
            normalised[format_resolution(parse_resolution(key))] = size
        return normalised

    def settings(self) -> BucketSettings:
        return BucketSettings(**{name: getattr(self, name) for name in BucketSettings.model_fields})

    def batch_size_for(self, resolution: tuple[int, int]) -> int:
        return self.batch_sizes.get(format_resolution(resolution), self.batch_size)
