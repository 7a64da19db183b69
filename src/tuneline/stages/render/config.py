"""The `render` params section. Plain pydantic, no torch: validation stays instant."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from tuneline.stages.render.samplers import SAMPLER_NAMES, SamplerName, check_karras
from tuneline.core.fsutil import ProjectFile
from tuneline.core.params import Section


class RenderConfig(Section):
    """Stage render: images of the base and the trained model with the same seeds, and sheets to compare them."""

    prompts_file: ProjectFile = Field(
        "prompts.yaml",
        description="Prompts file (YAML or JSON, relative to the project root and inside it): a list of prompts, or "
        "{defaults: {...}, prompts: [...]}; each prompt may set negative_prompt, seed, size, steps, "
        "guidance_scale, sampler, karras.",
    )
    lora_scale: float = Field(1.0, description="Strength of the trained LoRA (0 renders the base model).")
    use_ema: bool = Field(
        False,
        description="Render the EMA weights: models/train/ema/ when the trainer saved them apart; otherwise the "
        "trainer's result already holds the EMA weights whenever train.ema.enabled was on.",
    )
    weights: Literal["final", "best"] = Field(
        "final", description="Which trained weights to render: final (the last step's) or best (the step of the "
        "lowest validation loss, models/train/best/; needs train.validation.every_steps > 0 and held-out items).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the pipeline runs; auto picks CUDA when available."
    )
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="Pipeline precision: auto is bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU."
    )
    seed: int = Field(0, description="Seed of a prompt that sets none: seed + the prompt's index.")
    steps: Optional[int] = Field(
        None, ge=1, description="Inference steps of a prompt that sets none; null: the model family's default "
        "(its pipeline's own).")
    guidance_scale: Optional[float] = Field(
        None, ge=0, description="Classifier-free guidance scale of a prompt that sets none; null: the family's "
        "default. Each family keeps its pipeline's convention (a flow-matching pipeline may read 0 as guidance "
        "off and g > 0 as pos + g*(pos - neg), where g - 1 is the classic scale).")
    sampler: SamplerName = Field(
        "euler", description=f"Sampler of a prompt that sets none: {', '.join(SAMPLER_NAMES)}. A family with a "
        "sampler of its own takes its name only (euler) and refuses the others."
    )
    karras: bool = Field(
        False, description="Karras sigmas for samplers that support them (not euler_a, ddim)."
    )
    height: int = Field(1024, ge=8, multiple_of=8, description="Image height of a prompt that sets no size.")
    width: int = Field(1024, ge=8, multiple_of=8, description="Image width of a prompt that sets no size.")
    transfer_strength: float = Field(
        0.6, gt=0, le=1,
        description="Domain transfer (two or more data sets): img2img strength, how far each data set's test "
        "image moves toward the other data set's trigger word.",
    )
    transfer: bool = Field(True, description="Render the domain-transfer images when there are two or more data sets.")
    diagnostics: bool = Field(True, description="Render the diagnostic sheet (x_t, x0 prediction, cross-attention).")
    diagnostic_timesteps: list[int] = Field(
        default_factory=lambda: [100, 500, 900],
        description="Training timesteps (0..999) of the diagnostic sheet: one row per sample and timestep.",
    )
    diagnostic_samples: int = Field(2, ge=1, description="Training samples in the diagnostic sheet.")
    diagnostic_token: Optional[str] = Field(
        None,
        description="Caption word whose cross-attention the diagnostic sheet shows; null: the sample's trigger word.",
    )
    sheet_tile: int = Field(256, ge=32, description="Side in pixels of one cell of the contact sheet.")
    live_every: int = Field(
        0, ge=0, description="During training: render live_prompts every N optimizer steps (0 turns it off)."
    )
    live_prompts: int = Field(2, ge=1, description="During training: how many of the first prompts to render.")

    @model_validator(mode="after")
    def _checks(self) -> "RenderConfig":
        check_karras(self.sampler, self.karras)
        for step in self.diagnostic_timesteps:
            if not 0 <= step <= 999:
                raise ValueError(f"diagnostic_timesteps: {step} is outside 0..999")
        return self
