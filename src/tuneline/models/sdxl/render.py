"""What rendering asks of SDXL beyond its RenderFacts (the `Renderer` Protocol of tuneline.models.contracts):
the scheduler settings training learned, live samples from the training modules, the diagnostic sheet."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


def _inference_scheduler(adapter: Any) -> Any:
    """The base folder's scheduler, with the training's prediction type and zero-terminal-SNR setting."""
    import diffusers

    from tuneline.models.loading import _base_location
    from tuneline.models.sdxl.adapter import inference_scheduler_settings

    model = adapter.model_config
    base = _base_location(model, adapter.root)
    kwargs = {"revision": model.revision} if isinstance(base, str) and model.revision else {}
    config = diffusers.EulerDiscreteScheduler.load_config(base, subfolder="scheduler", **kwargs)
    cls = getattr(diffusers, str(config.get("_class_name")), diffusers.EulerDiscreteScheduler)
    return cls.from_config(config, **inference_scheduler_settings(adapter.prediction_type,
                                                                  getattr(adapter.config, "zero_terminal_snr", False)))


class SDXLRenderer:
    def scheduler_settings(self, prediction_type: str | None, zero_terminal_snr: bool) -> dict[str, Any]:
        """The trained target (epsilon / v) and, with zero terminal SNR, rescaled betas and trailing steps."""
        from tuneline.models.sdxl.adapter import inference_scheduler_settings

        return inference_scheduler_settings(prediction_type, zero_terminal_snr)  # type: ignore[arg-type]

    def pipeline_from_training(self, adapter: Any, modules: Mapping[str, Any], vae: Any = None,
                               text_encoders: bool = True) -> Any:
        """A StableDiffusionXLPipeline sharing the live UNet (PEFT-wrapped in LoRA mode) and any trained text
        encoders of `modules` (unwrapped); frozen encoders and the tokenizers come from the adapter (which
        loads them on the UNet's device if training did not need them), the scheduler is the base's with
        the training's prediction type. `vae` defaults to model.vae / the base VAE in fp32. Without
        `text_encoders`: no encoder and no tokenizer (prompts come as cached embeddings)."""
        from diffusers import StableDiffusionXLPipeline

        from tuneline.models.loading import load_vae
        from tuneline.models.sdxl.adapter import TEXT_ENCODER_NAMES

        unet = modules["unet"]
        device = unet.device
        encoders: list[Any] = [None, None]
        tokenizers: list[Any] = [None, None]
        if text_encoders:
            # Training on cached text embeddings loads no text encoder; rendering from text needs them.
            frozen_encoders = adapter.ensure_text_encoders(str(device))
            encoders = [modules.get(name, encoder) for name, encoder in zip(TEXT_ENCODER_NAMES, frozen_encoders)]
            tokenizers = adapter.tokenizers
        if vae is None:
            vae = load_vae(adapter.model_config, adapter.root, "fp32", "cpu").to(device)
        pipeline = StableDiffusionXLPipeline(
            vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1], unet=unet, scheduler=_inference_scheduler(adapter))
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def text_inputs(self, pipeline: Any, prompt: str, negative_prompt: str | None, guidance_scale: float,
                    embedded: Callable[[str], Mapping[str, Any]] | None) -> dict[str, Any]:
        """As StableDiffusionXL(Img2Img)Pipeline.encode_prompt makes them: prompt_embeds [1, 77, hidden] and
        pooled_prompt_embeds [1, projection]; a negative only where guidance (above 1) uses one, and none
        for an empty negative when the pipeline's force_zeros_for_empty_prompt makes it zeros itself."""
        if embedded is None:
            return {"prompt": prompt, "negative_prompt": negative_prompt or None}
        unet = pipeline.unet

        def tensors(text: str) -> tuple[Any, Any]:
            stored = embedded(text)
            return (stored["prompt_embeds"][None].to(unet.device, unet.dtype),
                    stored["pooled"][None].to(unet.device, unet.dtype))

        inputs = {}
        inputs["prompt_embeds"], inputs["pooled_prompt_embeds"] = tensors(prompt)
        if guidance_scale > 1 and (negative_prompt or not pipeline.config.force_zeros_for_empty_prompt):
            inputs["negative_prompt_embeds"], inputs["negative_pooled_prompt_embeds"] = tensors(negative_prompt or "")
        return inputs

    def diagnostic_rows(self, pipeline: Any, latents_dir: Path, timesteps: Sequence[int], samples: int,
                        token: str | None, trigger_words: Mapping[str, str | None],
                        seed: int = 0) -> tuple[list[tuple[str, list[Any]]], list[str], list[str]]:
        from tuneline.models.sdxl.diagnostics import diagnostic_rows

        return diagnostic_rows(pipeline, latents_dir, timesteps, samples, token, trigger_words, seed)
