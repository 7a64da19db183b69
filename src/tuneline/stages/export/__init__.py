"""Stage `export`: files other tools load.

- kohya_lora: a LoRA in kohya's layout (ComfyUI, A1111, kohya sd-scripts)
- sgm_unet: diffusers UNet module names -> the original (SGM) block names
- single_file: a full pipeline as one single-file SDXL checkpoint (original layout), and a VAE alone (export.vae)
- zimage: Z-Image's LoRA and diffusion model in the layouts ComfyUI loads (checked against its code)
- metadata: ss_*, modelspec.* and provenance header entries
- stage: the stage function (files, model card, copies)

Importing this package is instant: torch and diffusers load inside the functions that need them.
"""

# The modules that decide the exported files (tuneline.core.codeversion); dvc.yaml declares them.
CODE = ("stages/export/stage.py", "models/sdxl/kohya_lora.py", "stages/export/metadata.py",
        "models/sdxl/sgm_unet.py", "models/sdxl/checkpoint_file.py", "models/zimage/export.py", "models/loading.py",
        "models/ref.py", "models/single_file.py", "models/family.py", "models/sdxl/adapter.py", "models/sdxl/text.py",
        "stages/render/generate.py", "stages/render/prompts.py", "stages/render/samplers.py", "train/loss.py",
        "core/tensorfile.py", "models/base.py", "core/device.py", "train/units.py")
