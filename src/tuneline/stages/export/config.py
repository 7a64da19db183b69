"""The `export` params section (torch-free)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from tuneline.core.fsutil import ChosenPath, FileName
from tuneline.core.params import Section


class ExportConfig(Section):
    """Stage export: single files for ComfyUI / A1111 / diffusers' from_single_file."""

    name: FileName = Field(
        "tuneline", description="File name (without extension) and title of the exported model: one file name "
        "inside export/ (no / or \\, no NUL, not '.' or '..', no leading dot).")
    dtype: Literal["fp16", "bf16", "fp32"] = Field(
        "fp16", description="Precision of the single-file checkpoint (full fine-tunes); LoRA weights keep fp32."
    )
    copy_to: list[ChosenPath] = Field(
        default_factory=list,
        description="Folders (e.g. ComfyUI's models/loras or models/checkpoints) that receive a copy of the finished "
        "file, written atomically so a watching UI never loads half a file.",
    )
    keep_diffusers: bool = Field(True, description="Also keep the diffusers-format result beside the single file.")
    use_ema: bool = Field(True, description="Export the EMA weights when the run kept them (train.ema.enabled).")
    weights: Literal["final", "best"] = Field(
        "final", description="Which weights to export: final (the last step's) or best (the step of the lowest "
        "validation loss, models/train/best/; needs train.validation.every_steps > 0 and held-out items).")
    samples: int = Field(4, ge=0, description="Sample images from the render stage put in the model card.")
    author: Optional[str] = Field(None, description="Author named in the model card and metadata.")
    vae: bool = Field(
        False, description="Also write the pipeline's VAE (model.vae, i.e. models/autoencoder when the autoencoder "
        "stage is enabled; else the base model's) as `<name>_vae.safetensors`, a standalone VAE in the original "
        "(ldm) layout that ComfyUI's Load VAE node and A1111's models/VAE read. Not copied to copy_to.")
