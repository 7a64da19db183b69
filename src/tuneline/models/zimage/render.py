"""What rendering asks of Z-Image beyond its RenderFacts (the `Renderer` Protocol of tuneline.models.contracts):
live samples from the training modules. Flow matching carries no prediction type or noise schedule over
to the scheduler, and there is no diagnostic sheet (RenderFacts.diagnostics says why)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class ZImageRenderer:
    def scheduler_settings(self, prediction_type: str | None, zero_terminal_snr: bool) -> dict[str, Any]:
        return {}  # the base's flow-match Euler (its shift) is what training's sigmas follow

    def pipeline_from_training(self, adapter: Any, modules: Mapping[str, Any], vae: Any = None) -> Any:
        """A ZImagePipeline sharing the live transformer (PEFT-wrapped in LoRA mode) of `modules` (unwrapped),
        the adapter's Qwen3 text encoder and tokenizer, `vae` (default model.vae / the base VAE, fp32) and
        the base's flow-match scheduler."""
        import diffusers

        from tuneline.models.loading import _base_location, load_vae

        transformer = modules["transformer"]
        device = transformer.device
        encoder = (modules["text_encoder"] if "text_encoder" in modules
                   else adapter.ensure_text_encoders(str(device))[0])
        if vae is None:
            vae = load_vae(adapter.model_config, adapter.root, "fp32", "cpu").to(device)
        model = adapter.model_config
        base = _base_location(model, adapter.root)
        kwargs = {"revision": model.revision} if isinstance(base, str) and model.revision else {}
        config = diffusers.FlowMatchEulerDiscreteScheduler.load_config(base, subfolder="scheduler", **kwargs)
        pipeline = diffusers.ZImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(config),
                                            vae=vae, text_encoder=encoder, tokenizer=adapter.tokenizers[0],
                                            transformer=transformer)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def diagnostic_rows(self, pipeline: Any, latents_dir: Path, timesteps: Sequence[int], samples: int,
                        token: str | None, trigger_words: Mapping[str, str | None],
                        seed: int = 0) -> tuple[list[tuple[str, list[Any]]], list[str], list[str]]:
        from tuneline.models.zimage import FAMILY

        raise ValueError(FAMILY.render.diagnostics)
