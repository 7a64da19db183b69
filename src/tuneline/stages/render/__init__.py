"""Stage `render`: sample images from the base and the trained model, and sheets to judge them.

- prompts: the prompts file (YAML/JSON), validated with pydantic
- samplers: sampler names -> diffusers schedulers
- generate: pipelines, rendering, and live evaluation during training
- sheets: the contact sheet (prompts x checkpoints)
- transfer: image-to-image from one data set into another's trigger word
- diagnostics: x_t / x0 prediction / cross-attention sheet
- stage: the stage function

Importing this package is instant: torch and diffusers load inside the functions that need them.
"""
