"""The `model` params section: the base model (and VAE) that latents, train, render and export
load; the `models` stage records their identity."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from tuneline.core.fsutil import ChosenReference
from tuneline.core.params import Section


class ModelConfig(Section):
    """The base model that latents, training, rendering and export use."""

    base: ChosenReference = Field(
        "tiny-sdxl",
        description="Base model: a hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0), a local diffusers "
        "folder, a local single .safetensors file (converted once; see model.config), or 'tiny-sdxl' (a tiny RANDOM-weight model for tests and demos).",
    )
    family: Optional[Literal["sdxl", "zimage"]] = Field(
        None,
        description="Model family of `base`: 'sdxl' or 'zimage'; null detects it from the `_class_name` in "
        "base's model_index.json (StableDiffusionXLPipeline -> sdxl, ZImagePipeline -> zimage; a single-file "
        "base is sdxl). Set it for a pipeline class detection does not know that has one family's components.",
    )
    revision: Optional[str] = Field(
        None, description="Hub revision (branch, tag or commit) of `base`; pin a commit for caches that never go stale."
    )
    vae: Optional[ChosenReference] = Field(
        None,
        description="Replacement VAE (hub id or local folder), e.g. madebyollin/sdxl-vae-fp16-fix; null uses base's VAE.",
    )
    config: Optional[ChosenReference] = Field(
        None,
        description="Diffusers folder or hub id whose configs describe a single-file base (needed offline; "
        "e.g. stabilityai/stable-diffusion-xl-base-1.0 or tiny-sdxl)",
    )
