"""Z-Image: the single-stream flow-matching DiT (ZImagePipeline) with a Qwen3 text encoder.

- adapter: the trainer adapter (transformer LoRA / full, flow-matching loss)
- text: the Qwen3 prompt encoding and the latents stage's text-embedding cache
- export: the LoRA and diffusion-model files in the layouts ComfyUI loads (ZImageExporter)
- render: live samples from the training modules (its flow-match Euler, no diagnostic sheet)
- rules: the settings a Z-Image run refuses (SDXL-only keys)

Importing this package is instant: it only declares `FAMILY`.
"""

from tuneline.models.base import Family, ForeignSetting, RenderFacts, Variant

# Render defaults from the model cards: Tongyi-MAI/Z-Image (github.com/Tongyi-MAI/Z-Image README, "Z-Image":
# num_inference_steps=50, guidance_scale=4; recommended 28-50 steps, guidance 3.0-5.0) and
# Tongyi-MAI/Z-Image-Turbo (the same README and diffusers' ZImagePipeline docs: num_inference_steps=9, "8 DiT
# forwards", guidance_scale=0.0, "guidance should be 0 for the Turbo models").
BASE = Variant(
    "base", distilled=False, steps=50, guidance_scale=4.0,
    source="Tongyi-MAI/Z-Image model card: 50 steps, guidance 4 (recommended 28-50 steps, guidance 3-5)",
    # A de-distilled Turbo (De-Turbo) trains and renders as a base.
    markers=("de-turbo", "deturbo", "de-distill", "dedistill", "undistill", "z-image-base", "zimage-base"))
TURBO = Variant(
    "turbo", distilled=True, steps=9, guidance_scale=0.0,
    source="Tongyi-MAI/Z-Image-Turbo model card and diffusers' ZImagePipeline docs: 9 steps (8 transformer "
           "forwards), guidance 0",
    markers=("turbo",),
    problem="a LoRA trained on it directly comes out grainy (kohya-ss/musubi-tuner#769) or generic, as its "
            "distillation breaks down",
    adapter_example="{ref: ostris/zimage_turbo_training_adapter, weight_name: "
                    "zimage_turbo_training_adapter_v2.safetensors, revision: <its commit>}",
    advice="train Z-Image Base (Tongyi-MAI/Z-Image) or a de-distilled checkpoint (ostris/Z-Image-De-Turbo) instead "
           "and render the LoRA on Turbo")

FAMILY = Family(
    name="zimage",
    title="Z-Image",
    pipelines=("ZImagePipeline", "ZImageImg2ImgPipeline"),
    adapter="tuneline.models.zimage.adapter:ZImageAdapter",
    text_cache="tuneline.models.zimage.text:ZImageTextCache",
    exporter="tuneline.models.zimage.export:ZImageExporter",
    rules="tuneline.models.zimage.rules:unsupported_settings",
    render=RenderFacts(
        pipeline="ZImagePipeline", img2img="ZImageImg2ImgPipeline", denoiser="transformer",
        steps=50, guidance_scale=5.0, size_multiple=16, samplers=("euler",),
        full_components={"transformer": None, "text_encoder": "text_encoder_1"}, text_encoders=("text_encoder",),
        diagnostics="Z-Image has no diagnostic sheet: the sheet shows the UNet's cross-attention to the trigger "
                    "word (and its x_t / x0 columns use SDXL's DDPM noise schedule); Z-Image's single-stream "
                    "transformer has no cross-attention",
        scheduler="FlowMatchEulerDiscreteScheduler",
        sampler_note="Z-Image renders with its own flow-match Euler, FlowMatchEulerDiscreteScheduler, named euler",
        karras_refusal="Z-Image's flow-match Euler takes its sigmas from the shift of its scheduler; "
                       "Karras sigmas are an SDXL sampler option",
        variants=(BASE, TURBO)),
    renderer="tuneline.models.zimage.render:ZImageRenderer",
    code={"latents": ("models/zimage/text.py",), "train": ("models/zimage/adapter.py", "models/zimage/text.py"),
          "render": ("models/zimage/render.py",),
          "export": ("models/zimage/export.py",)},
    # What musubi-tuner keeps out of its fp8 base (FP8_OPTIMIZATION_EXCLUDE_KEYS: "_embedder", "final_layer")
    # and diffusers calls precision sensitive (_skip_layerwise_casting_patterns: t_embedder, cap_embedder):
    # the timestep, patch, caption (and SigLIP) embedders and the final layer.
    full_precision={"transformer": ("t_embedder", "all_x_embedder", "cap_embedder", "siglip_embedder",
                                    "all_final_layer")},
    shard_blocks=("ZImageTransformerBlock",),  # the DiT's main, noise- and context-refiner layers
    ignored_settings=(
        ForeignSetting("train.text_encoder_2.mode",
                       "{key} is {value!r}, but Z-Image has one text encoder (Qwen3, train.text_encoder_1); SDXL's "
                       "second encoder does not exist here (it still turns the text cache off, as any trained text "
                       "encoder does)"),
        ForeignSetting("model.config",
                       "{key} ({value!r}) describes a single-file SDXL base; a Z-Image base is a diffusers folder or "
                       "hub id, so it is not used"),
    ),
)
