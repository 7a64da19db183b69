"""Typed configuration. One pydantic model per stage; params.yaml is their serialised form.

`load_params` checks every key before anything runs: an unknown key is named together
with the closest valid one and the list of keys allowed where it stands, and a bad
value is named with its allowed values.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    PlainSerializer,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from tuneline.fsutil import safe_name
from tuneline.render.config import RenderConfig
from tuneline.section import Section
from tuneline.captioning.config import CaptionConfig
from tuneline.export.config import ExportConfig
from tuneline.latents_config import LatentsConfig
from tuneline.tracking_config import TrackingConfig
from tuneline.train.config import TrainConfig


class ParamsError(ValueError):
    """Bad configuration, found before any compute. The message names the key."""




_RESOLUTION = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def parse_resolution(value: Any) -> tuple[int, int]:
    """'1024x768', [1024, 768] or 1024 (square) -> (width, height)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, str):
        match = _RESOLUTION.match(value)
        if not match:
            raise ValueError(f"expected 'WIDTHxHEIGHT' such as '1024x768', got {value!r}")
        return (int(match.group(1)), int(match.group(2)))
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    raise ValueError(f"expected 'WIDTHxHEIGHT' such as '1024x768', got {value!r}")


def format_resolution(value: tuple[int, int]) -> str:
    return f"{value[0]}x{value[1]}"


Resolution = Annotated[
    tuple[int, int], BeforeValidator(parse_resolution), PlainSerializer(format_resolution, return_type=str)
]


def _check_color(value: str) -> str:
    from PIL import ImageColor

    try:
        ImageColor.getrgb(value)
    except ValueError as error:
        raise ValueError(f"not a colour: {value!r} (use a name like 'white' or '#rrggbb')") from error
    return value


Color = Annotated[str, BeforeValidator(_check_color)]


class BucketSettings(Section):
    """Aspect-ratio bucket settings; each data set may override any of them."""

    resolution: int = Field(
        1024,
        ge=64,
        description="Side of the square whose area generated buckets keep: 1024 gives SDXL's "
        "~1 megapixel buckets (1024x1024, 1152x896, ...).",
    )
    resolutions: Optional[list[Resolution]] = Field(
        None,
        description="Explicit bucket list as 'WIDTHxHEIGHT' strings. When set, no buckets are "
        "generated from resolution/min_aspect/max_aspect.",
    )
    divisible_by: int = Field(64, ge=8, description="Bucket sides are multiples of this (64 for SDXL).")
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


class DatasetConfig(Section):
    """One folder of training images with its own settings."""

    name: str = Field(description="Data set name; also its folder name in every stage output.")
    path: Path = Field(description="Folder of images (searched recursively), relative to the project root.")
    repeats: int = Field(1, ge=1, description="How many times each image is seen per epoch.")
    loss_weight: float = Field(1.0, gt=0, description="Weight of this data set's samples in the loss.")
    trigger_word: Optional[str] = Field(
        None, description="Put at the front of every caption of this data set (once)."
    )
    bucket: Optional[BucketOverrides] = Field(  # type: ignore[valid-type]
        None, description="Overrides of the bucket section for this data set only."
    )

    @field_validator("name")
    @classmethod
    def _safe(cls, value: str) -> str:
        if not safe_name(value):
            raise ValueError(f"data set name {value!r} has no usable characters (use letters, digits, . _ -)")
        return value

    @property
    def folder(self) -> str:
        """The name as a safe folder name (no separators, no traversal)."""
        return safe_name(self.name)


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


class ModelConfig(Section):
    """The base model that latents, training, rendering and export use."""

    base: str = Field(
        "tiny-sdxl",
        description="Base model: a hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0), a local diffusers "
        "folder, a local single .safetensors file (converted once; see model.config), or 'tiny-sdxl' (a tiny RANDOM-weight model for tests and demos).",
    )
    revision: Optional[str] = Field(
        None, description="Hub revision (branch, tag or commit) of `base`; pin a commit for caches that never go stale."
    )
    vae: Optional[str] = Field(
        None,
        description="Replacement VAE (hub id or local folder), e.g. madebyollin/sdxl-vae-fp16-fix; null uses base's VAE.",
    )
    config: Optional[str] = Field(
        None,
        description="Diffusers folder or hub id whose configs describe a single-file base (needed offline; "
        "e.g. stabilityai/stable-diffusion-xl-base-1.0 or tiny-sdxl)",
    )


class Params(Section):
    """The whole params.yaml."""

    store_dir: Path = Field(
        Path(".tuneline/store"),
        description="Persistent per-item result store (outside DVC outs); relative to the project root.",
    )
    datasets: list[DatasetConfig] = Field(min_length=1, description="The data sets of this run.")
    ingest: IngestConfig = Field(default_factory=IngestConfig, description="Stage ingest.")
    bucket: BucketConfig = Field(default_factory=BucketConfig, description="Stage bucket.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Stage train.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Stage export.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    caption: CaptionConfig = Field(default_factory=CaptionConfig, description="Stage caption.")
    latents: LatentsConfig = Field(default_factory=LatentsConfig, description="Stage latents.")
    render: RenderConfig = Field(default_factory=RenderConfig, description="Stage render.")

    @model_validator(mode="after")
    def _unique_folders(self) -> "Params":
        seen: dict[str, str] = {}
        for dataset in self.datasets:
            if dataset.folder in seen:
                raise ValueError(
                    f"data sets {seen[dataset.folder]!r} and {dataset.name!r} map to the same folder "
                    f"name {dataset.folder!r}; rename one"
                )
            seen[dataset.folder] = dataset.name
            try:
                self.bucket_settings_for(dataset)
            except ValidationError as error:
                reasons = "; ".join(item["msg"] for item in error.errors())
                raise ValueError(f"data set {dataset.name!r}: bucket overrides: {reasons}") from None
        return self

    def bucket_settings_for(self, dataset: DatasetConfig) -> BucketSettings:
        """The bucket section with this data set's overrides applied."""
        merged = self.bucket.settings().model_dump()
        if dataset.bucket is not None:
            merged.update(dataset.bucket.model_dump(exclude_none=True))
        return BucketSettings(**merged)

    def dataset(self, folder: str) -> DatasetConfig:
        for dataset in self.datasets:
            if dataset.folder == folder:
                return dataset
        raise KeyError(folder)


# --- loading and error messages -------------------------------------------------------


def _nested_models(annotation: Any) -> list[tuple[type[BaseModel], bool]]:
    """Models inside an annotation: (model, is_list) for Model, Optional[Model], list[Model]."""
    found: list[tuple[type[BaseModel], bool]] = []
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found.extend(_nested_models(arg))
    elif origin is list:
        found.extend((model, True) for model, _ in _nested_models(typing.get_args(annotation)[0]))
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        found.append((annotation, False))
    return found


def unknown_key_problems(data: Any, model: type[BaseModel], where: str = "") -> list[str]:
    """One message per unknown key, with the closest valid key and the allowed ones."""
    if not isinstance(data, dict):
        return []
    problems = []
    fields = model.model_fields
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            problems.append(
                f"{where}{key}: unknown key.{hint} Allowed here: {', '.join(fields)}."
            )
            continue
        for sub_model, is_list in _nested_models(fields[key].annotation):
            if is_list and isinstance(value, list):
                for index, element in enumerate(value):
                    label = element.get("name", index) if isinstance(element, dict) else index
                    problems.extend(unknown_key_problems(element, sub_model, f"{where}{key}[{label}]."))
            elif not is_list:
                problems.extend(unknown_key_problems(value, sub_model, f"{where}{key}."))
    return problems


def _location(loc: tuple[Any, ...], data: Any) -> str:
    """'datasets[faces].repeats' from pydantic's ('datasets', 0, 'repeats')."""
    text, node = "", data
    for part in loc:
        if isinstance(part, int):
            name = node[part].get("name") if isinstance(node, list) and isinstance(node[part], dict) else None
            text += f"[{name if name is not None else part}]"
        else:
            text += f".{part}" if text else str(part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return text or "(top level)"


def validate_params(data: Any, source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise ParamsError naming every bad key."""
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level")
    problems = unknown_key_problems(data, Params)
    try:
        params = Params.model_validate(data)
    except ValidationError as error:
        for item in error.errors():
            if item["type"] == "extra_forbidden":  # already named above, with a suggestion
                continue
            loc = tuple(part for part in item["loc"] if not str(part).startswith("function-"))
            got = f" (got {item['input']!r})" if item["type"] != "missing" else ""
            problems.append(f"{_location(loc, data)}: {item['msg']}{got}")
    if not problems:
        return params
    raise ParamsError(f"{source} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text("utf-8"))
    except FileNotFoundError as error:
        raise ParamsError(f"{path}: file not found") from error
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from error
    return validate_params(data, str(path))
