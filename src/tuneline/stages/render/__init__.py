"""Stage `render`: sample images from the base and the trained model, and sheets to judge them.

- prompts: the prompts file (YAML/JSON), validated with pydantic
- samplers: sampler names -> diffusers schedulers (Z-Image: its flow-match Euler only), and the
  model families' render facts (pipelines, denoiser, defaults)
- generate: pipelines, rendering, and live evaluation during training
- sheets: the contact sheet (prompts x checkpoints)
- transfer: image-to-image from one data set into another's trigger word
- diagnostics: x_t / x0 prediction / cross-attention sheet
- stage: the stage function

Importing this package is instant: torch and diffusers load inside the functions that need them.
"""

# The modules that decide a rendered image (tuneline.core.codeversion); dvc.yaml declares them.
CODE = ("stages/render/stage.py", "stages/render/generate.py", "stages/render/prompts.py",
        "stages/render/samplers.py", "stages/render/sheets.py", "stages/render/transfer.py",
        "stages/render/diagnostics.py", "models/sdxl/adapter.py", "models/loading.py", "models/sdxl/text.py",
        "stages/render/cache.py", "models/single_file.py", "models/ref.py",
        "models/family.py", "train/loss.py", "core/tensorfile.py", "models/base.py", "core/device.py", "train/units.py")
