"""SDXL: the UNet family (StableDiffusionXLPipeline), epsilon or v prediction on a DDPM schedule.

- adapter: the trainer adapter (two CLIP text encoders, UNet, LoRA / DoRA / full)
- text: prompt encoding and the latents stage's text-embedding cache
- export: the export stage's writer (SDXLExporter) and headers; kohya_lora, sgm_unet, checkpoint_file: the
  files other tools load (kohya LoRA, single-file checkpoint, VAE)
- render: live samples from the training modules, the trained scheduler settings, the diagnostic sheet
- rules: the settings an SDXL run refuses

Importing this package is instant: it only declares `FAMILY`.
"""

from tuneline.models.base import Family, RenderFacts

FAMILY = Family(
    name="sdxl",
    title="SDXL",
    pipelines=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
    adapter="tuneline.models.sdxl.adapter:SDXLAdapter",
    text_cache="tuneline.models.sdxl.text:SDXLTextCache",
    exporter="tuneline.models.sdxl.export:SDXLExporter",
    rules="tuneline.models.sdxl.rules:unsupported_settings",
    render=RenderFacts(
        pipeline="StableDiffusionXLPipeline", img2img="StableDiffusionXLImg2ImgPipeline", denoiser="unet",
        steps=30, guidance_scale=6.0, size_multiple=8,
        samplers=("euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "ddim", "lms"),
        full_components={"unet": None, "text_encoder": "text_encoder_1", "text_encoder_2": "text_encoder_2"},
        text_encoders=("text_encoder", "text_encoder_2")),
    single_file_base=True,  # the single-file loader (tuneline.models.single_file) is SDXL's
    vae_overflow_hint="The stock SDXL VAE overflows in fp16; a fixed VAE (model.vae: madebyollin/sdxl-vae-fp16-fix) "
                      "or latents.dtype bf16/fp32 avoids the retries.",
    renderer="tuneline.models.sdxl.render:SDXLRenderer",
    code={"latents": ("models/sdxl/text.py",),
          "train": ("models/sdxl/adapter.py", "models/sdxl/text.py"),
          "render": ("models/sdxl/render.py", "models/sdxl/diagnostics.py", "models/sdxl/adapter.py",
                     "models/sdxl/text.py"),
          "export": ("models/sdxl/export.py", "models/sdxl/kohya_lora.py", "models/sdxl/sgm_unet.py",
                     "models/sdxl/checkpoint_file.py")},
    # The UNet's timestep and added-condition (pooled text, size) embedders, and the pooled text
    # projection of the second encoder: small, and every image's conditioning passes through them
    # (diffusers keeps Z-Image's and Flux's embedders out of quantization the same way).
    full_precision={"unet": ("time_embedding", "add_embedding"), "text_encoder_2": ("text_projection",)},
    # The UNet's attention and resnet blocks (diffusers' _no_split_modules also names the up blocks that hold them:
    # wrapping those too would gather a whole up block at once).
    shard_blocks=("BasicTransformerBlock", "ResnetBlock2D"),
)
