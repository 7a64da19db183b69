"""SDXL: the UNet family (StableDiffusionXLPipeline), epsilon or v prediction on a DDPM schedule.

- adapter: the trainer adapter (two CLIP text encoders, UNet, LoRA / DoRA / full)
- text: prompt encoding and the latents stage's text-embedding cache
- kohya_lora, sgm_unet, checkpoint_file: the files other tools load (kohya LoRA, single-file checkpoint)
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
        full_components={"unet": None, "text_encoder": "text_encoder_1", "text_encoder_2": "text_encoder_2"}),
    single_file_base=True,  # the single-file loader (tuneline.models.single_file) is SDXL's
    vae_overflow_hint="The stock SDXL VAE overflows in fp16; a fixed VAE (model.vae: madebyollin/sdxl-vae-fp16-fix) "
                      "or latents.dtype bf16/fp32 avoids the retries.",
)
