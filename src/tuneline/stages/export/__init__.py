"""Stage `export`: files other tools load.

- kohya_lora: a LoRA in kohya's layout (ComfyUI, A1111, kohya sd-scripts)
- sgm_unet: diffusers UNet module names -> the original (SGM) block names
- single_file: a full pipeline as one single-file SDXL checkpoint (original layout)
- metadata: ss_*, modelspec.* and provenance header entries
- stage: the stage function (files, model card, copies)

Importing this package is instant: torch and diffusers load inside the functions that need them.
"""
