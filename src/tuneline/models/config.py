"""The `model` params section: the base model (and VAE) that latents, train, render and export
load; the `models` stage records their identity."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from tuneline.core.fsutil import ChosenReference
from tuneline.core.params import Section

QUANTIZE_LEVELS = ("none", "int8", "fp8", "nf4")
QuantizeLevel = Literal["none", "int8", "fp8", "nf4"]
VariantName = Literal["base", "turbo"]


class TrainingAdapterConfig(Section):
    """A LoRA active in the frozen base during the training steps only (never in the result): loaded as a second,
    frozen adapter of the denoiser (tuneline.models.training_adapter)."""

    ref: ChosenReference = Field(
        description="A LoRA .safetensors file (any layout diffusers' load_lora_weights reads: diffusers, kohya, "
        "ComfyUI), or a hub id such as ostris/zimage_turbo_training_adapter (then weight_name and a pinned "
        "revision are required).")
    weight_name: Optional[str] = Field(
        None, description="The file in a hub repository (e.g. zimage_turbo_training_adapter_v2.safetensors); "
        "null for a local file.")
    revision: Optional[str] = Field(
        None, description="The hub commit of a hub id (40 hex digits): a training adapter changes what is "
        "learned, so it is pinned like a cache key.")
    scale: float = Field(1.0, gt=0, le=4, description="Strength the adapter is applied at during training.")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"ref": value} if isinstance(value, str) else value


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
    variant: Optional[VariantName] = Field(
        None,
        description="Which release of the family `base` is: 'base' (undistilled: Z-Image Base, SDXL base, a "
        "de-distilled checkpoint) or 'turbo' (step-distilled: Z-Image-Turbo). It sets the render defaults "
        "(steps, guidance) and the advice on what to train; null detects it from what the model folder or hub "
        "id says.",
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
    quantize: QuantizeLevel = Field(
        "none",
        description="Store the frozen denoiser (and a text encoder whenever one is loaded) quantized, to fit "
        "smaller cards: 'none', 'int8' or 'fp8' (weight-only, torchao), 'nf4' (4-bit NormalFloat, "
        "bitsandbytes, as QLoRA). The LoRA trains on top in full precision; the exported LoRA is the same format.",
    )
    training_adapter: Optional[TrainingAdapterConfig] = Field(
        None,
        description="A LoRA active in the frozen base for training steps only (e.g. a de-distilling adapter "
        "for Z-Image-Turbo), LoRA mode only: never in the exported LoRA, the final render or live samples. A "
        ".safetensors file path, or {ref: hub id, weight_name: ..., revision: <commit>}.",
    )


# Model settings added after runs existed -> their default: at the default they are left out of
# the run key, so a run started before the setting existed keeps its folder and resumes.
ADDED_LATER_DEFAULTS: dict[str, Any] = {"quantize": "none", "training_adapter": None}
# Model settings that change nothing a training step computes (render defaults only).
NOT_IN_RUN_KEY = ("variant",)


def run_key_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The dumped model section as a run key holds it (see ADDED_LATER_DEFAULTS, NOT_IN_RUN_KEY)."""
    return {key: value for key, value in settings.items()
            if key not in NOT_IN_RUN_KEY and not (key in ADDED_LATER_DEFAULTS and value == ADDED_LATER_DEFAULTS[key])}
