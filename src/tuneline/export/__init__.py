"""Exports for other tools: kohya LoRA files and single-file SDXL checkpoints (SGM / ldm layout).

Plain functions; torch and diffusers are imported inside them, so importing this package is instant.
"""

from __future__ import annotations

from tuneline.export.kohya_lora import (
    diffusers_lora_to_kohya,
    export_kohya_lora,
    kohya_module_name,
    network_dim_and_alpha,
    read_diffusers_lora,
    save_kohya_lora,
)
from tuneline.export.metadata import checkpoint_metadata, kohya_metadata, modelspec_metadata, provenance_metadata
from tuneline.export.sgm_unet import UnmappedKeyError, sgm_module_prefixes, unet_module_to_sgm
from tuneline.export.single_file import pipeline_to_single_file, sdxl_to_single_file_state_dict

__all__ = [
    "UnmappedKeyError",
    "checkpoint_metadata",
    "diffusers_lora_to_kohya",
    "export_kohya_lora",
    "kohya_metadata",
    "kohya_module_name",
    "modelspec_metadata",
    "network_dim_and_alpha",
    "pipeline_to_single_file",
    "provenance_metadata",
    "read_diffusers_lora",
    "save_kohya_lora",
    "sdxl_to_single_file_state_dict",
    "sgm_module_prefixes",
    "unet_module_to_sgm",
]
