"""What rendering asks of Z-Image beyond its RenderFacts (the `Renderer` Protocol of tuneline.models.contracts):
live samples from the training modules. Flow matching carries no prediction type or noise schedule over
to the scheduler, and there is no diagnostic sheet (RenderFacts.diagnostics says why)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


class ZImageRenderer:
    def scheduler_settings(self, prediction_type: str | None, zero_terminal_snr: bool) -> dict[str, Any]:
        return {}  # the base's flow-match Euler (its shift) is what training's sigmas follow

    def pipeline_from_training(self, adapter: Any, modules: Mapping[str, Any], vae: Any = None,
                               text_encoders: bool = True) -> Any:
        """A ZImagePipeline sharing the live transformer (PEFT-wrapped in LoRA mode) of `modules` (unwrapped),
        the adapter's Qwen3 text encoder and tokenizer, `vae` (default model.vae / the base VAE, fp32) and
        the base's flow-match scheduler. Without `text_encoders`: no encoder and no tokenizer (prompts come
        as cached embeddings)."""
        import diffusers

        from tuneline.models.loading import _base_location, load_vae

        transformer = modules["transformer"]
        device = transformer.device
        encoder = tokenizer = None
        if text_encoders:
            encoder = (modules["text_encoder"] if "text_encoder" in modules
                       else adapter.ensure_text_encoders(str(device))[0])
            tokenizer = adapter.tokenizers[0]
        if vae is None:
            vae = load_vae(adapter.model_config, adapter.root, "fp32", "cpu").to(device)
        model = adapter.model_config
        base = _base_location(model, adapter.root)
        kwargs = {"revision": model.revision} if isinstance(base, str) and model.revision else {}
        config = diffusers.FlowMatchEulerDiscreteScheduler.load_config(base, subfolder="scheduler", **kwargs)
        pipeline = diffusers.ZImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(config),
                                            vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                                            transformer=transformer)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def text_inputs(self, pipeline: Any, prompt: str, negative_prompt: str | None, guidance_scale: float,
                    embedded: Callable[[str], Mapping[str, Any]] | None) -> dict[str, Any]:
        """As ZImage(Img2Img)Pipeline.encode_prompt makes them: lists of one [tokens, hidden] tensor, and the
        negative (the empty prompt when there is none) wherever guidance is on (above 0)."""
        if embedded is None:
            return {"prompt": prompt, "negative_prompt": negative_prompt or None}
        transformer = pipeline.transformer

        def tensors(text: str) -> list[Any]:
            return [embedded(text)["prompt_embeds"].to(transformer.device, transformer.dtype)]

        inputs = {"prompt_embeds": tensors(prompt)}
        if guidance_scale > 0:
            inputs["negative_prompt_embeds"] = tensors(negative_prompt or "")
        return inputs

    def diagnostic_rows(self, pipeline: Any, latents_dir: Path, timesteps: Sequence[int], samples: int,
                        token: str | None, trigger_words: Mapping[str, str | None],
                        seed: int = 0) -> tuple[list[tuple[str, list[Any]]], list[str], list[str]]:
        from tuneline.models.zimage import FAMILY

        raise ValueError(FAMILY.render.diagnostics)
