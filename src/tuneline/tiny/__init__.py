"""Deterministic tiny RANDOM-weight models in standard on-disk formats, for tests and demos.

`tiny-sdxl` is a diffusers StableDiffusionXLPipeline folder, `tiny-zimage` a diffusers
ZImagePipeline folder and `tiny-florence2` a native transformers Florence-2 folder (and
`tiny-zimage-training-adapter` / `tiny-sdxl-training-adapter` a RANDOM LoRA file for
model.training_adapter): every
loader and pipeline runs for real, but the weights were never trained, so images and
captions they produce mean nothing.

Importing this package is instant: torch, diffusers and transformers load on first build.
"""

from __future__ import annotations

from tuneline.tiny._common import NOTE_NAME, TINY_VERSION
from tuneline.tiny.cache import (
    TINY_MODEL_IDS,
    TinyKind,
    default_cache_dir,
    ensure_tiny_model,
    resolve_tiny,
    tiny_model_dir,
)
from tuneline.tiny.florence2 import build_tiny_florence2
from tuneline.tiny.sdxl import build_tiny_sdxl
from tuneline.tiny.training_adapter import (
    TINY_TRAINING_ADAPTERS,
    build_tiny_training_adapter,
    tiny_training_adapter_file,
)
from tuneline.tiny.zimage import build_tiny_zimage


__all__ = [
    "NOTE_NAME",
    "TINY_MODEL_IDS",
    "TINY_TRAINING_ADAPTERS",
    "TINY_VERSION",
    "TinyKind",
    "build_tiny_florence2",
    "build_tiny_sdxl",
    "build_tiny_training_adapter",
    "build_tiny_zimage",
    "default_cache_dir",
    "ensure_tiny_model",
    "resolve_tiny",
    "tiny_model_dir",
    "tiny_training_adapter_file",
]
